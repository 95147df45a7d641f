"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

`kd_weight` replaces alpha as the weight of the KD term (the CE keeps 1 - alpha). With
`logit_standardization`, both logits are Z-scored before the temperature (Sun et al. CVPR 2024,
Algorithm 1), whose CIFAR-100 setting is T = 2, alpha = 0.9 and kd_weight = 9; their standard deviation
divides by K (the paper's sigma), or by K - 1 with `ls_std_correction=1`, as the authors' released code does.
"""

import torch.nn.functional as F

from kdrun.data import BatchSpec
from kdrun.losses import kd_loss, standardize
from kdrun.methods.base import Method, accuracy


class KD(Method):
    ranges = {"temperature": "(0, inf)", "alpha": "[0, 1]", "kd_weight": "[0, inf)", "ls_std_correction": "{0, 1}"}
    needs_teacher = True
    batch_spec = BatchSpec(cacheable=True)

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.9, kd_weight: float | None = None,
                 logit_standardization: bool = False, ls_std_correction: int = 0):
        super().__init__(student, teacher)
        self.temperature = temperature
        self.alpha = alpha
        self.soft_weight = alpha if kd_weight is None else kd_weight  # the KD term's weight
        self.logit_standardization = logit_standardization
        self.ls_std_correction = ls_std_correction

    def training_step(self, batch):
        logits = self.student(batch["image"])
        teacher_logits = self.teacher_outputs(batch)
        losses = {"ce": (1 - self.alpha) * F.cross_entropy(logits, batch["label"])}
        if self.soft_weight:
            if self.logit_standardization:
                c = self.ls_std_correction
                logits_s, logits_t = standardize(logits, correction=c), standardize(teacher_logits, correction=c)
            else:
                logits_s, logits_t = logits, teacher_logits
            losses["kd"] = self.soft_weight * kd_loss(logits_s, logits_t, self.temperature)
        return losses, {"acc": accuracy(logits, batch["label"])}
