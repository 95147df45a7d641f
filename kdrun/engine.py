"""The one training loop. It knows nothing of any method: it asks the method for its stages and,
per batch, for its step; it owns optimisation, precision, evaluation, checkpoints and logging."""

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from kdrun import checkpoint
from kdrun.errors import KdrunError
from kdrun.loggers import RunLogger
from kdrun.methods.base import Method, Stage

log = logging.getLogger(__name__)

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}


def lr_factor(schedule: DictConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then cosine, step or constant."""
    warmup = round(schedule.get("warmup_epochs", 0) * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    kind = schedule.lr_schedule
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    if kind == "step":
        return schedule.gamma ** sum(step >= m * steps_per_epoch for m in schedule.milestones)
    if kind == "constant":
        return 1.0
    raise KdrunError(f"unknown schedule.lr_schedule '{kind}'; use cosine, step or constant")


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of `model` over `loader`."""
    was_training = model.training
    model.eval()
    correct = loss = 0.0
    n = 0
    for batch in loader:
        with autocast():
            logits = model(batch["image"])
        correct += (logits.argmax(1) == batch["label"]).sum()
        loss += F.cross_entropy(logits.float(), batch["label"], reduction="sum")
        n += len(batch["label"])
    model.train(was_training)
    return {"acc": float(correct) / n, "loss": float(loss) / n}


class Engine:
    """Runs a method's stages over the training loader; evaluates on the test loader."""

    def __init__(self, method: Method, train_loader, test_loader, schedule: DictConfig, trainer: DictConfig,
                 run_dir: str | Path | None, logger: RunLogger | None = None, device="cpu",
                 checkpoint_meta: dict | None = None, desc: str = "train"):
        self.method = method
        self.train_loader = train_loader
        self.test_loader = test_loader
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
        self.step = 0
        self.epoch = 0
        self.optimizer = None
        self.scheduler = None

    # ---- helpers a method's own `step` may use -------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimize(self, loss: torch.Tensor, optimizer=None, scheduler=None, params=None) -> None:
        """Backward of `loss` (scaled under fp16), optional clipping, optimizer and LR-schedule step."""
        optimizer = optimizer or self.optimizer
        scheduler = scheduler or self.scheduler
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.trainer.get("grad_clip")
        if clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params or [p for g in optimizer.param_groups for p in g["params"]], clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        if scheduler is not None:
            scheduler.step()

    def make_optimizer(self, params, epochs: int):
        """An optimizer from the `schedule` config and its per-step LR schedule over `epochs`."""
        optimizer = instantiate(self.schedule.optimizer, params=params)
        steps_per_epoch = len(self.train_loader)
        total = epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(self.schedule, s, total, steps_per_epoch))
        return optimizer, scheduler

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        start = time.perf_counter()
        method = self.method
        stages = method.stages(self.schedule.epochs)
        best = {"acc": -1.0}
        result = {}
        train_time, samples = 0.0, 0
        for i, stage in enumerate(stages):
            if stage.fresh_optimizer or self.optimizer is None:
                span = stage.epochs + sum(s.epochs for s in _continuations(stages, i))
                params = stage.params if stage.params is not None else [p for p in method.parameters() if p.requires_grad]
                self.optimizer, self.scheduler = self.make_optimizer(params, span)
            method.on_stage_start(stage)
            if len(stages) > 1:
                log.info("%s: stage %d/%d '%s' (%d epochs)", self.desc, i + 1, len(stages), stage.name, stage.epochs)
            for _ in range(stage.epochs):
                t0 = time.perf_counter()
                n = self._train_epoch(stage, i)
                train_time += time.perf_counter() - t0
                samples += n
                self.epoch += 1
                last_epoch = self.epoch == sum(s.epochs for s in stages) or self._done()
                if last_epoch or self.epoch % self.trainer.get("eval_every", 1) == 0:
                    result = {f"test/{k}": v for k, v in evaluate(method.eval_model(), self.test_loader, self.autocast).items()}
                    self.logger.log({"epoch": self.epoch, **result}, self.step)
                    if result["test/acc"] > best["acc"]:
                        best = {"acc": result["test/acc"], "epoch": self.epoch}
                        self._save("best.pt", test_acc=result["test/acc"])
                self._save("last.pt", test_acc=result.get("test/acc"), optimizer=self.optimizer.state_dict())
                if self._done():
                    break
            method.on_stage_end(stage)
            if self._done():
                break
        return {
            "test/acc": result.get("test/acc"),
            "test/acc_best": best["acc"],
            "test/best_epoch": best.get("epoch"),
            "steps": self.step,
            "epochs": self.epoch,
            "wall_s": round(time.perf_counter() - start, 3),
            "train/samples_per_s": round(samples / train_time, 1) if train_time else None,
        }

    def _done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _train_epoch(self, stage: Stage, stage_index: int) -> int:
        method = self.method
        method.train()
        log_every = self.trainer.get("log_every", 50)
        sums: dict[str, torch.Tensor] = {}
        count, samples = 0, 0
        t_log = time.perf_counter()
        bar = tqdm(total=len(self.train_loader), desc=f"{self.desc} {self.epoch + 1}/{self.schedule.epochs}",
                   disable=None, leave=False, dynamic_ncols=True)
        n_batches = len(self.train_loader)
        with bar:
            for i, batch in enumerate(self.train_loader, 1):
                if self.channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                losses, metrics = method.step(batch, self)
                total = sum(losses.values()).detach()
                for k, v in (("loss", total), *losses.items(), *metrics.items()):
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach().float()
                count += 1
                samples += len(batch["label"])
                self.step += 1
                bar.update()
                end = self._done() or i == n_batches
                if count == log_every or end:
                    now = time.perf_counter()
                    row = {f"train/{k}": v.item() / count for k, v in sums.items()}
                    self._check_finite(row["train/loss"])
                    row.update({"epoch": self.epoch + i / n_batches, "train/stage": stage_index,
                                "train/lr": self.optimizer.param_groups[0]["lr"],
                                "train/samples_per_s": count * len(batch["label"]) / (now - t_log)})
                    self.logger.log(row, self.step)
                    bar.set_postfix(loss=f"{row['train/loss']:.3f}", sps=f"{row['train/samples_per_s']:.0f}")
                    sums, count, t_log = {}, 0, now
                if self._done():
                    break
        return samples

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            where = f"; the last good checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'}" if self.run_dir else ""
            raise KdrunError(f"the training loss became {loss} by step {self.step}{where}; lower the learning rate "
                             "(schedule.optimizer.lr), set trainer.grad_clip, or use trainer.precision=32")

    def _save(self, name: str, **extra) -> None:
        if self.run_dir is None:
            return
        model = self.method.eval_model()
        state = {"model": model.state_dict(), **self.checkpoint_meta, "epoch": self.epoch, "step": self.step,
                 **{k: v for k, v in extra.items() if v is not None}}
        checkpoint.save(state, self.run_dir / "checkpoints" / name)


def _continuations(stages: list[Stage], i: int) -> list[Stage]:
    """The stages after stage i that continue its optimizer and schedule."""
    out = []
    for s in stages[i + 1:]:
        if s.fresh_optimizer:
            break
        out.append(s)
    return out
