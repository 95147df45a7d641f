"""Training throughput of kdrun's engine against a minimal hand-written PyTorch loop, per step.

    python scripts/bench_throughput.py                  # KD and supervised, 5 repetitions of 40 steps
    python scripts/bench_throughput.py --method kd --steps 60 --repeats 9

Both sides train the same models (kdrun's default pair: teacher `cnn` width 32, student `cnn` width 12)
with the same loss, optimizer, batch (128) and data: Fashion-MNIST through kdrun's default data path,
as `kdrun` builds it. What differs is only the loop around the step, so the ratio measures the
engine's own per-step cost. Repetitions alternate between the two sides (and which goes first) in
one process; the ratio is the median of the per-repetition ratios, of wall time and of this process's
CPU time (steadier than wall time on a shared machine). Peak memory of each side is measured in a fresh
subprocess of its own: the peak RSS of the whole process, and (on Linux) the peak while training alone,
the peak being reset once the data is loaded. The teacher is left untrained: a step costs the same.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from kdrun import data as kdata, engine, models
from kdrun.run import seed_everything


class OneTestBatch(kdata.Loaders):
    """The run's loaders, but every evaluation is of one test batch: the benchmark times the training loop."""

    def evaluation(self, which=kdata.TEST):
        return [next(iter(super().evaluation(which)))]


def setup(method: str, steps: int):
    """kdrun's config, data and models for `method`, as `kdrun method=METHOD` composes them."""
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"method={method}", "trainer.device=cpu",
                                           f"trainer.max_steps={steps}", "trainer.log_every=50"])
    seed_everything(0)
    data = kdata.build(cfg.dataset)
    loaders = OneTestBatch(data, kdata.BatchSpec(), cfg.schedule.batch_size, cfg.trainer.eval_batch_size, "cpu", seed=0)
    teacher = models.build(cfg.teacher, data).eval() if method == "kd" else None
    student = models.build(cfg.student, data)
    return cfg, loaders, teacher, student


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since `start`."""
    return tuple(now - then for now, then in zip(clock(), start))


def kdrun_steps(cfg, loaders, teacher, student) -> tuple[float, float]:
    """Wall and CPU seconds for `trainer.max_steps` steps of kdrun's engine (its fit: optimizer set-up,
    loop, logging rows, one final evaluation on a single test batch; no run dir)."""
    method = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    start = clock()
    engine.train(method, loaders, cfg.schedule, cfg.trainer)
    return since(start)


def hand_steps(cfg, loaders, teacher, student) -> tuple[float, float]:
    """Wall and CPU seconds for the same steps in the loop one writes by hand."""
    train = loaders.train()
    start = clock()
    optimizer = instantiate(cfg.schedule.optimizer, params=student.parameters())  # the same optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.schedule.epochs * len(train))
    kd = teacher is not None
    T, alpha = (cfg.method.temperature, cfg.method.alpha) if kd else (1.0, 0.0)
    student.train()
    for step, batch in enumerate(train, 1):
        x, y = batch["image"], batch["label"]
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if kd:
            with torch.no_grad():
                t = teacher(x)
            soft = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
            loss = (1 - alpha) * loss + alpha * T * T * soft
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == cfg.trainer.max_steps:
            break
    student.eval()
    with torch.no_grad():
        student(loaders.evaluation()[0]["image"])
    return since(start)


SIDES = {"kdrun": kdrun_steps, "hand": hand_steps}


def compare(method: str, steps: int, repeats: int) -> dict:
    pieces = setup(method, steps)
    for fn in SIDES.values():  # warm-up: first-call costs (lazy imports, allocator) are not per-step costs
        fn(*pieces)
    ms = {side: [] for side in SIDES}  # per repetition: (wall, CPU) ms per step
    for r in range(repeats):
        for side in (SIDES if r % 2 == 0 else reversed(list(SIDES))):
            ms[side].append(tuple(1e3 * t / steps for t in SIDES[side](*pieces)))
        print(f"  {method} repetition {r + 1}: kdrun {ms['kdrun'][-1][0]:.2f}, hand {ms['hand'][-1][0]:.2f} ms/step",
              file=sys.stderr)
    out = {"method": method}
    for i, clock_name in enumerate(("wall", "cpu")):
        ratios = [k[i] / h[i] for k, h in zip(ms["kdrun"], ms["hand"])]
        out[clock_name] = {"kdrun": statistics.median(k[i] for k in ms["kdrun"]),
                           "hand": statistics.median(h[i] for h in ms["hand"]),
                           "ratio": statistics.median(ratios), "ratios": ratios}
    return out


def peak_rss_mb(method: str, side: str, steps: int, threads: int) -> dict:
    """Peak RSS (MiB) of a fresh process that sets up and runs `side`: of the process, and of training."""
    out = subprocess.run([sys.executable, __file__, "--only", side, "--method", method, "--steps", str(steps),
                          "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def measure_memory(side: str, method: str, steps: int) -> dict:
    """Run `side` once. Its peak RSS (MiB) and, on Linux, how far training raised RSS above what the set-up
    left (the peak counter, VmHWM, reset once the data and models are loaded)."""
    pieces = setup(method, steps)
    status = Path("/proc/self/status")

    def mib(field: str) -> float:
        return int(next(line for line in status.read_text().splitlines() if line.startswith(field)).split()[1]) / 1024

    if status.exists():
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        before = mib("VmRSS")
    SIDES[side](*pieces)
    out = {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if status.exists():
        out["training"] = mib("VmHWM") - before
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["kd", "supervised", "both"], default="both")
    parser.add_argument("--steps", type=int, default=40, help="steps per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    parser.add_argument("--only", choices=SIDES, help=argparse.SUPPRESS)  # one side, for its peak memory
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(measure_memory(args.only, args.method, args.steps)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.repeats} repetitions of "
          f"{args.steps} steps, batch 128, Fashion-MNIST, cnn32 -> cnn12")
    for method in (["kd", "supervised"] if args.method == "both" else [args.method]):
        r = compare(method, args.steps, args.repeats)
        for clock_name in ("wall", "cpu"):
            c = r[clock_name]
            print(f"{method:<10}  {clock_name:<4}  kdrun {c['kdrun']:7.2f} ms/step   hand {c['hand']:7.2f} ms/step   "
                  f"kdrun/hand {c['ratio']:.3f} (median; per repetition {' '.join(f'{x:.3f}' for x in c['ratios'])})")
        mem = {side: peak_rss_mb(method, side, args.steps, args.threads) for side in SIDES}
        print(f"{method:<10}  peak RSS  kdrun {mem['kdrun']['process']:.0f} MiB   hand {mem['hand']['process']:.0f} MiB"
              + (f"   added by training: kdrun {mem['kdrun']['training']:.1f} MiB   hand {mem['hand']['training']:.1f} MiB"
                 if "training" in mem["kdrun"] else ""))


if __name__ == "__main__":
    main()
