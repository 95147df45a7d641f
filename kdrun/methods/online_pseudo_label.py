"""Lee (ICML 2013 workshop), "Pseudo-Label": one network learns from labeled images and from its own current
predictions on unlabeled ones, with no teacher. At every update, an unlabeled image's pseudo label is the class
the network predicts for it in that very forward pass (argmax, no gradient through the choice), and

    L = CE(y, f(x)) + alpha(t) * CE(argmax f(u), f(u)),

each term the mean over its batch (Lee's Eq. 15), where alpha(t) ramps up with the epoch t (Eq. 16):
0 before `t1`, alpha_f (t - t1) / (t2 - t1) between, alpha_f from `t2` on, so the network first learns from
the labels alone and its own guesses weigh in slowly ("deterministic annealing"). Lee's values: alpha_f = 3,
t1 = 100, t2 = 600 epochs (without pre-training); kdrun reads t continuously (the epoch's fraction counts), and
logs alpha as `train/alpha`. Lee's other ingredients, dropout in the network and a denoising auto-encoder's
pre-training, are the model's business here (`student.drop_rate`), not the method's.

`method=offline_pseudo_label` is the teacher-student form (a trained teacher labels the unlabeled set once).
"""

import logging

import torch
import torch.nn.functional as F

from kdrun.data import BatchSpec
from kdrun.data.semi import Stream
from kdrun.errors import KdrunError
from kdrun.methods.base import Method, accuracy

log = logging.getLogger(__name__)


def alpha(epoch: float, alpha_f: float, t1: float, t2: float) -> float:
    """Lee's Eq. 16: the unlabeled term's weight at (fractional) epoch `epoch`."""
    if epoch < t1:
        return 0.0
    if epoch < t2:
        return alpha_f * (epoch - t1) / (t2 - t1)
    return alpha_f


class OnlinePseudoLabel(Method):
    ranges = {"alpha_f": "[0, inf)", "t1": "[0, inf)", "t2": "[0, inf)", "unlabeled_ratio": "(0, inf)"}

    def __init__(self, student, teacher=None, alpha_f: float = 3.0, t1: float = 100, t2: float = 600,
                 unlabeled_ratio: float = 8.0):
        super().__init__(student, teacher)
        if not t1 < t2:
            raise KdrunError(f"method.t1={t1} and method.t2={t2}: the ramp of the unlabeled weight starts at t1 and "
                             "ends at t2; give t1 < t2 (Lee: 100 and 600 epochs)")
        self.alpha_f, self.t1, self.t2 = alpha_f, t1, t2
        self.batch_spec = BatchSpec(unlabeled=Stream(unlabeled_ratio))
        self.epoch = 0.0  # where the loop is, read each step for alpha(t)

    def on_stage_start(self, stage, loop):
        if stage.epochs <= self.t1:
            log.warning("online pseudo-label: the unlabeled weight alpha(t) starts at epoch method.t1=%g, but this run "
                        "trains %d epochs, so it stays 0 (labeled images alone); give a smaller method.t1 and t2",
                        self.t1, stage.epochs)

    def step(self, batch, loop):
        self.epoch = loop.epoch + (loop.step % loop.steps_per_epoch) / loop.steps_per_epoch
        return super().step(batch, loop)

    def training_step(self, batch):
        x, u = batch["image"], batch["unlabeled_image"]
        logits = self.student(torch.cat([x, u]))  # one forward: BatchNorm sees labeled and unlabeled images
        logits_x, logits_u = logits[:len(x)], logits[len(x):]
        weight = alpha(self.epoch, self.alpha_f, self.t1, self.t2)
        pseudo = logits_u.detach().argmax(1)
        losses = {"ce": F.cross_entropy(logits_x, batch["label"]),
                  "pseudo": weight * F.cross_entropy(logits_u, pseudo)}
        return losses, {"acc": accuracy(logits_x, batch["label"]), "alpha": logits.new_tensor(weight)}
