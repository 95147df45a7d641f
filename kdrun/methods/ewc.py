"""Kirkpatrick et al. (PNAS 2017), "Overcoming catastrophic forgetting in neural networks": elastic weight
consolidation; `online=true` is the online EWC of Schwarz et al. (ICML 2018), "Progress & Compress".

Training on experience i minimises CE(all logits, y) + (weight / 2) * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2:
one penalty per earlier experience t, F_t the diagonal of the Fisher information of the student at the end of
experience t (`theta*_t`, its anchor). The CE is over all the student's logits, as `method=supervised` trains (the
paper's single head; no masking to the experience's classes), and the Fisher's log-likelihood log p(y|x) is the
log-softmax over the same logits. The Fisher is the mean over the experience's training images (un-augmented, the
first `fisher_samples`; null: all) of per-sample terms (`kdrun.losses.importance.fisher_diagonal`, the student in
eval mode): `exact` the expectation over the model's predictive distribution, `sampled` one label drawn from it,
`empirical` the true label. Several public implementations square the gradient of a mini-batch's mean loss, which
underestimates it; this one never does.

Online EWC keeps one running Fisher F* <- gamma * F* + F_i and the latest anchor, and penalises
(weight / 2) * sum_k gamma * F*_k (theta_k - theta*_k)^2 (Schwarz et al., Eq. 4: the decay also weighs the penalty;
with the default gamma = 1 the two readings agree).

The Fishers and anchors are buffers (`Anchors`) made with the student's parameter shapes when each experience
starts, so a resumed run finds the keys its checkpoint holds.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import KdrunError
from kdrun.losses.continual import quadratic_penalty
from kdrun.losses.importance import fisher_diagonal
from kdrun.methods.base import Method, accuracy

log = logging.getLogger(__name__)


class Anchors(nn.Module):
    """A quadratic penalty's state: per parameter, an importance and an anchor (buffers, zeros until filled)."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        for k, p in enumerate(params):
            self.register_buffer(f"importance{k}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"anchor{k}", torch.zeros_like(p))
        self.n = len(params)

    def importances(self) -> list[torch.Tensor]:
        return [getattr(self, f"importance{k}") for k in range(self.n)]

    def anchors(self) -> list[torch.Tensor]:
        return [getattr(self, f"anchor{k}") for k in range(self.n)]

    @torch.no_grad()
    def fill(self, importances: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Set the importances and anchor the parameters where they are now."""
        for w, a, new, p in zip(self.importances(), self.anchors(), importances, params):
            w.copy_(new)
            a.copy_(p)


def warn_if_stiff(method: str, curvature: float, loop) -> None:
    """Log a warning when a quadratic penalty's largest curvature (its second derivative) times the learning rate
    exceeds 1: SGD with momentum then diverges along that weight (adaptive optimizers are less affected)."""
    if loop is not None and curvature * loop.lr > 1:
        log.warning("method=%s: the penalty's largest curvature (%.3g) times the learning rate (%.3g) is %.3g > 1, "
                    "where SGD diverges; lower method.weight or schedule.optimizer.lr", method, curvature, loop.lr,
                    curvature * loop.lr)


def experience_importance(estimate, model: nn.Module, names: list[str], stage, loop, *args) -> list | None:
    """`estimate(model, names, batches, *args)` (`kdrun.losses.importance`) over the training images of the
    experience `stage` ends, `model` in eval mode; None after the last experience (no later one to protect it in)."""
    if stage.info["experience"] == stage.info["experiences"] - 1:
        return None
    mode = model.training
    model.eval()
    try:
        return estimate(model, names, loop.batches("train", classes=stage.info["classes"]), *args)
    finally:
        model.train(mode)


def experience_of(stage, method: str) -> int:
    """The experience a stage trains (`stage.info`), or a KdrunError when the run has no continual scenario."""
    if "experience" not in stage.info:
        raise KdrunError(f"method={method} learns experiences one after another; run it with scenario=split")
    return stage.info["experience"]


class EWC(Method):
    ranges = {"weight": "[0, inf)", "variant": "{exact, sampled, empirical}", "gamma": "[0, 1]",
              "fisher_samples": "[1, inf)"}

    def __init__(self, student, teacher=None, weight: float = 10.0, variant: str = "exact", online: bool = False,
                 gamma: float = 1.0, fisher_samples: int | None = 1000):
        super().__init__(student)
        self.weight, self.variant, self.online, self.gamma = weight, variant, online, gamma
        self.fisher_samples = fisher_samples
        self.names = [n for n, p in student.named_parameters() if p.requires_grad]
        self.penalties = nn.ModuleList()  # one Anchors per earlier experience (online: one in all)

    def _params(self) -> list[nn.Parameter]:
        params = dict(self.student.named_parameters())
        return [params[n] for n in self.names]

    def on_stage_start(self, stage, loop):
        i = experience_of(stage, "ewc")
        while len(self.penalties) < (min(i, 1) if self.online else i):  # what the checkpoint of this stage holds
            self.penalties.append(Anchors(self._params()))
        if len(self.penalties):  # the penalty's Hessian: weight * sum_t F_t (online: weight * gamma * F)
            total = [sum(w) for w in zip(*(a.importances() for a in self.penalties))]
            scale = self.weight * (self.gamma if self.online else 1.0)
            warn_if_stiff("ewc", scale * max(float(w.max()) for w in total), loop)

    def on_stage_end(self, stage, loop):
        fisher = experience_importance(fisher_diagonal, self.student, self.names, stage, loop, self.variant,
                                       self.fisher_samples)
        if fisher is None:
            return
        if self.online and len(self.penalties):
            fisher = [self.gamma * old + new for old, new in zip(self.penalties[0].importances(), fisher)]
        else:
            self.penalties.append(Anchors(self._params()))
        self.penalties[-1].fill(fisher, self._params())

    def penalty(self) -> torch.Tensor:
        """(weight / 2) * the sum of the penalties (online: of the one, its Fisher times gamma)."""
        params = self._params()
        scale = self.weight / 2 * (self.gamma if self.online else 1.0)
        return scale * sum((quadratic_penalty(params, a.importances(), a.anchors()) for a in self.penalties),
                           torch.zeros((), device=params[0].device))

    def training_step(self, batch):
        logits = self.student(batch["image"])
        losses = {"ce": F.cross_entropy(logits, batch["label"])}
        if len(self.penalties):
            losses["ewc"] = self.penalty()
        return losses, {"acc": accuracy(logits, batch["label"])}
