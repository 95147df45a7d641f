"""One run: compose the pieces the config names, train with the engine, write the summary."""

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from kdrun import data as kdata
from kdrun.engine import Engine
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger, plain_config
from kdrun.teacher import arch, build_model, get_teacher

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KdrunError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu")
    return torch.device(name)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(cfg: DictConfig, run_dir: str | Path, method_name: str | None = None) -> dict:
    """Train `cfg`'s student with `cfg`'s method; returns the summary also written to run_dir."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    seed_everything(cfg.seed)
    device = resolve_device(str(cfg.trainer.device))
    data = kdata.build(cfg.dataset)
    method_cls = get_class(cfg.method._target_)
    teacher, teacher_acc = get_teacher(cfg, data, device) if method_cls.needs_teacher else (None, None)

    seed_everything(cfg.seed)  # the student's start does not depend on whether the teacher was cached
    student = build_model(cfg.student, data)
    if teacher is not None:
        _check_classes(teacher, student, data)
    method = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher).to(device)
    if cfg.trainer.get("channels_last"):
        method.to(memory_format=torch.channels_last)
    if cfg.trainer.get("compile"):
        student.compile()
    train_loader, test_loader = kdata.loaders(data, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device,
                                              seed=cfg.seed, num_workers=cfg.trainer.num_workers)
    logger = RunLogger(run_dir, cfg.logger, plain_config(cfg))
    try:
        engine = Engine(method, train_loader, test_loader, cfg.schedule, cfg.trainer, run_dir=run_dir, logger=logger,
                        device=device, checkpoint_meta={"arch": arch(cfg.student, data)})
        summary = engine.fit()
        summary = {
            **summary,
            "teacher/test_acc": teacher_acc,
            "method": method_name or type(method).__name__.lower(),
            "dataset": data.name,
            "student": cfg.student.name,
            "teacher": cfg.teacher.name if teacher is not None else None,
            "student/params": n_params(student),
            "teacher/params": n_params(teacher) if teacher is not None else None,
            "seed": cfg.seed,
            "wall_s": round(time.perf_counter() - start, 3),
        }
        logger.summary(summary)
    finally:
        logger.close()
    return summary


def _check_classes(teacher: torch.nn.Module, student: torch.nn.Module, data: kdata.Data) -> None:
    x = torch.zeros(1, data.in_chans, data.image_size, data.image_size, device=next(teacher.parameters()).device)
    with torch.no_grad():
        t = teacher.eval()(x).shape[-1]
    if t != data.num_classes:
        raise KdrunError(f"the teacher predicts {t} classes but {data.name} has {data.num_classes}; give a teacher "
                         f"trained on {data.name} (teacher.checkpoint) or leave teacher.checkpoint unset to train one")


def format_summary(s: dict, run_dir) -> str:
    """The short table printed at the end of a run."""
    def k(n):
        return f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.2f}M"

    rows = [f"kdrun {s['method']} on {s['dataset']}: {s['teacher'] + ' -> ' if s['teacher'] else ''}{s['student']}"]
    if s["teacher/test_acc"] is not None:
        rows.append(f"  teacher  {s['teacher']:<14} params {k(s['teacher/params']):>7}   test acc {s['teacher/test_acc']:.4f}")
    rows.append(f"  student  {s['student']:<14} params {k(s['student/params']):>7}   test acc {s['test/acc']:.4f}"
                f"   (best {s['test/acc_best']:.4f})")
    rows.append(f"  time     {s['wall_s']:.1f} s   {s['steps']} steps   {s['train/samples_per_s']} train samples/s")
    rows.append(f"  run dir  {run_dir}")
    return "\n".join(rows)
