"""Yin et al. (CVPR 2020), "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion".

No training image is read. Images are optimised from noise (Adam on the pixels, in the normalised space, clamped
to valid intensities, each step on a randomly rolled ("jittered", and flipped where the dataset flips) copy) to
minimise

    ce_weight * CE(T(x), y) + bn_weight * sum_l (||mu_l(x) - mu_l^BN||_2 + ||var_l(x) - var_l^BN||_2)
    + tv_weight * R_TV(x) + l2_weight * R_l2(x)  [- competition_weight * JS(T(x) / 3, S(x) / 3)]

for balanced target classes y: the teacher's BatchNorm layers see their stored statistics (forward hooks on every
BatchNorm layer; the teacher needs some), the teacher predicts y, and the images are smooth and small. The last
term is Adaptive DeepInversion's competition: it favours images on which the student disagrees with the teacher
(Jensen-Shannon divergence at T = 3, the paper's), so each round brings what the student lacks.

The synthesised set is built in `rounds` (a stage each, the schedule's epochs shared out, one optimizer and LR
schedule over all): a round starts by synthesising `batches_per_round` batches of `synthesis_batch_size` images
(`synthesis_steps` Adam steps each), then the student distils on every image made so far with Hinton KD at
`temperature` (the dataset's crop/flip augmentation, the teacher run on each view). The set is a fixed-capacity
buffer of the method's state, so a resumed run continues exactly. Each round's images are saved as
`samples/round<k>.png` (a column per class).

Weights: from the paper's CIFAR-10 setting (Adam lr 0.05, BN weight 10, TV 2.5e-5, jitter 2 px, 2,000 steps on
batches of 256), scaled for small images and small nets. The priors are averaged per image instead of summed over
the batch, so they do not depend on the batch size: TV 2.5e-5 on the norm over 256 images is ~4e-4 per image;
kdrun uses 1e-3 (the authors advise more TV for cleaner images) and l2 1e-4. BN weight 1, jitter 1 px and 200
steps: on digits (the default cnn teacher, batches of 128) BN weight 10 left the targets unmet (the teacher's
accuracy on them 0.30 after 200 steps; 0.98 at weight 1, 1.00 with jitter 1 instead of 2).
"""

import contextlib
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.data import train_augment
from kdrun.errors import KdrunError
from kdrun.losses import kd_loss
from kdrun.losses.data_free import (
    bn_statistics_loss,
    js_divergence,
    l2_prior,
    total_variation,
)
from kdrun.methods.base import Stage
from kdrun.methods.data_free import DataFree

log = logging.getLogger(__name__)

COMPETITION_TEMPERATURE = 3.0  # Adaptive DeepInversion's


class BNStatistics:
    """While active (a context manager), each forward of `model` adds, per BatchNorm layer, `bn_statistics_loss`
    of the layer's input against the layer's stored statistics to `losses`."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.losses: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self):
        self.losses = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, module, inputs, output):  # after the forward: a train-mode forward has updated the stats
        self.losses.append(bn_statistics_loss(inputs[0], module.running_mean, module.running_var))

    def loss(self) -> torch.Tensor:
        """The sum over the layers of the forwards so far."""
        return sum(self.losses)


class DeepInversion(DataFree):
    ranges = {"rounds": "[1, inf)", "batches_per_round": "[1, inf)", "synthesis_batch_size": "[1, inf)",
              "synthesis_steps": "[1, inf)", "synthesis_lr": "(0, inf)", "bn_weight": "[0, inf)",
              "ce_weight": "[0, inf)", "tv_weight": "[0, inf)", "l2_weight": "[0, inf)",
              "competition_weight": "[0, inf)", "jitter": "[0, inf)", "temperature": "(0, inf)"}

    def __init__(self, student, teacher, rounds: int = 4, batches_per_round: int = 2, synthesis_batch_size: int = 256,
                 synthesis_steps: int = 200, synthesis_lr: float = 0.05, bn_weight: float = 1.0,
                 ce_weight: float = 1.0, tv_weight: float = 1e-3, l2_weight: float = 1e-4,
                 competition_weight: float = 0.0, jitter: int = 1, temperature: float = 4.0):
        super().__init__(student, teacher)
        self.rounds, self.batches_per_round = rounds, batches_per_round
        self.synthesis_batch_size, self.synthesis_steps, self.synthesis_lr = (synthesis_batch_size, synthesis_steps,
                                                                              synthesis_lr)
        self.bn_weight, self.ce_weight, self.tv_weight, self.l2_weight = bn_weight, ce_weight, tv_weight, l2_weight
        self.competition_weight, self.jitter, self.temperature = competition_weight, jitter, temperature
        self.bn = BNStatistics(teacher)
        self.round = 1  # the round under way (its stage's)
        self.augment = self.flip = None
        self.register_buffer("rounds_done", torch.tensor(0))  # rounds whose images are in the buffer

    def setup(self, data):
        super().setup(data)
        if self.bn_weight and not self.bn.layers:
            raise KdrunError(f"method=deepinversion matches the teacher's BatchNorm statistics, but the teacher "
                             f"({type(self.teacher).__name__}) has no BatchNorm layer; use method=dfad, which needs "
                             "none, or set method.bn_weight=0")
        capacity = self.rounds * self.batches_per_round * self.synthesis_batch_size
        self.register_buffer("images", torch.zeros(capacity, *self.shape))
        self.register_buffer("labels", torch.zeros(capacity, dtype=torch.long))
        augment = train_augment(data)
        self.augment = augment if augment else None
        self.flip = bool(data.augment.get("flip", False))

    def stages(self, epochs):
        r = self.rounds
        return [Stage(f"round{k + 1}", epochs * (k + 1) // r - epochs * k // r, params=list(self.student.parameters()),
                      fresh_optimizer=k == 0, info={"round": k + 1}) for k in range(r)]

    def on_stage_start(self, stage, loop):
        self.round = stage.info["round"]

    def step(self, batch, loop):
        while int(self.rounds_done) < self.round:  # here, not in on_stage_start: a resumed round has its images
            self.synthesize(loop, int(self.rounds_done) + 1)
        return super().step(batch, loop)

    def training_step(self, batch):
        index = torch.randint(self.filled, (batch["size"],), device=self.images.device)
        x = self.images[index]
        if self.augment is not None:
            x = self.augment(x, None)
        teacher_logits = self.teacher_outputs({"image": x})
        logits = self.student(x)
        return ({"kd": kd_loss(logits, teacher_logits, self.temperature)},
                {"agree": (logits.argmax(1) == teacher_logits.argmax(1)).float().mean()})

    @property
    def filled(self) -> int:
        return int(self.rounds_done) * self.batches_per_round * self.synthesis_batch_size

    def synthesize(self, loop, k: int) -> None:
        """Round k's images, into the buffer; saved as samples/round<k>.png and logged."""
        start, t0 = self.filled, time.perf_counter()
        training = self.student.training
        self.student.eval()  # the competition term asks the student without changing its BatchNorm statistics
        rows = []
        for b in range(self.batches_per_round):
            x, y, terms = self.invert(self.synthesis_batch_size)
            at = start + b * self.synthesis_batch_size
            self.images[at:at + len(x)], self.labels[at:at + len(x)] = x, y
            rows.append(terms)
        self.student.train(training)
        self.rounds_done.fill_(k)
        means = {f"deepinversion/{name}": sum(r[name] for r in rows) / len(rows) for name in rows[0]}
        loop.log({"deepinversion/round": k, **means})
        log.info("deepinversion: round %d: %d images in %.0f s, the teacher's accuracy on their targets %.3f, "
                 "BatchNorm loss %.3f", k, self.filled - start, time.perf_counter() - t0,
                 means["deepinversion/teacher_acc"], means.get("deepinversion/bn", 0.0))
        x, y = self.images[start:self.filled], self.labels[start:self.filled]
        per = min(8, int(torch.bincount(y, minlength=self.num_classes).min()))
        if per:  # a column per class
            self.save_grid(loop, torch.stack([x[y == c][i] for i in range(per) for c in range(self.num_classes)]),
                           f"round{k}")
        else:
            self.save_grid(loop, x[:64], f"round{k}", nrow=8)

    def invert(self, n: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """n images optimised from noise for balanced random targets; the images, targets and final loss terms."""
        device = self.images.device
        low, high = self.pixel_range(device)
        y = (torch.arange(n) % self.num_classes)[torch.randperm(n)].to(device)
        x = torch.max(torch.min(torch.randn(n, *self.shape, device=device), high), low).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=self.synthesis_lr)
        for _ in range(self.synthesis_steps):
            terms, teacher_logits = self.inversion_loss(self.jittered(x), y)
            x.grad, = torch.autograd.grad(sum(terms.values()), x)
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.max(torch.min(x, high), low))
        x = x.detach()
        with torch.no_grad():
            terms, teacher_logits = self.inversion_loss(x, y)
        out = {k: float(v) for k, v in terms.items()}
        out["teacher_acc"] = float((teacher_logits.argmax(1) == y).float().mean())
        return x, y, out

    def inversion_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The weighted terms of the synthesis objective on images x for targets y, and the teacher's logits."""
        with self.bn if self.bn_weight else contextlib.nullcontext():
            teacher_logits = self.teacher(x)
        terms = {"ce": self.ce_weight * F.cross_entropy(teacher_logits, y)}
        if self.bn_weight:
            terms["bn"] = self.bn_weight * self.bn.loss()
        if self.tv_weight:
            terms["tv"] = self.tv_weight * total_variation(x)
        if self.l2_weight:
            terms["l2"] = self.l2_weight * l2_prior(x)
        if self.competition_weight:
            disagreement = js_divergence(teacher_logits, self.student(x), COMPETITION_TEMPERATURE)
            terms["competition"] = -self.competition_weight * disagreement
        return terms, teacher_logits

    def jittered(self, x: torch.Tensor) -> torch.Tensor:
        """x rolled by up to `jitter` pixels each way (and mirrored, half the time, where the dataset flips)."""
        if self.jitter:
            dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(3)
        return x
