"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
"""

import torch.nn.functional as F

from kdrun.losses import kd_loss
from kdrun.methods.base import Method


class KD(Method):
    needs_teacher = True

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.alpha = alpha

    def training_step(self, batch):
        logits = self.student(batch["image"])
        teacher_logits = self.teacher_outputs(batch)
        losses = {"ce": (1 - self.alpha) * F.cross_entropy(logits, batch["label"])}
        if self.alpha:
            losses["kd"] = self.alpha * kd_loss(logits, teacher_logits, self.temperature)
        return losses, {"acc": (logits.argmax(1) == batch["label"]).float().mean()}
