"""The active-learning curves of many runs, mean and standard deviation over seeds, per heuristic.

    kdrun -m active=random,entropy,margin,least_confidence,bald,ensemble,consistency seed=0,1,2 \
        method=supervised student.drop_rate=0.25 logger=none hydra.sweep.dir=outputs/active_fmnist
    python scripts/active_curve.py outputs/active_fmnist -o active_fmnist.png

Reads every run dir below DIRS that holds an active_curve.csv (its heuristic and seed from summary.json), prints a
markdown table (test accuracy, mean ± std over the seeds, per number of labels) and draws each heuristic's mean
with a ± std band.
"""

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path


def collect(dirs: list[Path]) -> dict[str, dict[int, list[float]]]:
    """heuristic -> labels -> the test accuracies of its runs (one per seed)."""
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for root in dirs:
        for path in sorted(Path(root).glob("**/active_curve.csv")):
            summary = json.loads((path.parent / "summary.json").read_text())
            with open(path) as f:
                for row in csv.DictReader(f):
                    curves[summary["active/heuristic"]][int(row["labels"])].append(float(row["test_acc"]))
    return curves


def table(curves: dict[str, dict[int, list[float]]]) -> str:
    labels = sorted({n for c in curves.values() for n in c})
    lines = ["| labels | " + " | ".join(curves) + " |", "| ---: |" + " ---: |" * len(curves)]
    for n in labels:
        cells = []
        for c in curves.values():
            accs = c.get(n, [])
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(accs):.2f} ± {100 * std:.2f} ({len(accs)})" if accs else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for name, c in curves.items():
        labels = sorted(c)
        mean = [statistics.mean(c[n]) for n in labels]
        std = [statistics.stdev(c[n]) if len(c[n]) > 1 else 0.0 for n in labels]
        line, = ax.plot(labels, mean, marker="o", ms=3, label=name)
        ax.fill_between(labels, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    ax.set(xlabel="labeled images", ylabel="test accuracy", title="active learning (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run dirs (searched recursively)")
    parser.add_argument("-o", "--out", type=Path, default=Path("active_curve.png"), help="the plot (PNG)")
    args = parser.parse_args()
    curves = collect(args.dirs)
    if not curves:
        raise SystemExit(f"no active_curve.csv below {', '.join(map(str, args.dirs))}")
    print(table(curves))
    plot(curves, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
