"""Benchmark: what a KD step costs with the teacher-output cache (kdrun.cache), against a plain supervised
student step and a KD step that runs the teacher, on Fashion-MNIST with the default teacher (cnn, width 32)
and student (cnn_small, width 12). Prints step times and the two ratios; it asserts nothing.

    python scripts/bench_cache.py [--steps 40] [--repeats 5] [--views 4] [--device cpu] [overrides ...]

The teacher comes from kdrun's teacher cache (trained first if missing); the cached outputs from
paths.cache_dir/logits (built first if missing: one teacher pass over views x 60,000 images). A step is
what the engine's loop does per batch: draw the batch (with its augmentation), forward, backward and
optimizer step. The setups take turns, `repeats` times, and the median of each is reported.
"""

import argparse
import logging
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_module

from kdrun import cache, data as kdata, models
from kdrun.engine import Engine
from kdrun.methods.kd import KD
from kdrun.methods.supervised import Supervised
from kdrun.teacher import get_teacher


def setup(name, cfg, data, teacher, device):
    torch.manual_seed(0)
    student = models.build(cfg.student, data)
    method = (Supervised(student) if name == "supervised" else KD(student, teacher)).to(device)
    cfg.teacher.cache = name == "kd + cache"
    method.teacher_cache = cache.teacher_cache(method, data, cfg, device)
    loaders = kdata.Loaders(data, method.batch_spec, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device,
                            seed=0, cache=method.teacher_cache)
    engine = Engine(method, loaders, cfg.schedule, cfg.trainer, device=device)
    engine.optimizer, engine.scheduler = engine.make_optimizer(list(method.student.parameters()), cfg.schedule.epochs,
                                                               steps_per_epoch=len(loaders.train()))
    method.train()
    return method, engine.loop, iter(loaders.train())


def time_steps(method, loop, batches, steps: int, warmup: int = 3) -> float:
    """Seconds per step over `steps` steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        method.step(next(batches), loop)
    start = time.perf_counter()
    for _ in range(steps):
        method.step(next(batches), loop)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per turn")
    parser.add_argument("--repeats", type=int, default=5, help="turns per setup")
    parser.add_argument("--views", type=int, default=4, help="stored augmented views per image (teacher.cache_views)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="kdrun config overrides, e.g. schedule.batch_size=256")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the cache says what it does
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"teacher.cache_views={args.views}", *args.overrides])
    device = torch.device(args.device)
    data = kdata.build(cfg.dataset)
    teacher, _ = get_teacher(cfg, data, device)
    names = ["supervised", "kd", "kd + cache"]
    setups = {name: setup(name, cfg, data, teacher, device) for name in names}
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(time_steps(*setups[name], args.steps))
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    print(f"Fashion-MNIST, teacher {cfg.teacher.name} {dict(cfg.teacher.kwargs)} -> student {cfg.student.name} "
          f"{dict(cfg.student.kwargs)}, batch {cfg.schedule.batch_size}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} x {args.steps} steps, torch {torch.__version__}")
    for name in names:
        spread = ", ".join(f"{1e3 * t:.1f}" for t in times[name])
        print(f"  {name:<11} {ms[name]:7.2f} ms/step   (turns: {spread})")
    print(f"  KD-with-cache / supervised        = {ms['kd + cache'] / ms['supervised']:.3f}")
    print(f"  KD-with-cache / KD-without-cache  = {ms['kd + cache'] / ms['kd']:.3f}")
    print(f"  command: {' '.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")


if __name__ == "__main__":
    main()
