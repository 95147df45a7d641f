"""The one training loop. It knows nothing of any method: it asks the method for its stages and,
per batch, for its step; it owns optimisation, precision, evaluation, checkpoints and logging.

Each stage draws its own training data and reports its own named evaluation sets (`Stage.data`,
`Stage.evaluate`), asking the run's loader factory (`kdrun.data.Loaders`) for them. A method sees
the loop only through `Loop`, handed to its stage hooks and its `step`.

Resuming: `checkpoints/last.pt` holds everything the loop's future depends on (the method's whole
state, optimizer, LR schedule, grad scaler, stage, epoch, step, the RNG streams, the training
loader's state at the start of the epoch and how many batches of it were trained on), written at
each epoch's end, every `trainer.checkpoint_every_steps` steps and on SIGTERM/SIGUSR1. A resumed
run replays the loader's draws up to that batch without training on them, so it continues exactly
as the uninterrupted run would have. (The training loaders of other stages keep their states too.)
"""

import contextlib
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from kdrun import checkpoint, dist
from kdrun.data import EvalSet, Loaders
from kdrun.errors import KdrunError
from kdrun.evaluation import evaluate
from kdrun.loggers import RunLogger
from kdrun.methods.base import Method, Stage

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # what SLURM sends before preempting a job; Ctrl-C


class Interrupted(Exception):
    """Training stopped on a signal after writing `checkpoints/last.pt`."""

    def __init__(self, signum: int, step: int, path: str | None):
        super().__init__(signum, step, path)
        self.signum, self.step, self.path = signum, step, path


def lr_factor(schedule: DictConfig | dict, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then cosine, step or constant."""
    warmup = round(schedule.get("warmup_epochs", 0) * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    kind = schedule["lr_schedule"]
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    if kind == "step":
        return schedule["gamma"] ** sum(step >= m * steps_per_epoch for m in schedule["milestones"])
    if kind == "constant":
        return 1.0
    raise KdrunError(f"unknown schedule.lr_schedule '{kind}'; use cosine, step or constant")


def lr_multipliers(method: torch.nn.Module, lr_groups: dict | None, layer_decay: float | None) -> dict[str, float]:
    """Each parameter name of `method` (as `method.named_parameters()` gives it) -> its learning-rate multiplier:
    `lr_groups` maps a name prefix (a module path such as `student.fc`, or a parameter name) to a multiplier, the
    longest prefix winning; `layer_decay` (timm-style) multiplies the student's parameters by
    decay ** (their distance from the classifier, `kdrun.models.depth_groups`). Both multiply. Empty for neither."""
    if not lr_groups and layer_decay is None:
        return {}
    names = [n for n, _ in method.named_parameters()]
    under = lambda name, prefix: name == prefix or name.startswith(prefix + ".")  # noqa: E731
    for prefix in lr_groups or {}:
        if not any(under(n, prefix) for n in names):
            top = sorted({".".join(n.split(".")[:2]) for n in names})
            raise KdrunError(f"schedule.lr_groups names '{prefix}', which no parameter of the method lies under; give "
                             f"prefixes of the names of method.named_parameters(), such as {', '.join(top[:12])}")
    multipliers = {}
    for name in names:
        best = max((p for p in lr_groups or {} if under(name, p)), key=len, default=None)
        multipliers[name] = float(lr_groups[best]) if best is not None else 1.0
    student = getattr(method, "student", None)
    if layer_decay is not None and student is not None:
        from kdrun.models import depth_groups

        depth = depth_groups(student)
        deepest = max(depth.values(), default=0)
        for name, d in depth.items():
            if "student." + name in multipliers:  # (a parameter the method also holds elsewhere is named there)
                multipliers["student." + name] *= layer_decay ** (deepest - d)
    return multipliers


def train(method: Method, loaders: Loaders, schedule: DictConfig, trainer: DictConfig, run_dir: str | Path | None = None,
          logger: RunLogger | None = None, device="cpu", checkpoint_meta: dict | None = None, desc: str = "train",
          ddp: bool = False, resume: str | Path | None = None, stages: list[Stage] | None = None) -> dict:
    """Train `method` on `loaders` for `schedule`: the one train function, for a run's student and for a teacher
    kdrun trains. `stages`: the stages to run (default: the method's own, `method.stages(schedule.epochs)`; a
    continual scenario gives each experience's). Returns the engine's summary (see `Engine.fit`)."""
    engine = Engine(method, loaders, schedule, trainer, run_dir, logger, device, checkpoint_meta, desc, ddp)
    return engine.fit(resume, stages)


class Loop:
    """What a method may use of the loop that runs it, handed to its stage hooks and its own `step`:

    `autocast()`, `optimize(loss, optimizer=None, scheduler=None, params=None)` (backward, AMP scaling,
    clipping, DDP gradient sharing, the step), `make_optimizer(params, epochs, lr_scale=1.0)`,
    `evaluate(model, on="test")` (a named evaluation set, or an `EvalSet`), `batches(on, classes=None)` (the
    plain batches of a named split, e.g. "unlabeled", or of its `classes`), `log(row)`, `save(name, model, **meta)`
    (checkpoints/<name>.pt),
    and where the loop is: `step`, `epoch`, `steps_per_epoch`, `lr` (the current learning rate), `optimizer`,
    `run_dir` (None when the run writes no files).
    """

    def __init__(self, engine: "Engine"):
        self.autocast = engine.autocast
        self.optimize = engine.optimize
        self.make_optimizer = engine.make_optimizer
        self.evaluate = engine.evaluate
        self.batches = engine.batches
        self.log = engine.log
        self.save = engine.save
        self._engine = engine

    @property
    def step(self) -> int:
        return self._engine.step

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self._engine.epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self._engine.train_loader)

    @property
    def lr(self) -> float:
        return self._engine.optimizer.param_groups[0]["lr"]

    @property
    def run_dir(self) -> Path | None:
        """The run's directory, for files a method writes beside its checkpoints (None: a run that writes none)."""
        return self._engine.run_dir

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer the current stage trains with (what `optimize` steps by default)."""
        return self._engine.optimizer


class Engine:
    """Runs a method's stages, each over its training loader; evaluates each stage's named sets."""

    def __init__(self, method: Method, loaders: Loaders, schedule: DictConfig, trainer: DictConfig,
                 run_dir: str | Path | None = None, logger: RunLogger | None = None, device="cpu",
                 checkpoint_meta: dict | None = None, desc: str = "train", ddp: bool = False):
        """`ddp`: this is one rank of several (`kdrun.dist`): gradients, metrics and evaluation are
        shared with the others; give `run_dir` and `logger` to rank 0 only."""
        self.method = method
        self.loaders = loaders
        self.train_key, self.train_loader = None, None  # the current stage's training data
        self.loop = Loop(self)
        self.schedule = schedule
        self.trainer = trainer
        self.run_dir = Path(run_dir) if run_dir else None
        self.logger = logger or RunLogger(None)
        self.device = torch.device(device)
        self.checkpoint_meta = checkpoint_meta or {}
        self.desc = desc
        precision = str(trainer.precision)
        if precision not in PRECISIONS:
            raise KdrunError(f"unknown trainer.precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        self.amp_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "16-mixed")
        self.channels_last = bool(trainer.get("channels_last", False))
        self.max_steps = trainer.get("max_steps") or None
        self.patience = trainer.get("early_stopping_patience")  # evaluations without a better val/acc before stopping
        self.snapshot_epochs = set(trainer.get("snapshot_epochs") or ())  # keep checkpoints/epoch_N.pt after these
        self.checkpoint_every = trainer.get("checkpoint_every_steps") or None
        self.grad_clip = trainer.get("grad_clip")  # read once: a config lookup per step costs more than it seems
        self.accumulate = int(trainer.get("accumulate_grad_batches", 1) or 0)  # batches per optimizer step
        self.ema_decay = trainer.get("ema_decay")  # evaluate and checkpoint an EMA of the method's eval_model()
        self.ema = None  # its torch.optim.swa_utils.AveragedModel, restarted with each fresh optimizer
        if self.accumulate < 1 or self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise KdrunError(f"trainer.accumulate_grad_batches={self.accumulate}, trainer.ema_decay={self.ema_decay}; "
                             "give a positive number of batches, and a decay in [0, 1) such as 0.999 or null")
        self.ddp = ddp
        self.world = dist.world_size() if ddp else 1
        self.step = 0
        self.epoch = 0
        self.optimizer = None
        self.scheduler = None
        # where the loop is, for last.pt: the stage, the training loader's state at the start of the
        # epoch, the batches of the epoch trained on, and what the summary needs from earlier epochs
        self.stage_index = 0
        self.loader_state = None
        self.batch_in_epoch = 0
        self.progress = {"best": {}, "result": {}, "stage_results": [], "stale_evaluations": 0, "stopped_early": None,
                         "train_time": 0.0, "samples": 0, "wall_s": 0.0}
        self.signal = None  # set by SIGTERM/SIGUSR1/SIGINT while fitting

    # ---- what a method may use, through `Loop` ---------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimize(self, loss: torch.Tensor, optimizer=None, scheduler=None, params=None) -> None:
        """Backward of `loss` (scaled under fp16), optional clipping, optimizer and LR-schedule step (by default
        the loop's optimizer and schedule; a method's own optimizer steps its own `scheduler`, if any). With
        `trainer.accumulate_grad_batches=N` the loss is divided by N and the step taken every N batches (and at
        the epoch's end); with `trainer.ema_decay` each step of the loop's optimizer updates the EMA."""
        if self.accumulate > 1 and optimizer not in (None, self.optimizer):
            raise KdrunError(f"trainer.accumulate_grad_batches={self.accumulate}, but {type(self.method).__name__} "
                             "steps an optimizer of its own, which cannot accumulate; use accumulate_grad_batches=1")
        if optimizer is None or optimizer is self.optimizer:  # the loop's: its LR schedule steps with it
            optimizer, scheduler = self.optimizer, scheduler or self.scheduler
        if self.batch_in_epoch % self.accumulate == 0:  # the first batch of an accumulation window
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss / self.accumulate if self.accumulate > 1 else loss).backward()
        trained = self.batch_in_epoch + 1  # batches of the epoch, this one included
        if not (trained % self.accumulate == 0 or trained == len(self.train_loader)
                or (self.max_steps is not None and self.step + 1 >= self.max_steps)):
            return
        if self.ddp:
            dist.all_reduce_mean([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        if self.grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params or [p for g in optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if scheduler is not None:
            scheduler.step()
        if self.ema is not None and optimizer is self.optimizer:
            self.ema.update_parameters(self.method.eval_model())

    def make_optimizer(self, params, epochs: int, lr_scale: float = 1.0, steps_per_epoch: int | None = None,
                       lr: float | None = None):
        """An optimizer from the `schedule` config (its learning rate, or `lr`, times `lr_scale`) and its per-step LR
        schedule over `epochs` (of `steps_per_epoch` steps; default: the current stage's). With `schedule.lr_groups`
        or `schedule.layer_decay`, the parameters fall into groups by learning-rate multiplier (`lr_multipliers`),
        the group at the base rate first (the one logged as `train/lr`)."""
        groups = self._lr_groups(list(params))
        optimizer = instantiate(self.schedule.optimizer, _partial_=True)(params=[{"params": ps} for ps in groups.values()])
        for group, multiplier in zip(optimizer.param_groups, groups):
            group["lr"] = (lr if lr is not None else group["lr"]) * lr_scale * multiplier
        steps_per_epoch = math.ceil((steps_per_epoch or len(self.train_loader)) / self.accumulate)  # optimizer steps
        total = epochs * steps_per_epoch
        schedule = OmegaConf.to_container(self.schedule, resolve=True)  # read per step: a plain dict is far faster
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(schedule, s, total, steps_per_epoch))
        return optimizer, scheduler

    def _lr_groups(self, params: list[torch.Tensor]) -> dict[float, list[torch.Tensor]]:
        """`params` by learning-rate multiplier (their names read from the method's `named_parameters()`)."""
        multipliers = lr_multipliers(self.method, self.schedule.get("lr_groups"), self.schedule.get("layer_decay"))
        if not multipliers:
            return {1.0: params}
        names = {id(p): n for n, p in self.method.named_parameters()}
        groups: dict[float, list[torch.Tensor]] = {1.0: []}
        for p in params:
            groups.setdefault(multipliers.get(names.get(id(p)), 1.0), []).append(p)
        return {m: ps for m, ps in groups.items() if ps}

    def evaluate(self, model: torch.nn.Module, on: str | EvalSet = "test") -> dict[str, float]:
        """Accuracy and loss of `model` on an evaluation set (a name: that split, whole)."""
        which = on if isinstance(on, EvalSet) else EvalSet(on, on)
        return evaluate(model, self.loaders.evaluation(which), self.autocast, self.ddp, classes=which.mask)

    def batches(self, on: str, classes: tuple[int, ...] | None = None):
        """The plain batches (un-augmented, in order) of the split named `on` (of `classes`: None, all)."""
        return self.loaders.evaluation(EvalSet(on, on, classes))

    def log(self, row: dict) -> None:
        """A row of metrics.jsonl (and W&B) at the current step."""
        self.logger.log(row, self.step)

    def save(self, name: str, model: torch.nn.Module | None = None, **extra) -> None:
        """checkpoints/<name>.pt: `model` (default: the method's result) with the run's metadata and `extra`."""
        if self.run_dir is None:
            return
        model = model if model is not None else self.result_model()
        state = {"model": model.state_dict(), **self.checkpoint_meta, "epoch": self.epoch, "step": self.step,
                 **{k: v for k, v in extra.items() if v is not None}}
        checkpoint.save(state, self.run_dir / "checkpoints" / f"{name}.pt")

    def result_model(self) -> torch.nn.Module:
        """What is evaluated and checkpointed: the method's `eval_model()`, or its EMA with `trainer.ema_decay`."""
        return self.ema.module if self.ema is not None else self.method.eval_model()

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, stages: list[Stage] | None = None) -> dict:
        """Run `stages` (default: the method's own). `resume`: a last.pt this engine wrote; training continues
        from there exactly as if it had never stopped (see the module's docstring).

        The summary holds, beside the run's numbers, `stage_results`: each stage's evaluation after its last
        epoch (every stage's last epoch is evaluated), in order."""
        self.fit_start = start = time.perf_counter()
        method = self.method
        stages = stages if stages is not None else method.stages(self.schedule.epochs)
        total_epochs = self.total_epochs = sum(s.epochs for s in stages)
        if total_epochs < 1 or any(s.epochs < 0 for s in stages):
            raise KdrunError(f"the {self.desc} run has {total_epochs} epochs to train "
                             f"({', '.join(f'{s.name}: {s.epochs}' for s in stages) or 'no stage'}); give a positive "
                             "schedule.epochs (teacher.epochs for a teacher kdrun trains)")
        if self.max_steps is not None and self.max_steps < 1:
            raise KdrunError(f"trainer.max_steps={self.max_steps}; give a positive number of steps, or null for no limit")
        if self.patience is not None and (self.patience < 1 or self.loaders.data.val is None):
            raise KdrunError(f"trainer.early_stopping_patience={self.patience} stops when validation accuracy has not "
                             "improved for that many evaluations; give at least 1, with validation images held out "
                             "(dataset.val_size=N or a fraction)")
        state = checkpoint.load(resume) if resume else None
        if self.ddp and state is None:
            dist.broadcast(method.state_dict().values())  # every rank starts from rank 0's weights
        p = self.progress
        with self._stop_on_signals():
            for i, stage in enumerate(stages):
                if state is not None and i < state["stage"]:
                    continue
                self.stage_index = i
                self.train_key, self.train_loader = Loaders.key(stage.data), self.loaders.train(stage.data)
                if len(self.train_loader) == 0:
                    raise KdrunError(f"the {self.desc} stage '{stage.name}' has fewer training images than one batch "
                                     f"(schedule.batch_size={self.schedule.batch_size}); give a smaller batch size "
                                     "or more images")
                if stage.fresh_optimizer or self.optimizer is None:
                    self.optimizer, self.scheduler = self.make_optimizer(*self._optimizer_span(stages, i))
                    if self.ema_decay is not None:  # the first update copies the weights
                        self.ema = AveragedModel(method.eval_model(), multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay),
                                                 use_buffers=True)
                method.on_stage_start(stage, self.loop)
                if state is not None:
                    self._restore(state)
                    p, state = self.progress, None
                if len(stages) > 1:
                    log.info("%s: stage %d/%d '%s' (%d epochs)", self.desc, i + 1, len(stages), stage.name, stage.epochs)
                stage_end = sum(s.epochs for s in stages[:i + 1])
                while self.epoch < stage_end and not self._done():
                    t0 = time.perf_counter()
                    samples, means = self._train_epoch(stage, i)
                    seconds = time.perf_counter() - t0
                    p["samples"] += samples
                    p["train_time"] += seconds
                    self.epoch += 1
                    self.loader_state, self.batch_in_epoch = _loader_state(self.train_loader), 0
                    last_epoch, result = self.epoch == total_epochs or self._done(), None
                    snapshot = self.epoch in self.snapshot_epochs
                    if (last_epoch or snapshot or self.epoch == stage_end
                            or self.epoch % self.trainer.get("eval_every", 1) == 0):
                        p["result"] = result = self._evaluate(stage)
                        self.log({"epoch": self.epoch, **result})
                        if self._is_best(result):
                            self.save("best", test_acc=result.get("test/acc"), val_acc=result.get("val/acc"))
                        self._stop_early(result)
                    self._log_epoch(total_epochs, means, result or {}, samples / seconds)
                    self._save_last()
                    if snapshot:
                        self.save(f"epoch_{self.epoch}", test_acc=p["result"].get("test/acc"))
                method.on_stage_end(stage, self.loop)
                p["stage_results"].append(p["result"])
                nested = [f"{k[:-4]} {v:.4f}" for k, v in p["result"].items() if k.endswith("/acc") and k.count("/") > 1]
                if nested:  # sets the epoch lines leave out (a scenario's per-experience sets)
                    log.info("%s: after stage '%s': %s", self.desc, stage.name, "  ".join(nested))
                if self._done():
                    break
        return {
            "test/acc": p["result"].get("test/acc"),
            **_best_summary(p["best"], p["result"]),
            "stopped_early": p["stopped_early"],
            "steps": self.step,
            "epochs": self.epoch,
            "wall_s": round(p["wall_s"] + time.perf_counter() - start, 3),
            "train/samples_per_s": round(p["samples"] / p["train_time"], 1) if p["train_time"] else None,
            "stage_results": p["stage_results"],
            **method.summary(),
        }

    def _is_best(self, result: dict) -> bool:
        """Keep the best evaluation by validation accuracy and by test accuracy (what some benchmarks report); whether
        this one is the best by what chooses the run's best.pt: validation accuracy when held out, else test."""
        best = self.progress["best"]
        for key in ("val/acc", "test/acc"):
            if key in result and result[key] > best.get(key, {"acc": -1.0})["acc"]:
                best[key] = {"acc": result[key], "epoch": self.epoch, "test/acc": result.get("test/acc")}
        chooser = "val/acc" if "val/acc" in result else "test/acc"
        return chooser in best and best[chooser]["epoch"] == self.epoch

    def _stop_early(self, result: dict) -> None:
        """Early stopping: after `patience` evaluations in a row without a better validation accuracy."""
        p = self.progress
        if self.patience is None or "val/acc" not in result:
            return
        improved = p["best"]["val/acc"]["epoch"] == self.epoch
        p["stale_evaluations"] = 0 if improved else p["stale_evaluations"] + 1
        if p["stale_evaluations"] >= self.patience:
            p["stopped_early"] = self.epoch
            log.info("%s: stopping early after epoch %d: validation accuracy has not improved for %d evaluations "
                     "(best %.4f, epoch %d)", self.desc, self.epoch, self.patience, p["best"]["val/acc"]["acc"],
                     p["best"]["val/acc"]["epoch"])

    def _done(self) -> bool:
        return (self.max_steps is not None and self.step >= self.max_steps) or self.progress["stopped_early"] is not None

    def _optimizer_span(self, stages: list[Stage], i: int):
        """The parameters, epochs, LR scale, steps per epoch and LR of the optimizer stage i trains with: its own,
        or, for a stage that continues another's (fresh_optimizer=False), that stage's."""
        owner = next(j for j in range(i, -1, -1) if j == 0 or stages[j].fresh_optimizer)
        stage = stages[owner]
        params = stage.params if stage.params is not None else [p for p in self.method.parameters() if p.requires_grad]
        epochs = stage.epochs + sum(s.epochs for s in _continuations(stages, owner))
        return params, epochs, stage.lr_scale, len(self.loaders.train(stage.data)), stage.lr

    def _evaluate(self, stage: Stage) -> dict[str, float]:
        """`<set>/acc` and `<set>/loss` of the method's result on each of the stage's evaluation sets."""
        model = self.result_model()
        if self.ddp:
            dist.broadcast(model.buffers())  # BatchNorm statistics: rank 0's, the ones checkpointed
        sets = stage.evaluate if stage.evaluate is not None else self.loaders.data.evaluation_sets()
        return {f"{s.name}/{k}": v for s in sets for k, v in self.evaluate(model, s).items()}

    def _log_epoch(self, total: int, means: dict[str, float], result: dict, samples_per_s: float) -> None:
        """One console (and job log) line per epoch: the losses, the evaluation, the LR, the speed, the time."""
        terms = [f"{k[6:]} {v:.4f}" for k, v in means.items() if k != "train/loss"]
        losses = f" ({' '.join(terms)})" if len(terms) > 1 else ""
        evaluation = "".join(f"  {k} {v:.4f}" for k, v in result.items() if k.endswith("/acc") and k.count("/") == 1)
        log.info("%s epoch %d/%d  loss %.4f%s%s  lr %.3g  %.0f samples/s  %.0f s", self.desc, self.epoch, total,
                 means.get("train/loss", math.nan), losses, evaluation,
                 self.optimizer.param_groups[0]["lr"], samples_per_s, time.perf_counter() - self.fit_start)

    def _train_epoch(self, stage: Stage, stage_index: int) -> tuple[int, dict[str, float]]:
        """Train one epoch; the samples trained on and the epoch's mean losses (train/<name>)."""
        method = self.method
        method.train()
        log_every = self.trainer.get("log_every", 50)
        window: list[dict[str, torch.Tensor]] = []  # each step's losses and metrics since the last row
        loss_keys: dict[str, None] = {}  # the loss names since the last row, in the method's order
        samples = 0
        sums: dict[str, float] = {}  # the epoch's train/<loss> summed over its steps, from the rows
        steps = 0
        t_log = time.perf_counter()
        n_batches = len(self.train_loader)
        skip, self.loader_state = self.batch_in_epoch, _loader_state(self.train_loader)
        if hasattr(self.train_loader, "set_epoch"):  # where training is, for a loader that follows it (curricula)
            row = self.train_loader.set_epoch(self.epoch, self.total_epochs)
            if row and not skip:  # a resumed epoch logged it before
                self.log({"epoch": self.epoch, **row})
        bar = tqdm(total=n_batches, initial=skip, desc=f"{self.desc} {self.epoch + 1}/{self.schedule.epochs}",
                   disable=None if dist.rank() == 0 else True, leave=False, dynamic_ncols=True)
        with bar:
            for i, batch in enumerate(self.train_loader, 1):
                if i <= skip:
                    continue  # a resumed epoch: the loader's draws are replayed, these batches were trained on
                if self.channels_last and "image" in batch:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                losses, metrics = method.step(batch, self.loop)
                window.append({k: v.detach() for k, v in (*losses.items(), *metrics.items())})  # summed per row
                loss_keys.update(dict.fromkeys(losses))
                samples += _batch_size(batch)
                self.step += 1
                self.batch_in_epoch = i
                bar.update()
                save = self.checkpoint_every is not None and self.step % self.checkpoint_every == 0
                # a signal is acted on at once by a single process, at the next row by every rank together
                if len(window) == log_every or save or i == n_batches or self._done() or (self.signal and not self.ddp):
                    now = time.perf_counter()
                    row, stop = self._reduce(window)
                    row = {"train/loss": sum(row[f"train/{k}"] for k in loss_keys), **row}  # the mean of the totals
                    self._check_finite(row)
                    row.update({"epoch": self.epoch + i / n_batches, "train/stage": stage_index,
                                "train/lr": self.optimizer.param_groups[0]["lr"],
                                "train/samples_per_s": len(window) * _batch_size(batch) * self.world / (now - t_log)})
                    self.log(row)
                    for k in ("train/loss", *(f"train/{k}" for k in loss_keys)):
                        sums[k] = sums.get(k, 0.0) + row[k] * len(window)
                    steps += len(window)
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", sps=f"{row['train/samples_per_s']:.0f}")
                    window, loss_keys, t_log = [], {}, now
                    if stop:
                        self._save_last()
                        path = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
                        raise Interrupted(int(self.signal or signal.SIGTERM), self.step, str(path) if path else None)
                    if save and i < n_batches:
                        self._save_last()
                if self._done():
                    break
        return samples * self.world, {k: v / steps for k, v in sums.items()}

    def _reduce(self, window: list[dict[str, torch.Tensor]]) -> tuple[dict[str, float], bool]:
        """The row of train/* means over the steps of `window` (and over the ranks), and whether any rank
        got a stop signal; one host sync."""
        names = list(dict.fromkeys(k for step in window for k in step))
        sums = [torch.stack([step[k].float() for step in window if k in step]).sum() for k in names]
        values = torch.stack([*sums, torch.tensor(float(bool(self.signal)), device=self.device)])
        if self.ddp:
            dist.all_reduce_mean([values])
        *means, stop = values.tolist()
        return {f"train/{k}": v / len(window) for k, v in zip(names, means)}, stop > 0

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM/SIGUSR1 (a preemption's warning) and SIGINT (Ctrl-C) stop training after the current step, with
        a checkpoint."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, _frame):
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _check_finite(self, row: dict[str, float]) -> None:
        """Stop on a non-finite loss: one sentence naming the terms, the checkpoint to go back to (if any) and
        what to change (the method's hint where it has one, else the optimisation's usual suspects)."""
        loss = row["train/loss"]
        if math.isfinite(loss):
            return
        terms = ", ".join(k for k, v in row.items() if k != "train/loss" and not math.isfinite(v))
        last = self.run_dir / "checkpoints" / "last.pt" if self.run_dir else None
        where = f"the last good checkpoint is {last}" if last and last.is_file() else "no checkpoint was written yet"
        hint = self.method.nan_hint() or ("lower the learning rate (schedule.optimizer.lr), set trainer.grad_clip, or "
                                          "use trainer.precision=32")
        raise KdrunError(f"the training loss became {loss} by step {self.step}{f' ({terms})' if terms else ''}; "
                         f"{where}; {hint}")

    def _save_last(self) -> None:
        """last.pt: the run's result so far and everything `_restore` needs to continue it (the current
        stage's loader as it was at the start of the epoch, which a resumed run replays)."""
        if self.run_dir is None:
            return
        loaders = {**self.loaders.state_dict(), self.train_key: self.loader_state}
        self.save("last", test_acc=self.progress["result"].get("test/acc"), method=self.method.state_dict(),
                  optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                  scaler=self.scaler.state_dict(), stage=self.stage_index, batch_in_epoch=self.batch_in_epoch,
                  loaders=loaders, rng=_rng_state(), ema=self.ema.state_dict() if self.ema is not None else None,
                  grads=self._pending_grads(),
                   progress={**self.progress, "wall_s": self.progress["wall_s"] + time.perf_counter() - self.fit_start})

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _pending_grads(self) -> list | None:
        """The gradients accumulated so far when a checkpoint falls inside an accumulation window."""
        if self.batch_in_epoch % self.accumulate == 0:
            return None
        return [p.grad for p in self._params()]

    def _restore(self, state: dict) -> None:
        if "method" not in state or "loaders" not in state:
            raise KdrunError("this last.pt was written by an earlier kdrun and cannot be continued exactly; "
                             "delete it to start the run over")
        try:
            self.method.load_state_dict(state["method"])
        except RuntimeError as e:
            raise KdrunError(f"the run dir's checkpoints/last.pt was written by a run with other models or another "
                             f"method ({str(e).splitlines()[0]}); give this run a fresh hydra.run.dir") from e
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        for p, g in zip(self._params(), state.get("grads") or ()):
            p.grad = g
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.progress = state["progress"]
        self.loaders.load_state_dict({k: v for k, v in state["loaders"].items() if v is not None})
        _set_rng_state(state["rng"])
        self.logger.rewind(self.step)
        log.info("%s: resuming at epoch %d, step %d", self.desc, self.epoch + 1, self.step)


def _best_summary(best: dict, last: dict) -> dict:
    """The summary's best-epoch entries: the best test accuracy over the evaluations (the CRD benchmark's
    protocol) and, with a validation split, the best validation accuracy and the test accuracy at its epoch."""
    out = {"test/acc_best": best.get("test/acc", {}).get("acc"), "test/best_epoch": best.get("test/acc", {}).get("epoch")}
    if "val/acc" in best:
        out.update({"val/acc": last.get("val/acc"), "val/acc_best": best["val/acc"]["acc"],
                    "val/best_epoch": best["val/acc"]["epoch"], "test/acc_at_best_val": best["val/acc"]["test/acc"]})
    return out


def _batch_size(batch: dict) -> int:
    """The images a batch trains on: its labels, or the `size` of a batch that carries none (`StepClock`)."""
    return len(batch["label"]) if "label" in batch else batch["size"]


def _loader_state(loader) -> dict | None:
    """A loader's random state (its order and augmentation draws) when it can give it, for resuming."""
    return loader.state_dict() if hasattr(loader, "state_dict") else None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss], "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def _continuations(stages: list[Stage], i: int) -> list[Stage]:
    """The stages after stage i that continue its optimizer and schedule."""
    out = []
    for s in stages[i + 1:]:
        if s.fresh_optimizer:
            break
        out.append(s)
    return out
