"""Supervised training with cross-entropy: teachers and from-scratch baselines."""

import torch.nn.functional as F

from kdrun.methods.base import Method, accuracy


class Supervised(Method):
    ranges = {"label_smoothing": "[0, 1]"}

    def __init__(self, student, teacher=None, label_smoothing: float = 0.0):
        super().__init__(student)
        self.label_smoothing = label_smoothing

    def training_step(self, batch):
        logits = self.student(batch["image"])
        ce = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        return {"ce": ce}, {"acc": accuracy(logits, batch["label"])}
