"""Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars (ECCV 2018), "Memory Aware Synapses: learning what (not)
to forget".

After each experience, the importance of every parameter is the mean over the experience's training images
(un-augmented, the first `samples`; null: all) of |d ||f(x)||_2^2 / d theta|, per sample, f(x) the student's output
(all its logits; the paper's Eq. 4, global version), label-free (`kdrun.losses.importance.mas_importance`, the
student in eval mode). Importances add up over experiences (Omega <- Omega + Omega_i, as the paper accumulates
them) and the anchor theta* is the student at the end of the latest experience. Training on experience i > 0
minimises CE(all logits, y) + weight * sum_k Omega_k (theta_k - theta*_k)^2 (Eq. 3), the CE over all the logits
as `method=supervised` trains (a single head).

Where the authors' code differs from the paper: it takes the gradient of the output's L2 norm (not squared) of a
mini-batch and then its absolute value, which averages before the absolute value (an underestimate, as a
squared mini-batch gradient is for EWC's Fisher); this follows the paper, per sample.

`weight` (lambda): 0.1 by default. The paper's object-recognition runs use lambda = 1 as we recall it (not checked
here), with a small learning rate; on digits after experience 0 the largest Omega is about 18, so the penalty's
curvature 2 * lambda * Omega is 36 at lambda = 1 and SGD at lr 0.05 diverges (the method warns when
lr * curvature > 1); 0.1 keeps it below 1 for the five experiences, as Omega adds up.
"""

import torch
import torch.nn.functional as F

from kdrun.losses.continual import quadratic_penalty
from kdrun.losses.importance import mas_importance
from kdrun.methods.base import Method, accuracy
from kdrun.methods.ewc import Anchors, experience_importance, experience_of, warn_if_stiff


class MAS(Method):
    ranges = {"weight": "[0, inf)", "samples": "[1, inf)"}

    def __init__(self, student, teacher=None, weight: float = 0.1, samples: int | None = None):
        super().__init__(student)
        self.weight, self.samples = weight, samples
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        self.anchors = Anchors(self._params())  # Omega and theta*; Omega zero (no penalty) until experience 0 ends

    def _params(self) -> list[torch.nn.Parameter]:
        params = dict(self.student.named_parameters())
        return [params[n] for n in self.names]

    def on_stage_start(self, stage, loop):
        experience_of(stage, "mas")
        warn_if_stiff("mas", 2 * self.weight * max(float(w.max()) for w in self.anchors.importances()), loop)

    def on_stage_end(self, stage, loop):
        omega = experience_importance(mas_importance, self.student, self.names, stage, loop, self.samples)
        if omega is None:
            return
        self.anchors.fill([old + new for old, new in zip(self.anchors.importances(), omega)], self._params())

    def penalty(self) -> torch.Tensor:
        """weight * sum_k Omega_k (theta_k - theta*_k)^2."""
        return self.weight * quadratic_penalty(self._params(), self.anchors.importances(), self.anchors.anchors())

    def training_step(self, batch):
        logits = self.student(batch["image"])
        losses = {"ce": F.cross_entropy(logits, batch["label"]), "mas": self.penalty()}
        return losses, {"acc": accuracy(logits, batch["label"])}
