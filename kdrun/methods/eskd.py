"""Cho & Hariharan (ICCV 2019), "On the Efficacy of Knowledge Distillation": early-stopped KD (ESKD).

Hinton KD (`kdrun.methods.kd`, its options too) for the first `stop_epoch` epochs (default: `stop_fraction`
of the schedule), then the KD term is switched off and the student trains on cross-entropy alone. The
switch is a stage change that keeps the optimizer and LR schedule running; `train/kd_weight` (the KD
term's weight: alpha, then 0) shows it in the metrics.

This is one of the paper's two remedies for a teacher too strong for its student; the other, the one its abstract
names, is distilling from an early-stopped teacher (`method=kd teacher.checkpoint=epoch_N`; the experiment/eskd
presets run both as arms: `*_eskd` is this method, `*_kd_early_teacher` the early-stopped teacher).
"""

import torch
import torch.nn.functional as F

from kdrun.errors import KdrunError
from kdrun.methods.base import Stage, accuracy
from kdrun.methods.kd import KD


class ESKD(KD):
    ranges = {"stop_epoch": "[0, inf)", "stop_fraction": "[0, 1]"}

    def __init__(self, student, teacher, stop_epoch: int | None = None, stop_fraction: float = 0.5, **kd):
        super().__init__(student, teacher, **kd)
        if stop_epoch is None and not 0 <= stop_fraction <= 1:
            raise KdrunError(f"method.stop_fraction={stop_fraction}; give a fraction of the schedule in [0, 1]")
        self.stop_epoch = stop_epoch
        self.stop_fraction = stop_fraction
        self._distil(True)

    def stages(self, epochs):
        stop = self.stop_epoch if self.stop_epoch is not None else round(self.stop_fraction * epochs)
        if not 0 <= stop <= epochs:
            raise KdrunError(f"method.stop_epoch={stop} is outside the schedule's {epochs} epochs; "
                             f"give 0..{epochs} (or method.stop_fraction)")
        stages = [Stage("kd", stop, info={"distil": True}),
                  Stage("ce", epochs - stop, fresh_optimizer=False, info={"distil": False})]
        return [s for s in stages if s.epochs]

    def on_stage_start(self, stage, loop):
        self._distil(stage.info["distil"])

    def _distil(self, on: bool) -> None:
        self.distilling = on
        self._kd_weight = torch.tensor(float(self.soft_weight) if on else 0.0)

    def training_step(self, batch):
        if self.distilling:
            losses, metrics = super().training_step(batch)
        else:  # cross-entropy alone, and no teacher forward
            logits = self.student(batch["image"])
            losses = {"ce": F.cross_entropy(logits, batch["label"])}
            metrics = {"acc": accuracy(logits, batch["label"])}
        return losses, {**metrics, "kd_weight": self._kd_weight}
