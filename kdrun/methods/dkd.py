"""Zhao et al. CVPR 2022, "Decoupled Knowledge Distillation" (DKD).

loss = CE + min((epoch + 1) / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD) (Sec. 3.2, eq. 7; epoch counts
completed epochs, so the first epoch has weight 1 / warmup_epochs, as in mdistiller), each term at
temperature T and times T^2; alpha = 1, beta = 8, T = 4 and a 20-epoch warm-up as in the paper's CIFAR-100
setting (beta 2 for resnet56/110 teachers, 6 for vgg13 and wrn_40_2: method=crd/dkd_beta2, crd/dkd_beta6). With
`logit_standardization`, both logits are Z-scored first (Sun et al. CVPR 2024).
"""

import logging

import torch.nn.functional as F

from kdrun.data import BatchSpec
from kdrun.losses import dkd_loss, standardize
from kdrun.methods.base import Method, accuracy

log = logging.getLogger(__name__)


class DKD(Method):
    ranges = {"alpha": "[0, inf)", "beta": "[0, inf)", "temperature": "(0, inf)", "warmup_epochs": "(0, inf)",
              "ce_weight": "[0, inf)"}
    needs_teacher = True
    batch_spec = BatchSpec(cacheable=True)

    def __init__(self, student, teacher, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: float = 20, ce_weight: float = 1.0, logit_standardization: bool = False):
        super().__init__(student, teacher)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs, self.ce_weight = warmup_epochs, ce_weight
        self.logit_standardization = logit_standardization
        self.epoch = 0

    def on_stage_start(self, stage, loop):
        if self.warmup_epochs > stage.epochs:
            log.warning("method=dkd: its %g-epoch warm-up is longer than the %d-epoch schedule, so the KD terms end "
                        "at %.2f of their weight; set method.warmup_epochs to at most schedule.epochs (the paper: 20 "
                        "of 240)", self.warmup_epochs, stage.epochs, min(stage.epochs / self.warmup_epochs, 1.0))

    def step(self, batch, loop):
        self.epoch = loop.epoch
        return super().step(batch, loop)

    def training_step(self, batch):
        logits = self.student(batch["image"])
        t_logits = self.teacher_outputs(batch)
        s, t = (standardize(logits), standardize(t_logits)) if self.logit_standardization else (logits, t_logits)
        ramp = min((self.epoch + 1) / self.warmup_epochs, 1.0)  # epochs counted from 1, as in mdistiller
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, batch["label"]),
                  "dkd": ramp * dkd_loss(s, t, batch["label"], self.alpha, self.beta, self.temperature)}
        return losses, {"acc": accuracy(logits, batch["label"])}
