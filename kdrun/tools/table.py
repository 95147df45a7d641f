"""`kdrun-table`: a paper-style markdown table of test accuracy from kdrun run dirs, offline.

    kdrun-table outputs/multirun/2025-01-01/10-00-00 [more dirs]
    kdrun-table SWEEP --rows method --cols teacher,student --protocol best-test --reference crd.yaml

Every run dir under the given dirs (one holding summary.json) is a sample. Rows and columns are
chosen by keys: an override (`method.temperature`), a config group (`method`, `teacher`: the chosen
option) or any config value (`student.name`); several keys joined by commas make one label
("resnet56/resnet20"). Runs in one cell differ only in their seed: the cell shows the mean ± sample
standard deviation, in percent. A reference YAML ({row: {column: accuracy in %}}) adds the published
number and our difference to it beside each cell. `--protocol`: the last epoch's test accuracy (`last`), the
test accuracy at the epoch of best validation accuracy (`best`; runs with `dataset.val_size`), or the best test
accuracy over the epochs (`best-test`: as mdistiller reports the CRD table, in which the test set chooses).
`--metrics` shows other summary keys instead, one column each (per column label): a continual run's
`cl/class_il/acc,cl/task_il/acc`, say; accuracies and backward transfer in percent.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

PROTOCOLS = {"last": ("test/acc", "at the last epoch"),
             "best": ("test/acc_at_best_val", "at the epoch of best validation accuracy"),
             "best-test": ("test/acc_best", "at the best epoch by test accuracy (the benchmark's protocol)")}


class Run:
    """A finished run dir: its summary, overrides, config-group choices and config."""

    def __init__(self, path: Path):
        self.path = path
        self.summary = json.loads((path / "summary.json").read_text())
        hydra = path / ".hydra"
        self.overrides = dict(o.lstrip("+~").split("=", 1) for o in OmegaConf.load(hydra / "overrides.yaml") if "=" in o)
        self.choices = OmegaConf.load(hydra / "hydra.yaml").hydra.runtime.choices
        self.config = OmegaConf.load(hydra / "config.yaml")

    def value(self, key: str) -> str:
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return str(self.choices[key])
        found = OmegaConf.select(self.config, key, default=self.summary.get(key))
        if found is None:
            sys.exit(f"kdrun-table: {self.path} has no '{key}'; choose --rows/--cols among its overrides "
                     f"({', '.join(self.overrides) or 'none'}) or config keys")
        return str(found)

    def label(self, keys: list[str]) -> str:
        return "/".join(self.value(k) for k in keys)


def find_runs(dirs: list[str]) -> tuple[list[Run], int]:
    """The finished runs under `dirs`, and how many run dirs there have no summary (failed, unfinished)."""
    runs, unfinished = [], 0
    for d in dirs:
        for hydra in sorted(Path(d).glob("**/.hydra")):
            if (hydra.parent / "summary.json").is_file():
                runs.append(Run(hydra.parent))
            else:
                unfinished += 1
    return runs, unfinished


def _order(labels) -> list[str]:
    def key(label):
        try:
            return (0, float(label), "")
        except ValueError:
            return (1, 0.0, label)
    return sorted(set(labels), key=key)


def _check_cell(cell: list[Run], keys: set[str]) -> None:
    """The runs of one cell may differ in their seed only."""
    differ = sorted(k for k in set().union(*(r.overrides for r in cell)) - keys - {"seed"}
                    if len({r.overrides.get(k) for r in cell}) > 1)
    if differ:
        sys.exit(f"kdrun-table: the runs of one cell differ in {', '.join(differ)}; add it to --rows or --cols "
                 "(or pass dirs of comparable runs)")


def _fmt(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def table(runs: list[Run], rows: list[str], cols: list[str], protocol: str, reference: dict | None = None,
          digits: int = 2, teacher_row: bool = False, metrics: list[str] | None = None) -> str:
    metric, when = PROTOCOLS[protocol]
    metrics = metrics or [metric]
    cells: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        cells.setdefault((r.label(rows), r.label(cols)), []).append(r)
    for cell in cells.values():
        _check_cell(cell, set(rows) | set(cols))
    row_labels, col_labels = _order(k[0] for k in cells), _order(k[1] for k in cells)
    reference = reference or {}

    def text(row: str, col: str, values: list[float]) -> str:
        if not values:
            return "–"
        out = _fmt(values, digits)
        ref = (reference.get(row) or {}).get(col)
        if ref is not None:
            out += f" ({float(ref):.{digits}f}, {statistics.fmean(values) - float(ref):+.{digits}f})"
        return out

    columns = [(c, m) for c in col_labels for m in metrics]
    names = [c if len(metrics) == 1 else m if len(col_labels) == 1 else f"{c} {m}" for c, m in columns]
    head = f"| {'/'.join(rows)} \\ {'/'.join(cols)} | " + " | ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(columns) + 1)]
    if teacher_row:
        def teachers(col: str) -> list[float]:  # one value per distinct teacher: runs share a cached one
            return sorted({100 * r.summary["teacher/test_acc"] for (_, c), cell in cells.items() if c == col
                           for r in cell if r.summary.get("teacher/test_acc") is not None})
        lines.append("| teacher | " + " | ".join(_fmt(teachers(c), digits) if teachers(c) else "–" for c, _ in columns)
                     + " |")
    for row in row_labels:
        values = [[100 * r.summary[m] for r in cells.get((row, c), []) if r.summary.get(m) is not None]
                  for c, m in columns]
        lines.append(f"| {row} | " + " | ".join(text(row, c, v) for (c, _), v in zip(columns, values)) + " |")
    seeds = sorted({len(cell) for cell in cells.values()})
    n = f"{seeds[0]} run{'s' if seeds[0] > 1 else ''}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]} runs"
    datasets = ", ".join(sorted({str(r.summary.get("dataset")) for r in runs}))
    what = f"Top-1 test accuracy (%) on {datasets} {when}" if metrics == [metric] else \
        f"{', '.join(metrics)} (x100) on {datasets}"
    caption = f"{what}, mean ± std over {n} (seeds) per cell."
    if reference:
        caption += " In parentheses: the reference number and our difference to it."
    return "\n".join(lines) + f"\n\n{caption}\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="kdrun-table", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("dirs", nargs="+", help="sweep dirs or run dirs (searched recursively)")
    parser.add_argument("--rows", default="method", help="comma-separated keys naming the rows (default: method)")
    parser.add_argument("--cols", default="teacher,student", help="keys naming the columns (default: teacher,student)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="last", help="which accuracy of a run (default: last)")
    parser.add_argument("--reference", help="YAML of reference accuracies in %%: {row: {column: value}}")
    parser.add_argument("--metrics", help="comma-separated summary keys to show instead of --protocol's accuracy")
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--teacher-row", action="store_true", help="add a row with the teachers' accuracy")
    parser.add_argument("-o", "--output", help="write the table here too")
    args = parser.parse_args(argv)
    runs, unfinished = find_runs(args.dirs)
    if not runs:
        sys.exit(f"kdrun-table: no finished run (a dir with summary.json) under {' '.join(args.dirs)}")
    metric = PROTOCOLS[args.protocol][0]
    metrics = args.metrics.split(",") if args.metrics else None
    unknown = [m for m in metrics or () if all(m not in r.summary for r in runs)]
    if unknown:
        sys.exit(f"kdrun-table: no run's summary.json has {', '.join(unknown)}; choose --metrics among its keys")
    lacking = [str(r.path) for r in runs if r.summary.get(metric) is None]
    if lacking and not metrics:
        sys.exit(f"kdrun-table: {len(lacking)} run(s) have no {metric} (e.g. {lacking[0]}); --protocol best needs runs "
                 "with a validation split (dataset.val_size): use --protocol last, or best-test for the best test epoch")
    if unfinished:
        print(f"kdrun-table: left out {unfinished} run dir(s) without summary.json (failed or unfinished)",
              file=sys.stderr)
    reference = OmegaConf.to_container(OmegaConf.load(args.reference)) if args.reference else None
    out = table(runs, args.rows.split(","), args.cols.split(","), args.protocol, reference, args.digits,
                args.teacher_row, metrics)
    print(out, end="")
    if args.output:
        Path(args.output).write_text(out)


if __name__ == "__main__":
    main()
