"""`kdrun-plot`: curves of kdrun runs against epoch, to a PNG, offline (pip install "kdrun[plot]").

    kdrun-plot outputs/multirun/2025-01-01/10-00-00 [more run or sweep dirs] -o runs.png

Reads each run dir's metrics.jsonl (sweep dirs are searched for run dirs). Three panels: the training objective
(`train/loss`, the method's whole loss), the test loss and the test accuracy, with the teachers' test accuracy
as a dashed line. Runs that differ only in their seed are one curve, the mean over the seeds with a band of
± one standard deviation; curves are coloured by method (line styles tell apart settings of one method) and
labelled by the overrides that tell them from the others.
"""

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

PANELS = [("train/loss", "training objective"), ("test/loss", "test loss"), ("test/acc", "test accuracy")]
STYLES = ["-", "--", ":", "-."]


@dataclass
class Run:
    """A run dir's curves (metric -> {epoch: value}), overrides, method and teacher accuracy."""

    path: Path
    curves: dict[str, dict[float, float]] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    method: str = "?"
    teacher_acc: float | None = None


def load(path: Path) -> Run:
    run = Run(path)
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in row.items():
            if "/" in name and isinstance(value, (int, float)) and "epoch" in row:
                run.curves.setdefault(name, {})[round(row["epoch"], 6)] = value
    hydra = path / ".hydra"
    if (hydra / "overrides.yaml").is_file():
        run.overrides = list(OmegaConf.load(hydra / "overrides.yaml"))
    if (hydra / "hydra.yaml").is_file():
        run.method = str(OmegaConf.load(hydra / "hydra.yaml").hydra.runtime.choices.get("method", "?"))
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
        run.method = summary.get("method") or run.method
        run.teacher_acc = summary.get("teacher/test_acc")
    return run


def find_runs(dirs: list[str]) -> list[Run]:
    runs = []
    for d in map(Path, dirs):
        found = sorted(p.parent for p in d.glob("**/metrics.jsonl"))
        if not found:
            sys.exit(f"kdrun-plot: no metrics.jsonl under {d}; give run dirs or sweep dirs kdrun wrote")
        runs += map(load, found)
    return runs


def groups(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by their overrides other than `seed`, each group labelled by the overrides that differ
    between the groups (its method when none do)."""
    def setting(run: Run) -> frozenset[str]:
        return frozenset(o for o in run.overrides if not o.lstrip("+~").startswith("seed="))

    by_setting: dict[frozenset[str], list[Run]] = {}
    for run in runs:
        by_setting.setdefault(setting(run), []).append(run)
    shared = frozenset.intersection(*by_setting) if by_setting else frozenset()
    return {(" ".join(sorted(s - shared)) or members[0].method): members for s, members in by_setting.items()}


def mean_std(runs: list[Run], metric: str) -> tuple[list[float], list[float], list[float]]:
    """Epochs, mean and standard deviation over the runs that have `metric` at that epoch."""
    at: dict[float, list[float]] = {}
    for run in runs:
        for epoch, value in run.curves.get(metric, {}).items():
            at.setdefault(epoch, []).append(value)
    epochs = sorted(at)
    means = [statistics.fmean(at[e]) for e in epochs]
    stds = [statistics.stdev(at[e]) if len(at[e]) > 1 else 0.0 for e in epochs]
    return epochs, means, stds


def plot(runs: list[Run], output: str) -> None:
    try:
        import matplotlib
    except ImportError:
        sys.exit('kdrun-plot: matplotlib is not installed; pip install "kdrun[plot]"')
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5.5 * len(PANELS), 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grouped = groups(runs)
    methods = sorted({members[0].method for members in grouped.values()})
    styles_used: dict[str, int] = {}
    for label, members in sorted(grouped.items()):
        method = members[0].method
        color = colors[methods.index(method) % len(colors)]
        style = STYLES[styles_used.get(method, 0) % len(STYLES)]
        styles_used[method] = styles_used.get(method, 0) + 1
        seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
        for ax, (metric, _) in zip(axes, PANELS):
            epochs, means, stds = mean_std(members, metric)
            if not epochs:
                continue
            ax.plot(epochs, means, style, color=color, label=label + seeds, marker="o" if len(epochs) < 30 else None,
                    markersize=3)
            if seeds:
                ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                                color=color, alpha=0.2, linewidth=0)
    for acc in sorted({r.teacher_acc for r in runs if r.teacher_acc is not None}):
        axes[-1].axhline(acc, color="0.3", linestyle="--", linewidth=1, label=f"teacher {acc:.4f}")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
    handles, names = axes[-1].get_legend_handles_labels()
    ncols = 1 if max(map(len, names), default=0) > 50 else min(3, len(names))
    fig.legend(handles, names, loc="outside lower center", ncols=max(ncols, 1), fontsize="small")
    fig.savefig(output, dpi=120)
    print(f"kdrun-plot: wrote {output} ({len(runs)} runs, {len(grouped)} curves)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kdrun-plot", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("dirs", nargs="+", help="run dirs or sweep dirs")
    parser.add_argument("-o", "--output", default="runs.png")
    args = parser.parse_args(argv)
    plot(find_runs(args.dirs), args.output)


if __name__ == "__main__":
    main()
