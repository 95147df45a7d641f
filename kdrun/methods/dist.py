"""Huang et al. NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher" (DIST).

loss = CE + beta * L_inter + gamma * L_intra (Sec. 3), 1 - Pearson correlation between the student's and
the teacher's probabilities at temperature T, within each sample (inter-class relation) and across the
batch for each class (intra-class relation), each times T^2; beta = gamma = 2, T = 4 for CIFAR-100
(beta = gamma = 1, T = 1 on ImageNet). With `logit_standardization`, both logits are Z-scored first
(Sun et al. CVPR 2024).
"""

import torch.nn.functional as F

from kdrun.data import BatchSpec
from kdrun.losses import dist_loss, standardize
from kdrun.methods.base import Method, accuracy


class DIST(Method):
    ranges = {"beta": "[0, inf)", "gamma": "[0, inf)", "temperature": "(0, inf)", "ce_weight": "[0, inf)"}
    needs_teacher = True
    batch_spec = BatchSpec(cacheable=True)

    def __init__(self, student, teacher, beta: float = 2.0, gamma: float = 2.0, temperature: float = 4.0,
                 ce_weight: float = 1.0, logit_standardization: bool = False):
        super().__init__(student, teacher)
        self.beta, self.gamma, self.temperature, self.ce_weight = beta, gamma, temperature, ce_weight
        self.logit_standardization = logit_standardization

    def training_step(self, batch):
        logits = self.student(batch["image"])
        t_logits = self.teacher_outputs(batch)
        s, t = (standardize(logits), standardize(t_logits)) if self.logit_standardization else (logits, t_logits)
        losses = {"ce": self.ce_weight * F.cross_entropy(logits, batch["label"]),
                  "dist": dist_loss(s, t, self.beta, self.gamma, self.temperature)}
        return losses, {"acc": accuracy(logits, batch["label"])}
