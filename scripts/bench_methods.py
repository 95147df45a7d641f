"""Benchmark: what one training step of every method costs, against a supervised step and a KD step.

    python scripts/bench_methods.py [--steps N] [--repeats R] [--methods a,b] [overrides ...]

Each method is built as `kdrun method=X` builds it on the default config (Fashion-MNIST, teacher cnn width 32,
student cnn_small width 12, batch 128; `overrides` change it, e.g. student=cnn for kdsvd), on the CPU, with the
teacher run every step (no logit cache) and left untrained: a step costs the same. A step is `method.step(batch,
loop)`: forward, losses, backward and optimizer step. A method of several stages is timed in each of them
(`fitnet/hint`, `fitnet/kd`, ...). All setups run in one process, after a few warm-up steps each: a turn is
`steps` rounds of one step of every setup; the table gives the median over `repeats` turns of ms/step and of
the ratios to supervised and KD within a turn.
The self-training methods (pseudo_label, offline_pseudo_label, noisy_student, mpl, data_distillation) need a
labeled split, the continual ones a scenario, and the data-free ones read no training batch: they are left out.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdrun import data as kdata, models
from kdrun.engine import Engine
from kdrun.models.ensemble import Ensemble
from kdrun.run import seed_everything

SELF_TRAINING = {"pseudo_label", "offline_pseudo_label", "noisy_student", "mpl", "data_distillation"}
# continual methods (they learn experiences in sequence, scenario=split) and data-free ones (no training batches)
OTHER_SETTINGS = {"lwf", "lwm", "ewc", "mas", "er", "dgr", "piggyback", "deepinversion", "dfad"}
# methods that cannot run on the default pair, and what they run on instead (compared with a KD step on that)
FALLBACK = {"fsp": ["student=cnn"], "kdsvd": ["student=cnn"], "multi_teacher": ["teachers=[cnn,cnn]"]}
CONF = Path(__file__).parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if p.stem not in SELF_TRAINING | OTHER_SETTINGS)


def forever(loader):
    while True:
        yield from loader


def build(cfg, data):
    """The method `cfg` names, its teacher untrained, set up as `kdrun.run.compose` does (without a logit cache)."""
    seed_everything(cfg.seed)
    if cfg.teachers:  # as kdrun.teacher.get_teachers composes them, each a preset name or a teacher config
        members = [OmegaConf.merge(cfg.teacher, OmegaConf.load(CONF / "teacher" / f"{t}.yaml")
                                   if isinstance(t, str) else t) for t in cfg.teachers]
        teacher = Ensemble([models.build(m, data) for m in members], [m.name for m in members]).eval()
    else:
        teacher = models.build(cfg.teacher, data).eval()
    student = models.build(cfg.student, data)
    method = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    method.setup(data)
    return method


def in_stage(method, cfg, data, i: int):
    """One training step of `method` in its i-th stage, as a function of no arguments."""
    stage = method.stages(cfg.schedule.epochs)[i]
    loaders = kdata.Loaders(data, method.batch_spec, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, "cpu",
                            seed=cfg.seed)
    engine = Engine(method, loaders, cfg.schedule, cfg.trainer)
    engine.train_loader = loaders.train(stage.data)
    params = stage.params if stage.params is not None else [p for p in method.parameters() if p.requires_grad]
    engine.optimizer, engine.scheduler = engine.make_optimizer(params, stage.epochs,
                                                               steps_per_epoch=len(engine.train_loader))
    method.on_stage_start(stage, engine.loop)
    method.train()
    batches = forever(engine.train_loader)
    return lambda: method.step(next(batches), engine.loop)


def setups(name: str, overrides: list[str], data=None):
    """{label: step} for each stage of method `name` (a fresh method per stage), and the data."""
    with initialize_config_module(config_module="kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", f"method={name}", "trainer.device=cpu", *overrides])
    data = data or kdata.build(cfg.dataset)
    stages = build(cfg, data).stages(cfg.schedule.epochs)
    if len(stages) == 1:
        return {name: in_stage(build(cfg, data), cfg, data, 0)}, data
    return {f"{name}/{s.name}": in_stage(build(cfg, data), cfg, data, i) for i, s in enumerate(stages)}, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per turn")
    parser.add_argument("--repeats", type=int, default=5, help="turns per setup")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup before the first turn")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (supervised and kd always run)")
    parser.add_argument("overrides", nargs="*", help="kdrun config overrides, e.g. student=cnn")
    args = parser.parse_args()
    names = ["supervised", "kd"] + [m for m in args.methods.split(",") if m not in ("supervised", "kd")]
    runs, refs, data, skipped = {}, {}, None, {}  # refs: the label of the KD step each step is compared with
    for name in names:
        extra = [] if args.overrides else FALLBACK.get(name, [])
        tag = f" [{' '.join(extra)}]" if extra else ""
        for method in (["kd", name] if extra and f"kd{tag}" not in runs else [name]):
            try:
                built, data = setups(method, args.overrides + extra, data)
            except Exception as e:  # e.g. a method that needs equal channel counts, on a pair without them
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
                break
            for label, step in built.items():
                for _ in range(args.warmup):
                    step()
                runs[label + tag], refs[label + tag] = step, f"kd{tag}"
    times = {label: [0.0] * args.repeats for label in runs}  # seconds per step, per turn
    for r in range(args.repeats):
        for _ in range(args.steps):  # one step of each setup in turn: a change of the machine's load hits all alike
            for label, step in runs.items():
                start = time.perf_counter()
                step()
                times[label][r] += (time.perf_counter() - start) / args.steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, overrides {args.overrides}: "
          f"median of {args.repeats} turns of {args.steps} steps")
    print(f"{'method':<34} {'ms/step':>8} {'x supervised':>13} {'x KD':>6}")
    for label, t in times.items():
        ratio = {ref: statistics.median(a / b for a, b in zip(t, times[ref])) for ref in ("supervised", refs[label])}
        print(f"{label:<34} {1e3 * statistics.median(t):8.2f} {ratio['supervised']:13.2f} {ratio[refs[label]]:6.2f}")
    for name, why in skipped.items():
        print(f"{name:<34} skipped: {why}")


if __name__ == "__main__":
    main()
