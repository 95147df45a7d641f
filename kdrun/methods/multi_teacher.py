"""Distillation from an ensemble of teachers (`teachers=[...]`): the averaged soft targets of Hinton et al.
(2015, Sec. 1) and You et al. (KDD 2017, "Learning from Multiple Teacher Networks"), or a weighted average.

loss = (1 - alpha) * CE + alpha * T^2 * KL(sum_m w_m softmax(z_m / T) || softmax(s / T)), w uniform or
`weights` (normalised to sum to 1). The teachers' logits can be precomputed (`teacher.cache`): the
cache then holds every member's logits per image.
"""

import torch
import torch.nn.functional as F

from kdrun.data import BatchSpec
from kdrun.errors import KdrunError
from kdrun.losses import ensemble_kd_loss
from kdrun.methods.base import Method, accuracy, teacher_view
from kdrun.models.ensemble import Ensemble, MemberLogits


class MultiTeacher(Method):
    ranges = {"temperature": "(0, inf)", "alpha": "[0, 1]"}
    needs_teacher = True
    distils_ensemble = True
    batch_spec = BatchSpec(cacheable=True)

    def __init__(self, student, teacher, temperature: float = 4.0, alpha: float = 0.9, weights=None):
        super().__init__(student, teacher)
        self.temperature, self.alpha = temperature, alpha
        self.weights = list(weights) if weights else None

    def setup(self, data):
        if not isinstance(self.teacher, Ensemble):
            raise KdrunError("method=multi_teacher distils an ensemble; name its teachers with teachers=[...] "
                             "(teacher presets such as [cnn, resnet8], or teacher configs)")
        m = len(self.teacher.members)
        if self.weights is not None and (len(self.weights) != m or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise KdrunError(f"method.weights={self.weights} must give {m} non-negative weights, one per teacher "
                             "(or null for the plain average)")
        weights = torch.tensor(self.weights or [1.0] * m, dtype=torch.float32)
        self.register_buffer("mix", weights / weights.sum())

    def cached_teacher(self):
        return MemberLogits(self.teacher)

    @torch.no_grad()
    def teacher_outputs(self, batch):
        """(M, B, K): each teacher's logits for the batch's teacher view (or the cached ones)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch).transpose(0, 1)
        return self.teacher.member_logits(teacher_view(batch))

    def training_step(self, batch):
        logits = self.student(batch["image"])
        losses = {"ce": (1 - self.alpha) * F.cross_entropy(logits, batch["label"])}
        if self.alpha:
            soft = ensemble_kd_loss(logits, self.teacher_outputs(batch), self.temperature, self.mix)
            losses["kd"] = self.alpha * soft
        return losses, {"acc": accuracy(logits, batch["label"])}
