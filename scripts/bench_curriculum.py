"""Benchmark: the curricula (kdrun/curriculum.py) against the same runs without them, at equal epochs: Fashion-MNIST's
default job (kd, cnn -> cnn_small, AdamW cosine, 4 epochs) with and without `curriculum=efficienttrain`, and with
`curriculum=easy_first`; plus the supervised student alone with and without EfficientTrain (the paper's setting).
Prints a markdown table (mean +- std over seeds) and writes it, with one CSV row per run, to --out.

    python scripts/bench_curriculum.py [--seeds 0 1 2] [--arms ...] [--out DIR] [overrides ...]
    python scripts/bench_curriculum.py --dry-run      # digits, 2 epochs, one seed: checks the script, measures nothing

Columns: test/acc at the end (summary.json), wall_s (the whole run), train_s (the training steps alone, summed from
metrics.jsonl's train/samples_per_s rows), and `to_base_s`: the training seconds until the run's first evaluation at
or above its baseline's final test accuracy (same seed; "-" when it never gets there). The default KD job reads the
teacher's logits from the teacher-output cache; EfficientTrain changes the images the teacher sees, so its teacher
runs every step: `kd (no cache)` is the baseline on that footing. Runs go one after another (one CPU job at a time).
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ARMS = {  # name -> (overrides, the arm it is compared against)
    "kd": ([], None),
    "kd (no cache)": (["teacher.cache=false"], None),
    "kd + efficienttrain": (["curriculum=efficienttrain"], "kd"),
    "kd + efficienttrain (crop only)": (["curriculum=efficienttrain", "curriculum.num_ops=0"], "kd"),
    "kd + easy_first": (["curriculum=easy_first"], "kd"),
    "supervised": (["method=supervised"], None),
    "supervised + efficienttrain": (["method=supervised", "curriculum=efficienttrain"], "supervised"),
    "supervised + efficienttrain (crop only)": (["method=supervised", "curriculum=efficienttrain",
                                                 "curriculum.num_ops=0"], "supervised"),
}


def run(name: str, seed: int, out: Path, overrides: list[str]) -> Path:
    run_dir = out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus") / f"seed{seed}"
    if not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "kdrun", *ARMS[name][0], *overrides, f"seed={seed}", "logger=none",
               f"hydra.run.dir={run_dir}"]
        print("$", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return run_dir


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds so far, test/acc) at each evaluation, from metrics.jsonl."""
    seconds, last_step, batch, points = 0.0, 0, None, []
    config = run_dir / ".hydra" / "config.yaml"
    for line in config.read_text().splitlines():  # schedule.batch_size, without importing omegaconf
        if line.strip().startswith("batch_size:") and batch is None:
            batch = int(line.split(":")[1])
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "train/samples_per_s" in row:
            seconds += (row["step"] - last_step) * batch / row["train/samples_per_s"]
            last_step = row["step"]
        if "test/acc" in row:
            points.append((seconds, row["test/acc"]))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_curriculum"))
    parser.add_argument("--dry-run", action="store_true", help="digits, 2 epochs, seed 0: check the script only")
    parser.add_argument("overrides", nargs="*", help="kdrun overrides for every arm, e.g. schedule.epochs=8")
    args = parser.parse_args()
    if args.dry_run:
        args.seeds, args.overrides = [0], ["dataset=digits", "schedule.epochs=2", *args.overrides]
        args.out = args.out / "dry_run"
    arms = list(dict.fromkeys(a for name in args.arms for a in (ARMS[name][1], name) if a))  # baselines first
    rows = []
    for seed in args.seeds:
        for name in arms:
            run_dir = run(name, seed, args.out, args.overrides)
            summary = json.loads((run_dir / "summary.json").read_text())
            points = curve(run_dir)
            rows.append({"arm": name, "seed": seed, "test_acc": summary["test/acc"], "wall_s": summary["wall_s"],
                         "train_s": points[-1][0] if points else None, "curve": points, "dir": str(run_dir)})
    by = {(r["arm"], r["seed"]): r for r in rows}
    for r in rows:
        base = ARMS[r["arm"]][1]
        target = by[(base, r["seed"])]["test_acc"] if base else None
        r["to_base_s"] = next((s for s, acc in r["curve"] if acc >= target), None) if base else None

    def cell(values, digits):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.{digits}f}{sd}"

    lines = ["| arm | test/acc | wall_s | train_s | to_base_s (reached) |", "| --- | --- | --- | --- | --- |"]
    for name in arms:
        rs = [r for r in rows if r["arm"] == name]
        reached = f" ({sum(r['to_base_s'] is not None for r in rs)}/{len(rs)})" if ARMS[name][1] else ""
        lines.append(f"| {name} | {cell([r['test_acc'] for r in rs], 4)} | {cell([r['wall_s'] for r in rs], 1)} | "
                     f"{cell([r['train_s'] for r in rs], 1)} | {cell([r['to_base_s'] for r in rs], 1)}{reached} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(f"seeds {args.seeds}, overrides {args.overrides}\n\n{table}\n")
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["arm", "seed", "test_acc", "wall_s", "train_s", "to_base_s", "dir"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
