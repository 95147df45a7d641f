"""Self-training on a trained teacher's pseudo labels (Lee, ICML-W 2013, "Pseudo-Label", in its
teacher-student form): a teacher trained on the labeled part labels every unlabeled image once, un-noised
(eval mode, no augmentation), and the student trains on labeled and pseudo-labeled images together:

    L = CE(y, S(x)) + lambda_u * mean_i[w_i * CE(t_i, S(u_i))] / mean_j[w_j]

t_i is the teacher's prediction on unlabeled image i (one-hot on its argmax with `hard`, its softmax
otherwise); w_i = 1 when its confidence max t_i reaches `threshold`, else 0. The first mean is over the
batch, the second over the whole unlabeled set, so the term is the mean loss over the images kept, as if
the others had been removed from the data. Noisy Student and Data Distillation build on this class.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data import BatchSpec
from kdrun.data.semi import Stream
from kdrun.errors import KdrunError
from kdrun.methods.base import Method, accuracy

log = logging.getLogger(__name__)


class PseudoLabel(Method):
    ranges = {"threshold": "[0, 1)", "unlabeled_weight": "[0, inf)", "unlabeled_ratio": "(0, inf)"}
    needs_teacher = True

    def __init__(self, student, teacher, hard: bool = True, threshold: float = 0.0, unlabeled_weight: float = 1.0,
                 unlabeled_ratio: float = 7.0, randaugment: dict | None = None, noise_labeled: bool = False):
        """`noise_labeled`: RandAugment on the student's labeled images too (Noisy Student's noised student)."""
        super().__init__(student, teacher)
        if not 0 <= threshold < 1:
            raise KdrunError(f"method.threshold={threshold}; give a confidence in [0, 1)")
        self.hard = hard
        self.threshold = threshold
        self.unlabeled_weight = unlabeled_weight
        self.batch_spec = BatchSpec(unlabeled=Stream(unlabeled_ratio, dict(randaugment) if randaugment else None,
                                                     noise_labeled))
        self.targets: torch.Tensor | None = None  # (N_u, C) pseudo labels, made at a stage's first step
        self.weights: torch.Tensor | None = None  # (N_u,) w_i / mean_j w_j

    def on_stage_start(self, stage, loop):
        self.targets = None  # labelled lazily, after a resume has restored the teacher

    def labeler(self) -> nn.Module:
        """The network whose predictions become the pseudo labels."""
        return self.teacher

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities of `model` (in eval mode) on a batch of un-augmented images."""
        return F.softmax(model(images).float(), dim=1)

    def select(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-image weights w_i: 1 for a confident prediction, 0 for one filtered out."""
        return (probs.max(1).values >= self.threshold).float()

    @torch.no_grad()
    def make_labels(self, loop) -> dict:
        """Label the whole unlabeled set with `labeler()`, un-noised; returns the labelling's statistics."""
        model = self.labeler()
        was_training = model.training
        model.eval()
        probs, true = [], []  # true: the hidden labels, for the diagnostics below only
        with loop.autocast():
            for batch in loop.batches("unlabeled"):
                probs.append(self.predict(model, batch["image"]))
                true.append(batch["label"])
        model.train(was_training)
        probs = torch.cat(probs)
        true = torch.cat(true).to(probs.device)
        weights = self.select(probs)
        if not weights.sum() > 0:
            raise KdrunError(f"no unlabeled image reaches method.threshold={self.threshold} (the teacher's highest "
                             f"confidence is {probs.max():.3f}); lower method.threshold")
        predicted = probs.argmax(1)
        self.targets = F.one_hot(predicted, probs.shape[1]).float() if self.hard else probs
        self.weights = weights / weights.mean()
        kept = weights > 0
        stats = {"pseudo/acc": (predicted == true).float().mean().item(),
                 "pseudo/kept": kept.float().mean().item(),
                 "pseudo/acc_kept": (predicted[kept] == true[kept]).float().mean().item()}
        loop.log(stats)
        log.info("pseudo labels: %d unlabeled images, %.1f%% kept, accuracy %.4f (kept: %.4f)", len(probs),
                 100 * stats["pseudo/kept"], stats["pseudo/acc"], stats["pseudo/acc_kept"])
        return stats

    def step(self, batch, loop):
        if self.targets is None:
            self.make_labels(loop)
        return super().step(batch, loop)

    def training_step(self, batch):
        x, u = batch["image"], batch["unlabeled_image"]
        logits = self.student(torch.cat([x, u]))  # one forward: BatchNorm sees labeled and unlabeled images
        logits_x, logits_u = logits[:len(x)], logits[len(x):]
        index = batch["unlabeled_index"]
        per_image = -(self.targets[index] * F.log_softmax(logits_u.float(), dim=1)).sum(1)
        losses = {"ce": F.cross_entropy(logits_x, batch["label"]),
                  "pseudo": self.unlabeled_weight * (self.weights[index] * per_image).mean()}
        return losses, {"acc": accuracy(logits_x, batch["label"])}
