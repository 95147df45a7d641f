"""Representation consolidation at CPU scale (issue 16; Li et al. 2021, arXiv 2107.08039): the table of its two
claims, on Fashion-MNIST and scikit-learn's digits, for N seeds.

    python scripts/consolidation_table.py --seeds 0 1 2 --out outputs/consolidation
    python scripts/consolidation_table.py --tiny --seeds 0 --out /tmp/consolidation_dry   # a dry run, ~minutes

The protocol (every run a `kdrun` command, logger=none, its own hydra.run.dir under --out; a run whose
summary.json exists is reused, so a rerun adds seeds or finishes what was cut off). Per seed:

1. generalist: method=supervised on Fashion-MNIST classes GENERALIST = [1, 3, 5, 7, 8, 9] (trouser, dress, sandal,
   sneaker, bag, ankle boot), the stand-in for the paper's ImageNet model;
2. task teacher: fine-tuned from the generalist (student.init) on the task TASK = [5, 7, 9] (footwear), as the
   paper's task teachers are fine-tuned from the generalist;
3. KD student: method=kd from the task teacher alone, alpha=1 (no labels: the task's images as an unlabeled proxy);
4. consolidated student: method=consolidation from [generalist, task teacher] (task_head=1, ce_weight=0), on the
   same images, the same epochs and temperature.
Both students have the teachers' architecture and start from the generalist (student.init), so the difference
between them is the generalist's head alone, and claim 1 asks whether KD from the task teacher *erodes* the
representation the student started with (`--students-from scratch`: both start from random weights, so the
question becomes what each learns from its teachers on the task's images alone; `--proxy generalist`: both
students distil on the generalist's six classes instead of the task's three, the paper's proxy broader than the
task, the task head being the classifier's outputs of the task's classes, `method.task_classes`). All four runs
end with the same transfer evaluation (`transfer=`, default fashion_tops_digits): the classifier input of the
run's model, probed on downstream tasks that none of them was trained or distilled on: Fashion-MNIST tops [0, 2, 4, 6] (T-shirt, pullover, coat, shirt: the same
domain, classes none of the models saw) and scikit-learn's digits (another domain).

The paper's claims, checked on the means over seeds and printed under the table:
  1. the plain-KD student transfers worse than the generalist;
  2. the consolidated student transfers better than both teachers, and keeps the task accuracy (its test accuracy
     on footwear within --keep of the task teacher's).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

GENERALIST = [1, 3, 5, 7, 8, 9]
TASK = [5, 7, 9]
ROWS = ("generalist", "task_teacher", "kd_student", "consolidated")
PROTOCOLS = ("linear_probe", "finetune")


def _classes(classes: list[int]) -> str:
    return "dataset.classes=[" + ",".join(map(str, classes)) + "]"


def kdrun(run_dir: Path, overrides: list[str]) -> dict:
    """The summary of the `kdrun` run in `run_dir`, running it first unless its summary.json exists."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "kdrun", *overrides, "logger=none", f"hydra.run.dir={run_dir}"]
        print("$ kdrun " + " ".join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def seed_runs(out: Path, seed: int, args) -> dict[str, dict]:
    """The four runs of one seed (see the module docstring); their summaries by row name."""
    base = ["dataset=fashion_mnist", f"student={args.model}", f"seed={seed}", f"transfer={args.transfer}",
            f"transfer.protocols=[{args.protocols}]", *args.extra]
    d = out / f"seed{seed}"

    def best(name: str) -> str:
        return str(d / name / "checkpoints" / "best.pt")

    runs = {"generalist": kdrun(d / "generalist", [*base, "method=supervised", _classes(GENERALIST),
                                                   f"schedule.epochs={args.epochs}"])}
    runs["task_teacher"] = kdrun(d / "task_teacher", [*base, "method=supervised", _classes(TASK),
                                                      f"student.init={best('generalist')}",
                                                      f"schedule.epochs={args.finetune_epochs}"])
    start = [f"student.init={best('generalist')}"] if args.students_from == "generalist" else []
    suffix = _suffix(args)
    student = [*base, *start, f"schedule.epochs={args.epochs}", f"method.temperature={args.temperature}"]
    generalist, task = (f"{{checkpoint: '{best(name)}'}}" for name in ("generalist", "task_teacher"))
    if args.proxy == "task":
        runs["kd_student"] = kdrun(d / f"kd_student{suffix}", [*student, _classes(TASK), "method=kd", "method.alpha=1.0",
                                                               f"teacher={args.model}",
                                                               f"teacher.checkpoint={best('task_teacher')}"])
        proxy = [_classes(TASK)]
    else:  # the generalist's images: the task head is the classifier's outputs of TASK's classes, plain KD one head
        proxy = [_classes(GENERALIST), f"method.task_classes=[{','.join(str(GENERALIST.index(c)) for c in TASK)}]"]
        runs["kd_student"] = kdrun(d / f"kd_student{suffix}", [*student, *proxy, "method=consolidation",
                                                               f"method.teachers=[{task}]", "method.task_head=0"])
    runs["consolidated"] = kdrun(d / f"consolidated{suffix}", [*student, *proxy, "method=consolidation",
                                                               f"method.teachers=[{generalist}, {task}]",
                                                               "method.task_head=1", "method.ce_weight=0.0"])
    return runs


def _suffix(args) -> str:
    """The students' run-dir (and table) suffix: empty for the default protocol."""
    return ("" if args.students_from == "generalist" else f"_from_{args.students_from}") + \
        ("" if args.proxy == "task" else f"_proxy_{args.proxy}")


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{100 * mean:.2f}"


def _protocol(key: str) -> str:
    """The protocol of a transfer summary key: transfer/<task>/acc is the linear probe's, .../finetune/acc a fine-tune's."""
    return "finetune" if key.endswith("/finetune/acc") else "linear_probe"


def table(results: list[dict[str, dict]]) -> tuple[str, dict]:
    """The markdown table (mean ± std over seeds, in %) and the means it was made of (per protocol, the mean over
    the downstream tasks as `transfer/<protocol>/mean`)."""
    keys = sorted({k for r in results for s in r.values() for k in s
                   if k.startswith("transfer/") and k.endswith("/acc")},
                  key=lambda k: (PROTOCOLS.index(_protocol(k)), k))
    protocols = sorted({_protocol(k) for k in keys}, key=PROTOCOLS.index)
    values = {row: {c: [r[row][c] for r in results if r[row].get(c) is not None] for c in ["test/acc", *keys]}
              for row in ROWS}
    for row in ROWS:
        for p in protocols:  # per seed, the mean over the tasks
            values[row][f"transfer/{p}/mean"] = [statistics.mean(r[row][k] for k in keys if _protocol(k) == p)
                                                 for r in results if all(r[row].get(k) is not None for k in keys)]
    columns = ["test/acc", *keys, *(f"transfer/{p}/mean" for p in protocols)]
    means = {row: {c: statistics.mean(v) if (v := values[row][c]) else None for c in columns} for row in ROWS}
    head = ["model", "task acc (footwear)", *(k.removeprefix("transfer/").removesuffix("/acc") for k in keys),
            *(f"{p} mean" for p in protocols)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in ROWS:
        cells = ["– (6 classes)" if row == "generalist" and c == "test/acc" else _cell(values[row][c]) for c in columns]
        lines.append(f"| {row.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines), means


def claims(means: dict, keep: float) -> list[str]:
    """The paper's two claims, per transfer protocol, each a line saying whether these means bear it out."""
    protocols = [c.split("/")[1] for c in means["consolidated"] if c.endswith("/mean")]
    if not protocols:
        return ["claims: no transfer results in the summaries (was transfer= given?)"]
    task, cons = means["task_teacher"]["test/acc"], means["consolidated"]["test/acc"]
    lines = []
    for p in protocols:
        t = {row: means[row][f"transfer/{p}/mean"] for row in ROWS}
        one = t["kd_student"] < t["generalist"]
        two = t["consolidated"] > max(t["generalist"], t["task_teacher"]) and cons >= task - keep
        lines += [(f"{p}: claim 1 (plain KD transfers worse than the generalist) {'holds' if one else 'does not hold'}"
                  f" ({100 * t['kd_student']:.2f} vs {100 * t['generalist']:.2f}); claim 2 (consolidated transfers "
                  f"better than both teachers and keeps the task accuracy) {'holds' if two else 'does not hold'} "
                  f"(transfer {100 * t['consolidated']:.2f} vs generalist {100 * t['generalist']:.2f}, task teacher "
                  f"{100 * t['task_teacher']:.2f}; task acc {100 * cons:.2f} vs the task teacher's {100 * task:.2f}, "
                  f"allowed drop {100 * keep:.1f})")]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("outputs/consolidation"))
    p.add_argument("--model", default="cnn", help="the student preset of every run (teachers and students alike)")
    p.add_argument("--epochs", type=int, default=5, help="the generalist's and the students' epochs")
    p.add_argument("--finetune-epochs", type=int, default=3, help="the task teacher's fine-tuning epochs")
    p.add_argument("--temperature", type=float, default=2.0, help="the KD temperature of both students")
    p.add_argument("--transfer", default="fashion_tops_digits", help="the transfer= preset every run ends with")
    p.add_argument("--protocols", default="linear_probe,finetune", help="the transfer protocols (transfer.protocols)")
    p.add_argument("--keep", type=float, default=0.01, help="the task-accuracy drop claim 2 still calls kept")
    p.add_argument("--students-from", choices=["generalist", "scratch"], default="generalist",
                   help="where both students start: the generalist's weights (student.init) or random weights; "
                        "scratch runs go to <seed>/kd_student_from_scratch/ and consolidated_from_scratch/")
    p.add_argument("--proxy", choices=["task", "generalist"], default="task",
                   help="the students' (unlabeled) training images: the task's, or the generalist's six classes (the "
                        "task's three among them; the KD student is then method=consolidation with the task teacher "
                        "alone); generalist runs go to <seed>/kd_student_proxy_generalist/ and so on")
    p.add_argument("--tiny", action="store_true", help="a dry run: one epoch of 5 steps per run")
    p.add_argument("--extra", nargs="*", default=[], help="more kdrun overrides for every run")
    args = p.parse_args(argv)
    if args.tiny:
        args.epochs = args.finetune_epochs = 1
        args.extra = ["trainer.max_steps=5", *args.extra]
    results = [seed_runs(args.out.resolve(), s, args) for s in args.seeds]
    text, means = table(results)
    lines = [(f"Representation consolidation, Fashion-MNIST generalist {GENERALIST} -> task {TASK}, "
              f"{len(args.seeds)} seed(s), students from {args.students_from}, proxy: the {args.proxy}'s images, "
              "accuracy in %:"), "", text, "", *claims(means, args.keep)]
    print("\n".join(lines))
    name = "table" + _suffix(args)
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"seeds": args.seeds, "means": means}, indent=1) + "\n")


if __name__ == "__main__":
    main()
