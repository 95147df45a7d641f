"""Where the teacher comes from: a checkpoint, the cache, or a supervised run of the same engine.

A teacher trained here is cached under `paths.cache_dir/teachers/<key>/`, the key a hash of
everything that determines it (dataset, architecture, schedule, seed, step limit, precision),
so the next run with the same teacher reuses it at once. `teacher.snapshot_epochs` keeps its weights
after chosen epochs too, and `teacher.checkpoint=epoch_N` names one: an early-stopped teacher.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kdrun import checkpoint, data as kdata, engine, models
from kdrun.cache import tensor_hash
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate
from kdrun.loggers import RunLogger, plain_config
from kdrun.methods.supervised import Supervised

log = logging.getLogger(__name__)

SNAPSHOT = re.compile(r"epoch_(\d+)")  # teacher.checkpoint=epoch_N: the snapshot after epoch N


def cache_key(cfg: DictConfig, data: kdata.Data | None = None) -> str:
    """A short hash of what determines a trained teacher; paths and download flags do not count. A dataset read
    from files (an image folder: its root is what it holds) counts by its content, its files' names and sizes,
    so `data` must be given for one."""
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in ("root", "download")}
    dataset["source"] = {k: v for k, v in dataset["source"].items() if k not in ("root", "download")}
    split = {k: dataset.pop(k, None) for k in ("labeled_per_class", "labeled_fraction", "split_seed")}
    if dataset.get("classes", 0) is None:  # unset: the key a teacher had before dataset.classes existed
        del dataset["classes"]
    val_size = dataset.pop("val_size", None)
    schedule = OmegaConf.to_container(teacher_schedule(cfg), resolve=True)
    what = {
        "dataset": dataset, "schedule": schedule, "seed": cfg.teacher.seed,
        "teacher": {k: OmegaConf.to_container(cfg.teacher, resolve=True).get(k) for k in ("name", "kwargs", "pretrained")},
        "max_steps": cfg.trainer.get("max_steps"), "precision": str(cfg.trainer.precision),
    }
    if cfg.teacher.get("normalize"):  # its own input normalisation: the same weights see other inputs
        what["teacher"]["normalize"] = OmegaConf.to_container(cfg.teacher.normalize, resolve=True)
    if cfg.teacher.get("_target_"):  # a model of the user's own: its arguments sit beside _target_
        what["teacher"]["kwargs"] = models.constructor_kwargs(cfg.teacher)
    if cfg.teacher.get("init"):  # fine-tuned from these weights: their content counts, not the file's name
        what["init"] = tensor_hash(models.init_state(cfg.teacher.init, "teacher.init"))
    if split["labeled_per_class"] is not None or split["labeled_fraction"] is not None:
        what["split"] = split  # trained on the labeled part only
    if val_size is not None:
        what["val"] = {"val_size": val_size, "split_seed": split["split_seed"]}  # and not on the validation images
    if cfg.trainer.get("early_stopping_patience") is not None:  # it stops on validation accuracy
        what["early_stopping_patience"] = cfg.trainer.early_stopping_patience
    for option, default in (("ema_decay", None), ("accumulate_grad_batches", 1)):  # the teacher trains with them too
        if cfg.trainer.get(option, default) != default:
            what[option] = cfg.trainer[option]
    files = kdata.file_fingerprint(data.splits.train) if data is not None else None
    if files is not None:
        what["files"] = files
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def teacher_schedule(cfg: DictConfig) -> DictConfig:
    """The schedule of a teacher kdrun trains, for `teacher.epochs`: the conf/schedule option `teacher.schedule`
    names, as its file says whatever the student's schedule is set to (so a search over the student's schedule
    reuses one teacher), or the student's schedule when it is null."""
    name = cfg.teacher.get("schedule")
    schedule = cfg.schedule if name is None else preset("schedule", name, f"teacher.schedule={name}",
                                                         "or null for the student's")
    schedule = OmegaConf.merge(schedule, {"epochs": cfg.teacher.epochs})
    with open_dict(schedule):
        for key in ("lr_groups", "layer_decay"):  # the student's LR groups are its own; unset ones leave the cache key
            if name is None or not schedule.get(key):
                schedule.pop(key, None)
    return schedule


def preset(group: str, name: str, asked: str, otherwise: str) -> DictConfig:
    """The option `name` of the config group `group` (conf/<group>/<name>.yaml) as its file says, over the options of
    its group that its defaults list names (imagenet over image_folder); one sentence listing the group's options
    when there is no such option."""
    folder = files("kdrun.conf") / group
    if not (folder / f"{name}.yaml").is_file():
        known = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
        raise KdrunError(f"{asked} is not a {group} preset; use one of {', '.join(known)}, {otherwise}")
    own = OmegaConf.load(folder / f"{name}.yaml")
    bases = [preset(group, str(base), asked, otherwise) for base in own.pop("defaults", []) if base != "_self_"]
    return OmegaConf.merge(*bases, own)


def get_teacher(cfg: DictConfig, data: kdata.Data, device) -> tuple[torch.nn.Module, float]:
    """The teacher for this run and its test accuracy (for `teachers=[...]`, their Ensemble's)."""
    if cfg.get("teachers"):
        return get_teachers(cfg, data, device)
    teacher = models.build(cfg.teacher, data)
    source = cfg.teacher.get("checkpoint")
    if source and SNAPSHOT.fullmatch(str(source)):
        source = snapshot(cfg, data, device, int(SNAPSHOT.fullmatch(str(source))[1]))
    if source:
        saved = checkpoint.load(source).get("arch", {})
        if saved.get("num_classes", data.num_classes) != data.num_classes:
            raise KdrunError(f"the teacher checkpoint {source} predicts {saved['num_classes']} classes "
                             f"({saved.get('dataset')}) but {data.name} has {data.num_classes}; give a teacher trained "
                             "on this dataset, or leave teacher.checkpoint unset to train one")
        ckpt = checkpoint.load_weights(teacher, source, what="teacher")
        teacher.to(device)
        acc = ckpt.get("test_acc") if ckpt.get("arch", {}).get("dataset") == data.name else None
        if acc is None:
            acc = evaluate(teacher, _test_loader(cfg, data, device))["acc"]
        return teacher, acc
    if cfg.teacher.epochs == 0:  # e.g. a pretrained timm/torchvision model used as it is
        if not cfg.teacher.get("pretrained"):
            raise KdrunError(f"teacher.epochs=0 uses the teacher as it is, but {cfg.teacher.name} is neither pretrained "
                             "nor loaded: it is random; set teacher.pretrained=true or teacher.checkpoint=PATH, or "
                             "train it with teacher.epochs >= 1")
        teacher.to(device)
        return teacher, evaluate(teacher, _test_loader(cfg, data, device))["acc"]
    path = Path(cfg.paths.cache_dir).expanduser() / "teachers" / cache_key(cfg, data) / "teacher.pt"
    with _lock(path.parent, cfg.teacher.name):  # runs sharing the cache train it once; the others wait and reuse it
        acc = _read_cached(teacher, path)
        if acc is not None:
            log.info("teacher: reusing %s (test acc %.4f) from %s", cfg.teacher.name, acc, path)
            return teacher.to(device), acc
        limit = cfg.trainer.get("max_steps")
        log.info("teacher: none given (teacher.checkpoint); training %s on %s for %d epochs%s with method=supervised, "
                 "cached in %s", cfg.teacher.name, data.name, cfg.teacher.epochs,
                 f" (at most {limit} steps: trainer.max_steps limits the teacher too)" if limit else "", path.parent)
        logger = RunLogger(path.parent, cfg.get("logger"), plain_config(cfg), job_type="teacher")  # its own W&B run
        try:
            teacher, summary = train_teacher(cfg, data, device, path.parent, cfg.teacher.get("snapshot_epochs") or [],
                                      logger=logger)
            ckpt = {"model": teacher.state_dict(), "arch": models.arch(cfg.teacher, data),
                    "test_acc": summary["test/acc"], "summary": summary}
            checkpoint.save({**ckpt, "checksum": _checksum(ckpt)}, path)
            logger.log_teacher(path, artifact_name(cfg))
        finally:
            logger.close()
    log.info("teacher: test acc %.4f after %d steps (%.0f s)", summary["test/acc"], summary["steps"], summary["wall_s"])
    return teacher, summary["test/acc"]


@contextlib.contextmanager
def _lock(directory: Path, name: str):
    """Hold `directory`/lock (an advisory file lock) while the teacher cached there is read or trained; a
    second process waits (and says so) until the first has written it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("teacher: another run is training %s into %s; waiting for it", name, directory)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _checksum(ckpt: dict) -> str:
    """sha256 of a cached teacher's weights and of all it records beside them (its accuracy, architecture)."""
    rest = json.dumps({k: v for k, v in ckpt.items() if k not in ("model", "checksum")}, sort_keys=True, default=str)
    return hashlib.sha256((tensor_hash(ckpt["model"]) + rest).encode()).hexdigest()


def _read_cached(teacher: torch.nn.Module, path: Path) -> float | None:
    """Load the cached teacher at `path` into `teacher`; its test accuracy, or None when there is none or it is
    unusable (truncated, modified: then it says so, and the caller trains it again). A file from before kdrun
    wrote checksums is used as it is."""
    if not path.is_file():
        return None
    try:
        ckpt = checkpoint.load_weights(teacher, path, what="teacher")
        problem = "fails its checksum" if ckpt.get("checksum", _checksum(ckpt)) != _checksum(ckpt) else None
    except KdrunError as e:
        problem = f"cannot be read ({e})"
    if problem:
        log.warning("teacher: the cached %s %s; training it again", path, problem)
        return None
    return ckpt["test_acc"]

def snapshot(cfg: DictConfig, data: kdata.Data, device, epoch: int) -> Path:
    """The checkpoint, after `epoch` of its `teacher.epochs`, of the teacher kdrun trains and caches: an
    early-stopped teacher (Cho & Hariharan 2019). Missing from the cache, it is made by replaying that
    training up to `epoch` (the same seed, data order and LR schedule)."""
    directory = Path(cfg.paths.cache_dir).expanduser() / "teachers" / cache_key(cfg, data)
    path = directory / "checkpoints" / f"epoch_{epoch}.pt"
    if path.is_file():
        return path
    if not 0 < epoch <= cfg.teacher.epochs:
        raise KdrunError(f"teacher.checkpoint=epoch_{epoch} but the teacher trains for {cfg.teacher.epochs} epochs "
                         f"(teacher.epochs); name an epoch in 1..{cfg.teacher.epochs}")
    log.info("teacher: training %s on %s up to epoch %d of %d (teacher.checkpoint=epoch_%d), kept in %s",
             cfg.teacher.name, data.name, epoch, cfg.teacher.epochs, epoch, path.parent)
    replay = directory / f".replay-{os.getpid()}"
    try:
        train_teacher(cfg, data, device, replay, [epoch], stop_epoch=epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(replay / "checkpoints" / path.name, path)
    finally:
        shutil.rmtree(replay, ignore_errors=True)
    return path


def train_teacher(cfg: DictConfig, data: kdata.Data, device, run_dir: Path, snapshot_epochs, stop_epoch: int | None = None,
           logger: RunLogger | None = None):
    """Train the teacher with method=supervised for teacher.epochs (or up to `stop_epoch`); the model and summary.
    `logger`: where its metrics go (default: run_dir/metrics.jsonl alone)."""
    torch.manual_seed(cfg.teacher.seed)  # the teacher's start depends on teacher.seed alone, as its cache key does
    teacher = models.build(cfg.teacher, data).to(device)  # from teacher.init's weights, when it names some
    torch.manual_seed(cfg.teacher.seed)
    method = Supervised(teacher).to(device)
    schedule = teacher_schedule(cfg)
    loaders = kdata.Loaders(data, method.batch_spec, schedule.batch_size, cfg.trainer.eval_batch_size, device,
                            seed=cfg.teacher.seed, num_workers=cfg.trainer.num_workers)
    trainer = OmegaConf.merge(cfg.trainer, {"snapshot_epochs": list(snapshot_epochs)})
    if stop_epoch is not None:
        trainer.max_steps = min(s for s in (cfg.trainer.get("max_steps"), stop_epoch * len(loaders.train())) if s)
    own_logger = logger is None
    logger = logger or RunLogger(run_dir)
    try:
        summary = engine.train(method, loaders, schedule, trainer, run_dir=run_dir, logger=logger, device=device,
                               checkpoint_meta={"arch": models.arch(cfg.teacher, data)}, desc="teacher")
    finally:
        if own_logger:
            logger.close()
    return teacher, summary


def artifact_name(cfg: DictConfig) -> str:
    """The W&B model artifact of the teacher (one version per distinct checkpoint file)."""
    return "teacher-" + re.sub(r"[^\w.-]", "-", str(cfg.teacher.name))


def teacher_file(cfg: DictConfig, data: kdata.Data) -> Path | None:
    """The checkpoint file the run's single teacher is loaded from (`teacher.checkpoint`, a snapshot or the cache),
    for W&B's lineage; None for an ensemble or a teacher used as it is."""
    source = cfg.teacher.get("checkpoint")
    if cfg.get("teachers") or (cfg.teacher.epochs == 0 and not source):
        return None
    directory = Path(cfg.paths.cache_dir).expanduser() / "teachers"
    if source and SNAPSHOT.fullmatch(str(source)):
        return directory / cache_key(cfg, data) / "checkpoints" / f"{source}.pt"
    return Path(source) if source else directory / cache_key(cfg, data) / "teacher.pt"


def get_teachers(cfg: DictConfig, data: kdata.Data, device) -> tuple[torch.nn.Module, float]:
    """`teachers=[...]`: each entry a teacher preset name (conf/teacher) or a teacher config; each is obtained
    like a single teacher (checkpoint, cache or training) and they are returned as one Ensemble."""
    from kdrun.models.ensemble import Ensemble

    members, names = [], []
    for entry in cfg.teachers:
        if isinstance(entry, str):
            entry = preset("teacher", entry, f"teachers=[...] names '{entry}', which",
                            "or a teacher config such as {name: resnet8}")
        member = OmegaConf.to_container(cfg.teacher)  # a member inherits epochs and seed, not the architecture
        member.update(name=None, kwargs={}, checkpoint=None, pretrained=False, init=None, normalize=None)
        member = OmegaConf.merge(member, entry)
        sub = cfg.copy()
        with open_dict(sub):
            sub.teachers = []
            sub.teacher = member
        teacher, _ = get_teacher(sub, data, device)
        members.append(teacher)
        names.append(member.name)
    ensemble = Ensemble(members, names).to(device)
    return ensemble, evaluate(ensemble, _test_loader(cfg, data, device))["acc"]


def _test_loader(cfg: DictConfig, data: kdata.Data, device):
    return kdata.Loaders(data, kdata.BatchSpec(), cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device,
                         seed=0).evaluation()
