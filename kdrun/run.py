"""One run: compose the pieces the config names, train them with the engine, write the summary."""

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from kdrun import cache, cost, data as kdata, dist, engine, models, rundir, scenario as kscenario, validate
from kdrun import curriculum as kcurriculum
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger, plain_config
from kdrun.methods.base import Method
from kdrun import teacher as kteacher
from kdrun import transfer as ktransfer
from kdrun.teacher import get_teacher

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


def run(cfg: DictConfig, run_dir: str | Path, method_name: str | None = None, log_config: dict | None = None):
    """Train `cfg`'s student with `cfg`'s method; returns the summary also written to run_dir (None on
    ranks other than 0). A run dir holding checkpoints/last.pt is continued from there.

    With `trainer.devices=N` (N > 1) outside torchrun, this starts N ranks (`kdrun.dist`), each logging
    with `log_config` (Hydra's job logging), and waits for them.
    """
    validate.check(cfg)  # every field, before any data is read, teacher trained or file written
    # one process per run dir (the ranks of a run share their launcher's hold), continuing only the run that wrote it
    with contextlib.nullcontext() if dist.launched() else rundir.lock(run_dir):
        rundir.check_same_run(cfg, run_dir)
        devices = int(cfg.trainer.get("devices", 1))
        if devices > 1 and not dist.launched():
            dist.launch(run, devices, OmegaConf.create(plain_config(cfg)), str(run_dir), method_name,
                        log_config=log_config)
            return json.loads((Path(run_dir) / "summary.json").read_text())
        with dist.process_group(resolve_device(str(cfg.trainer.device))) as device:
            if cfg.get("active"):  # a loop of runs, one per labeling round (kdrun.active)
                from kdrun import active

                return active.run(cfg, Path(run_dir), method_name, device)
            return _run(cfg, Path(run_dir), method_name, device)


@dataclass
class Job:
    """The pieces of one run, composed from its config: what `train` needs, and what the summary reports."""

    method: Method
    data: kdata.Data
    loaders: kdata.Loaders
    teacher_acc: float | None
    scenario: kscenario.Split | None = None  # a continual scenario, whose experiences are the run's stages
    stages: list | None = None  # the stages to train (None: the method's own)


def compose(cfg: DictConfig, device: torch.device, rank: int = 0, world: int = 1) -> Job:
    """Build what `cfg` names: the data, the teacher (obtained as `kdrun.teacher` says), the student, the method
    and its teacher cache, and the loader factory of this rank; nothing is trained here but a missing teacher."""
    seed_everything(cfg.seed)
    method_cls = get_class(cfg.method._target_)
    with dist.rank_zero_first():  # a download, or a teacher to train, happens once
        data = kdata.build(cfg.dataset)
        scenario = instantiate(cfg.scenario) if cfg.get("scenario") else None
        if scenario is not None:
            scenario.setup(data)
        _check_before_training(cfg, data, method_cls)
        curriculum = instantiate(cfg.curriculum) if cfg.get("curriculum") else None  # data-side (kdrun.curriculum)
        if curriculum is not None:
            kdata.check_curriculum(data, method_cls.batch_spec)
        teacher, teacher_acc = get_teacher(cfg, data, device) if method_cls.needs_teacher else (None, None)

    seed_everything(cfg.seed)  # the student's start does not depend on whether the teacher was cached
    student = models.build(cfg.student, data)  # from student.init's weights, student.freeze's parts frozen
    if cfg.student.get("init") or cfg.student.get("freeze"):
        trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
        log.info("student: %s%s; %d of its %d parameters train", f"from {cfg.student.init}" if cfg.student.get("init")
                 else "fresh", f", frozen: {', '.join(student.frozen_prefixes)}" if cfg.student.get("freeze") else "",
                 trained, n_params(student))
    if method_cls.trains_teacher:  # e.g. meta pseudo labels: an untrained teacher, built after the student
        teacher = models.build(cfg.teacher, data)
    if teacher is not None:
        _check_classes(teacher, student, data)
    method = instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher)
    method.setup(data)  # what depends on the data: feature connectors, CRD's memory bank
    method.to(device)
    if cfg.trainer.get("channels_last"):
        method.to(memory_format=torch.channels_last)
    if cfg.trainer.get("compile"):
        student.compile()
    with dist.rank_zero_first():
        method.teacher_cache = cache.teacher_cache(method, data, cfg, device,
                                                   views_change=curriculum is not None and curriculum.changes_images)
    if curriculum is not None:
        teacher_for_scores = method.teacher if method.needs_teacher else None  # trained (not meta pseudo labels')
        curriculum.setup(data, device, cfg.trainer.eval_batch_size, teacher=teacher_for_scores)
        sees_views = method.teacher_cache is None and method.batch_spec.teacher_view != "clean"
        kcurriculum.check_models(curriculum, data, device, student=student, teacher=teacher if sees_views else None)
    loaders = kdata.Loaders(data, method.batch_spec, cfg.schedule.batch_size, cfg.trainer.eval_batch_size, device,
                            seed=cfg.seed, num_workers=cfg.trainer.num_workers, cache=method.teacher_cache, rank=rank,
                            world_size=world, curriculum=curriculum)
    stages = scenario.stages(method, cfg.schedule.epochs) if scenario is not None else None
    return Job(method, data, loaders, teacher_acc, scenario, stages)


def _run(cfg: DictConfig, run_dir: Path, method_name: str | None, device: torch.device) -> dict | None:
    start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    if not dist.all_same(str(run_dir)):
        raise KdrunError("the ranks were given different run dirs (torchrun starts them at different times); "
                         "give them one with hydra.run.dir=DIR")
    if cfg.schedule.batch_size % world:
        raise KdrunError(f"schedule.batch_size={cfg.schedule.batch_size} (the global batch) does not split into "
                         f"{world} equal parts; choose a multiple of {world}")
    main = rank == 0
    # the downstream tasks' data, read before anything trains (a mistake in them stops the run first)
    tasks = ktransfer.prepare(cfg.transfer, str(cfg.paths.data_dir)) if main and cfg.get("transfer") else None
    job = compose(cfg, device, rank, world)
    method, data = job.method, job.data
    last = run_dir / "checkpoints" / "last.pt"
    logger = RunLogger(run_dir, cfg.logger, plain_config(cfg), job_type="distill" if method.teacher is not None
                       else "train") if main else RunLogger(None)
    split = data.split_record()
    if main and split is not None:  # the validation and labeled/unlabeled positions
        (run_dir / "split.json").write_text(json.dumps(split) + "\n")
    if main and job.scenario is not None:
        (run_dir / "scenario.json").write_text(json.dumps(job.scenario.record()) + "\n")
    try:
        teacher_file = kteacher.teacher_file(cfg, data) if main and method.needs_teacher else None
        if teacher_file is not None and teacher_file.is_file():  # W&B's lineage: the teacher's artifact is an input
            logger.use_teacher(teacher_file, kteacher.artifact_name(cfg))
        setup_s = time.perf_counter() - start
        meta = {"arch": models.arch(cfg.student, data), "config": rundir.identity(cfg)}  # config: see check_same_run
        summary = engine.train(method, job.loaders, cfg.schedule, cfg.trainer, run_dir=run_dir if main else None,
                               logger=logger, device=device, checkpoint_meta=meta,
                               ddp=world > 1, resume=last if last.is_file() else None, stages=job.stages)
        stage_results = summary.pop("stage_results")
        if not main:
            return None
        if job.scenario is not None:
            matrices = job.scenario.matrices(job.stages, stage_results)
            summary.update(kscenario.summary(matrices))
            kscenario.write(run_dir, job.scenario, matrices, logger)
        if tasks is not None:  # the student's features on downstream tasks (kdrun.transfer)
            summary.update(ktransfer.evaluate_run(cfg, method, run_dir, device, tasks))
        summary = {**report(cfg, job, summary, method_name),
                   "wall_s": round(setup_s + summary["wall_s"], 3)}  # summed over the sessions of a resumed run
        logger.summary(summary)
        logger.checkpoint(run_dir / "checkpoints" / "best.pt")
    finally:
        logger.close()
    return summary


def report(cfg: DictConfig, job: Job, summary: dict, method_name: str | None = None) -> dict:
    """The engine's summary of `job` with what the run reports beside it: the method, data, models, costs, seed."""
    method, data = job.method, job.data
    teacher = method.teacher
    return {
        **summary,
        "teacher/test_acc": job.teacher_acc,
        "method": method_name or type(method).__name__.lower(),
        "dataset": data.name,
        "student": cfg.student.name,
        "teacher": (getattr(teacher, "name", None) or cfg.teacher.name) if teacher is not None else None,
        "student/params": n_params(method.student),
        "train/params_trained": sum(p.numel() for p in method.parameters() if p.requires_grad),
        "teacher/params": n_params(teacher) if teacher is not None else None,
        **_costs(method.student, teacher, data),
        **job.loaders.summary(),
        "seed": cfg.seed,
    }


def _check_before_training(cfg: DictConfig, data: kdata.Data, method_cls: type[Method]) -> None:
    """Build the student, and the method on an untrained teacher, once, so that a bad model name, method option
    or feature layer fails before a teacher trains; `compose` builds them again, seeded, for the run."""
    if cfg.get("teachers") and not method_cls.distils_ensemble:
        # an Ensemble's output is the log of its averaged probabilities: tempered again, it is not Hinton's average
        raise KdrunError(f"teachers=[...] is an ensemble, which {method_cls.__name__} cannot distil as its paper "
                         "does; use method=multi_teacher (each teacher's tempered probabilities averaged), or one "
                         "teacher (teacher=NAME, teachers=[])")
    student = models.build(cfg.student, data)
    if cfg.get("teachers"):  # an ensemble: each member is checked as it is obtained
        return
    teacher = models.build(cfg.teacher, data) if method_cls.needs_teacher or method_cls.trains_teacher else None
    instantiate(cfg.method, _partial_=True)(student=student, teacher=teacher).setup(data)


def _check_classes(teacher: torch.nn.Module, student: torch.nn.Module, data: kdata.Data) -> None:
    x = torch.zeros(1, data.in_chans, data.image_size, data.image_size, device=next(teacher.parameters()).device)
    with torch.no_grad():
        t = teacher.eval()(x).shape[-1]
    if t != data.num_classes:
        raise KdrunError(f"the teacher predicts {t} classes but {data.name} has {data.num_classes}; give a teacher "
                         f"trained on {data.name} (teacher.checkpoint) or leave teacher.checkpoint unset to train one")


def _costs(student: torch.nn.Module, teacher: torch.nn.Module | None, data: kdata.Data) -> dict:
    """The student's and the teacher's FLOPs and batch-1 latency on the run's device (`kdrun.cost`)."""
    shape = (data.in_chans, data.image_size, data.image_size)
    costs = {}
    for role, model in (("student", student), ("teacher", teacher)):
        costs[f"{role}/flops"] = cost.flops(model, shape) if model is not None else None
        costs[f"{role}/latency_ms"] = cost.latency_ms(model, shape) if model is not None else None
    return costs


def format_summary(s: dict, run_dir) -> str:
    """The short table printed at the end of a run."""
    def k(n):
        return f"{n / 1e3:.1f}K" if n < 1e6 else f"{n / 1e6:.2f}M"

    rows = [f"kdrun {s['method']} on {s['dataset']}: {s['teacher'] + ' -> ' if s['teacher'] else ''}{s['student']}"]
    if s["teacher/test_acc"] is not None:
        rows.append(f"  teacher  {s['teacher']:<14} params {k(s['teacher/params']):>7}   test acc {s['teacher/test_acc']:.4f}")
    if "val/acc" in s:
        rows.append(f"  student  {s['student']:<14} params {k(s['student/params']):>7}   test acc {s['test/acc']:.4f}"
                    f"   (at the best val acc {s['val/acc_best']:.4f}, epoch {s['val/best_epoch']}: "
                    f"{s['test/acc_at_best_val']:.4f})")
    else:
        rows.append(f"  student  {s['student']:<14} params {k(s['student/params']):>7}   test acc {s['test/acc']:.4f}"
                    f"   (best {s['test/acc_best']:.4f})")
    if s.get("student/flops") is not None:
        def line(role):
            flops = s[f"{role}/flops"]
            return f"{role} {flops / 1e6:.2f}M FLOPs {s[f'{role}/latency_ms']:.2f} ms" if flops is not None else ""
        rows.append(f"  cost     {line('student')}   {line('teacher')}".rstrip() + "   (one image)")
    if "cl/class_il/acc" in s:
        rows.append("  continual" + "".join(
            f"   {p.replace('_', '-')} acc {s[f'cl/{p}/acc']:.4f}"
            + (f" (bwt {s[f'cl/{p}/bwt']:+.4f})" if s[f"cl/{p}/bwt"] is not None else "") for p in kscenario.PROTOCOLS))
    transfer = {k[9:-4]: v for k, v in s.items() if k.startswith("transfer/") and k.endswith("/acc")}
    if transfer:  # transfer/<task>/acc (the linear probe), transfer/<task>/finetune/acc
        rows.append("  transfer " + "".join(f"   {task} {acc:.4f}" for task, acc in transfer.items()))
    if "active/labels" in s:  # an active-learning loop (kdrun.active): its curve, the last round's numbers above
        rows.append(f"  active   {s['active/heuristic']}, test acc by labels: " + "  ".join(
            f"{n}: {a:.4f}" for n, a in zip(s["active/labels"], s["active/test_acc"])))
    rows.append(f"  time     {s['wall_s']:.1f} s   {s['steps']} steps   {s['train/samples_per_s']} train samples/s")
    rows.append(f"  run dir  {run_dir}")
    return "\n".join(rows)
