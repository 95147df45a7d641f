"""Loss and accuracy against epoch for kdrun runs, to a PNG, offline (pip install "kdrun[plot]").

    python scripts/plot_runs.py outputs/runs/2025-01-01/10-00-00 outputs/multirun/... -o runs.png

Reads each run dir's metrics.jsonl (sweep dirs are searched for run dirs). Left: train and test loss;
right: train and test accuracy. A run is labelled by the overrides that tell it from the others.
"""

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

PANELS = [("loss", ["train/loss", "test/loss"]), ("accuracy", ["train/acc", "test/acc"])]


def find_runs(dirs: list[str]) -> list[Path]:
    runs = []
    for d in map(Path, dirs):
        found = sorted(p.parent for p in d.glob("**/metrics.jsonl"))
        if not found:
            sys.exit(f"plot_runs: no metrics.jsonl under {d}; give run dirs or sweep dirs kdrun wrote")
        runs += found
    return runs


def curves(run: Path) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (epochs, values) from a run's metrics.jsonl, in step order."""
    points: dict[str, dict[int, tuple[float, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in row.items():
            if "/" in name and isinstance(value, (int, float)):
                points.setdefault(name, {})[row["step"]] = (row["epoch"], value)
    return {name: tuple(map(list, zip(*(by_step[s] for s in sorted(by_step))))) for name, by_step in points.items()}


def labels(runs: list[Path]) -> list[str]:
    """Each run's overrides that differ between the runs (its dir name when there are none)."""
    overrides = []
    for run in runs:
        f = run / ".hydra" / "overrides.yaml"
        overrides.append(set(OmegaConf.load(f)) if f.is_file() else set())
    shared = set.intersection(*overrides) if overrides else set()
    return [" ".join(sorted(o - shared)) or run.name for run, o in zip(runs, overrides)]


def plot(runs: list[Path], output: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit('plot_runs: matplotlib is not installed; pip install "kdrun[plot]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, label) in enumerate(zip(runs, labels(runs))):
        data, color = curves(run), colors[i % len(colors)]
        for ax, (_, (train, test)) in zip(axes, PANELS):
            if train in data:
                ax.plot(*data[train], "-", color=color, alpha=0.5, linewidth=1)
            if test in data:
                ax.plot(*data[test], "o-", color=color, markersize=3, label=label)
    for ax, (title, _) in zip(axes, PANELS):
        ax.set(xlabel="epoch", ylabel=title, title=f"{title} (thin: train, dots: test)")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    ncols = 1 if max(map(len, names), default=0) > 50 else min(3, len(names))
    fig.legend(handles, names, loc="outside lower center", ncols=ncols, fontsize="small")
    fig.savefig(output, dpi=120)
    print(f"plot_runs: wrote {output} ({len(runs)} runs)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run dirs or sweep dirs")
    parser.add_argument("-o", "--output", default="runs.png")
    args = parser.parse_args(argv)
    plot(find_runs(args.dirs), args.output)


if __name__ == "__main__":
    main()
