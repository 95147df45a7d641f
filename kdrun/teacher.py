"""Where the teacher comes from: a checkpoint, the cache, or a supervised run of the same engine.

A teacher trained here is cached under `paths.cache_dir/teachers/<key>/`, the key a hash of
everything that determines it (dataset, architecture, schedule, seed, step limit, precision),
so the next run with the same teacher reuses it at once.
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint, data as kdata, models
from kdrun.engine import Engine, evaluate
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.methods.supervised import Supervised

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig, data: kdata.Data) -> torch.nn.Module:
    """A model preset (the `teacher` or `student` group) at the dataset's classes and channels."""
    kwargs = OmegaConf.to_container(cfg.kwargs, resolve=True)
    return models.create(cfg.name, data.num_classes, in_chans=data.in_chans, pretrained=cfg.get("pretrained", False), **kwargs)


def arch(cfg: DictConfig, data: kdata.Data) -> dict:
    """What a checkpoint records of its model, to rebuild it and to explain a mismatch."""
    return {"name": cfg.name, "kwargs": OmegaConf.to_container(cfg.kwargs, resolve=True), "dataset": data.name,
            "num_classes": data.num_classes, "in_chans": data.in_chans}


def cache_key(cfg: DictConfig) -> str:
    """A short hash of what determines a trained teacher; paths and download flags do not count."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    dataset["source"] = {k: v for k, v in dataset["source"].items() if k not in ("root", "download")}
    schedule = OmegaConf.to_container(cfg.schedule, resolve=True)
    schedule["epochs"] = cfg.teacher.epochs
    what = {
        "dataset": dataset, "schedule": schedule, "seed": cfg.teacher.seed,
        "teacher": {k: OmegaConf.to_container(cfg.teacher, resolve=True).get(k) for k in ("name", "kwargs", "pretrained")},
        "max_steps": cfg.trainer.get("max_steps"), "precision": str(cfg.trainer.precision),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def get_teacher(cfg: DictConfig, data: kdata.Data, device) -> tuple[torch.nn.Module, float]:
    """The teacher for this run and its test accuracy."""
    teacher = build_model(cfg.teacher, data)
    if cfg.teacher.get("checkpoint"):
        saved = checkpoint.load(cfg.teacher.checkpoint).get("arch", {})
        if saved.get("num_classes", data.num_classes) != data.num_classes:
            raise KdrunError(f"the teacher checkpoint {cfg.teacher.checkpoint} predicts {saved['num_classes']} classes "
                             f"({saved.get('dataset')}) but {data.name} has {data.num_classes}; give a teacher trained "
                             "on this dataset, or leave teacher.checkpoint unset to train one")
        ckpt = checkpoint.load_weights(teacher, cfg.teacher.checkpoint, what="teacher")
        teacher.to(device)
        acc = ckpt.get("test_acc") if ckpt.get("arch", {}).get("dataset") == data.name else None
        if acc is None:
            acc = evaluate(teacher, _test_loader(cfg, data, device))["acc"]
        return teacher, acc
    if cfg.teacher.epochs == 0:  # e.g. a pretrained timm/torchvision model used as it is
        teacher.to(device)
        return teacher, evaluate(teacher, _test_loader(cfg, data, device))["acc"]
    path = Path(cfg.paths.cache_dir).expanduser() / "teachers" / cache_key(cfg) / "teacher.pt"
    if path.is_file():
        ckpt = checkpoint.load_weights(teacher, path, what="teacher")
        log.info("teacher: reusing %s (test acc %.4f) from %s", cfg.teacher.name, ckpt["test_acc"], path)
        return teacher.to(device), ckpt["test_acc"]
    log.info("teacher: none given (teacher.checkpoint); training %s on %s for %d epochs with method=supervised, "
             "cached in %s", cfg.teacher.name, data.name, cfg.teacher.epochs, path.parent)
    teacher.to(device)
    torch.manual_seed(cfg.teacher.seed)
    train_loader, test_loader = kdata.loaders(data, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device,
                                              seed=cfg.teacher.seed, num_workers=cfg.trainer.num_workers)
    schedule = OmegaConf.merge(cfg.schedule, {"epochs": cfg.teacher.epochs})
    method = Supervised(teacher).to(device)
    meta = {"arch": arch(cfg.teacher, data)}
    logger = RunLogger(path.parent)
    try:
        summary = Engine(method, train_loader, test_loader, schedule, cfg.trainer, run_dir=path.parent, logger=logger,
                         device=device, checkpoint_meta=meta, desc="teacher").fit()
    finally:
        logger.close()
    checkpoint.save({"model": teacher.state_dict(), **meta, "test_acc": summary["test/acc"], "summary": summary}, path)
    log.info("teacher: test acc %.4f after %d steps (%.0f s)", summary["test/acc"], summary["steps"], summary["wall_s"])
    return teacher, summary["test/acc"]


def _test_loader(cfg: DictConfig, data: kdata.Data, device):
    return kdata.loaders(data, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device, seed=0)[1]
