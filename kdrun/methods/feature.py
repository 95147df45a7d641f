"""The shared shape of the feature-distillation methods, so that each method file stays a small class.

A feature method says which feature positions of the two models it reads by default (`positions`), builds
its trainable connectors from probe features in `build`, and turns the features of a batch into weighted
losses in `distill`. This base reads the features with forward hooks (`kdrun.features`) by module path
(`student.feature_layers` / `teacher.feature_layers`, null: chosen from the model's
`default_feature_layers`), adds the cross-entropy (`ce_weight`) and, as the CRD benchmark composes
methods, Hinton KD (`kd_weight`, at `temperature`), and keeps the current epoch for warm-ups.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.losses import kd_loss
from kdrun.methods.base import Method, accuracy, teacher_view

log = logging.getLogger(__name__)


class FeatureMethod(Method):
    """Base of the methods that distil intermediate features (see the module docstring)."""

    ranges = {"weight": "[0, inf)", "ce_weight": "[0, inf)", "kd_weight": "[0, inf)", "temperature": "(0, inf)"}

    needs_teacher = True
    # stages: every default stage; last / middle: one of them; embedding: the classifier's input; input+stages: the
    # stem's output (the model's `stem_layer`, else the first stage's input), then the stages
    positions = "stages"
    preact = (False, False)  # read the (student, teacher) pre-ReLU responses of those stages
    # how default stages pair up: "index" (i-th with i-th; by resolution when the counts differ), "resolution"
    # (stages of equal resolution: the loss compares maps position by position), "fixed" (as listed)
    pairing = "index"

    def __init__(self, student, teacher, weight: float = 1.0, ce_weight: float = 1.0, kd_weight: float = 0.0,
                 temperature: float = 4.0, student_layers=None, teacher_layers=None):
        super().__init__(student, teacher)
        self.weight = weight
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.layers = {"student": list(student_layers or []), "teacher": list(teacher_layers or [])}
        self.epoch = 0

    # ---- building -------------------------------------------------------------------------------
    def setup(self, data) -> None:
        self.input_shape = (data.in_chans, data.image_size, data.image_size)
        t_specs = self.specs(self.teacher, "teacher")
        t_feats = self.probe(self.teacher, t_specs, "teacher")
        s_specs = self.specs(self.student, "student", t_feats)
        s_feats = self.probe(self.student, s_specs, "student")
        sizes = [f.shape[2:] for f in s_feats], [f.shape[2:] for f in t_feats]
        chosen = self.layers["student"] or self.layers["teacher"]
        if not chosen and self.positions == "stages" and self.pairing != "fixed" and (
                len(s_specs) != len(t_specs) or (self.pairing == "resolution" and sizes[0] != sizes[1])):
            pairs = [(i, sizes[1].index(size)) for i, size in enumerate(sizes[0]) if size in sizes[1]]
            s_specs, s_feats = [s_specs[i] for i, _ in pairs], [s_feats[i] for i, _ in pairs]
            t_specs, t_feats = [t_specs[j] for _, j in pairs], [t_feats[j] for _, j in pairs]
        if len(s_specs) != len(t_specs) or not s_specs:
            raise KdrunError(f"{type(self).__name__} pairs student and teacher features one to one, but got "
                             f"{len(s_specs)} student and {len(t_specs)} teacher layers; give student.feature_layers "
                             "and teacher.feature_layers of the same, non-zero length")
        self.s_hooks = features.FeatureHooks(self.student, s_specs, "student")
        self.t_hooks = features.FeatureHooks(self.teacher, t_specs, "teacher")
        log.info("%s: student features %s %s, teacher features %s %s", type(self).__name__, s_specs,
                 [tuple(f.shape[1:]) for f in s_feats], t_specs, [tuple(f.shape[1:]) for f in t_feats])
        self.build(s_feats, t_feats)

    def specs(self, model: nn.Module, role: str, t_feats: list[torch.Tensor] | None = None) -> list[str]:
        """The feature specs read from `model`: `<role>.feature_layers` if given, else this method's positions
        (for the student, `t_feats` holds the teacher's probe features)."""
        given = self.layers[role]
        x = features.probe_input(model, self.input_shape)
        if given:
            for spec in given:
                features.resolve(model, spec, role)
            chosen = given
        elif self.positions == "embedding":
            return [features.classifier_input(model, x, role)]
        else:
            stages = self.stages_of(model, role)
            stem = getattr(model, "stem_layer", None) or stages[0] + features.INPUT_SUFFIX
            chosen = {"stages": stages, "last": stages[-1:], "middle": [stages[(len(stages) - 1) // 2]],
                      "input+stages": [stem] + stages}[self.positions]
        if self.preact[role == "teacher"]:  # a stage path stands for its pre-ReLU response; PATH:in is kept
            chosen = [features.preactivation(model, spec, x) for spec in chosen]
        return chosen

    @staticmethod
    def stages_of(model: nn.Module, role: str) -> list[str]:
        """The model's `default_feature_layers` (for kdrun's CIFAR nets, the CRD benchmark's `feat[1:-1]`)."""
        stages = list(getattr(model, "default_feature_layers", None) or [])
        if not stages:
            raise KdrunError(f"the {role} model names no default feature layers; set {role}.feature_layers to its "
                             "module paths (e.g. [layer2, layer3])")
        return stages

    def probe(self, model: nn.Module, specs: list[str], role: str) -> list[torch.Tensor]:
        """The features `specs` of `model` on a fixed probe batch (eval mode, no gradient)."""
        return features.probe(model, specs, features.probe_input(model, self.input_shape), role)

    def build(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> None:
        """Create the method's trainable modules from probe features (B, ...) of both models."""

    # ---- training -------------------------------------------------------------------------------
    stage = "train"  # "init" / "hint": a feature-only stage before the task; "task": the task after it

    def on_stage_start(self, stage, loop):
        self.stage = stage.name

    def step(self, batch, loop):
        self.epoch = loop.epoch  # completed epochs, for warm-ups and annealing
        return super().step(batch, loop)

    @torch.no_grad()
    def teacher_features(self, batch):
        """The teacher's logits and its features, captured by the hooks, for the batch's teacher view."""
        return self.t_hooks(teacher_view(batch))

    def training_step(self, batch):
        if self.stage == "task":
            return self.logits_step(batch)
        logits, s_feats = self.s_hooks(batch["image"])
        t_logits, t_feats = self.teacher_features(batch)
        losses = {} if self.stage in ("init", "hint") else self.logit_losses(logits, t_logits, batch)
        losses.update(self.distill(s_feats, t_feats, batch))
        return losses, {"acc": accuracy(logits, batch["label"])}

    def logits_step(self, batch):
        """CE (and KD when kd_weight > 0) without features: the task stage after a feature-only stage."""
        logits = self.student(batch["image"])
        t_logits = self.teacher_outputs(batch) if self.kd_weight else None
        return self.logit_losses(logits, t_logits, batch), {"acc": accuracy(logits, batch["label"])}

    def logit_losses(self, logits, t_logits, batch) -> dict[str, torch.Tensor]:
        """ce_weight * CE(student, label) and, when kd_weight > 0, kd_weight * Hinton KD at `temperature`."""
        losses = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(logits, batch["label"])
        if self.kd_weight:
            losses["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.temperature)
        return losses

    def distill(self, s_feats, t_feats, batch) -> dict[str, torch.Tensor]:
        """The method's weighted feature losses for one batch."""
        raise NotImplementedError


# ---- helpers the methods share ------------------------------------------------------------------
def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive average pooling of the larger of two (B, C, H, W) maps to the other's size, as the CRD
    benchmark does for AT, NST, VID, FT and FSP; vectors and equal sizes pass through."""
    if s.dim() < 4 or s.shape[2:] == t.shape[2:]:
        return s, t
    if s.shape[2] * s.shape[3] > t.shape[2] * t.shape[3]:
        return F.adaptive_avg_pool2d(s, t.shape[2:]), t
    return s, F.adaptive_avg_pool2d(t, s.shape[2:])


def connector(s_shape, t_shape, bn: bool = True, relu: bool = False) -> nn.Module:
    """A 1x1 conv (+BN, +ReLU) from the student's channels to the teacher's for maps, a Linear for vectors."""
    if len(s_shape) != len(t_shape):
        raise KdrunError(f"cannot connect a student feature of shape {tuple(s_shape[1:])} to a teacher feature of "
                         f"shape {tuple(t_shape[1:])}; choose feature layers that are both maps or both vectors")
    if len(s_shape) == 2:
        layers = [nn.Linear(s_shape[1], t_shape[1])] + ([nn.BatchNorm1d(t_shape[1])] if bn else [])
    else:
        layers = [nn.Conv2d(s_shape[1], t_shape[1], 1, bias=not bn)] + ([nn.BatchNorm2d(t_shape[1])] if bn else [])
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


def convreg(s_shape, t_shape, relu: bool) -> nn.Module:
    """The CRD benchmark's ConvReg (RepDistiller's FitNet regressor and AB connector), from the student's map to
    the teacher's: a 3x3 stride-2 conv when the student's map is twice the teacher's size, a 4x4 stride-2 transposed
    conv when it is half, else a valid conv of kernel (1 + Hs - Ht, 1 + Ws - Wt); then BN and, with `relu`, a ReLU.
    One sentence when the student's map is smaller than the teacher's and not half its size."""
    (cs, hs, ws), (ct, ht, wt) = s_shape[1:], t_shape[1:]
    if (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif (2 * hs, 2 * ws) == (ht, wt):
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise KdrunError(f"the benchmark's ConvReg maps a student map onto a teacher map at most twice its size, but "
                         f"they are {hs}x{ws} and {ht}x{wt}; choose layers that fit with student.feature_layers / "
                         "teacher.feature_layers")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), *([nn.ReLU()] if relu else []))


def same_spatial(s_feats, t_feats, what: str) -> None:
    """A clear error when paired maps differ in spatial size and the method does not resample them."""
    for i, (s, t) in enumerate(zip(s_feats, t_feats)):
        if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
            raise KdrunError(f"{what} compares feature maps position by position, but student feature {i} is "
                             f"{tuple(s.shape[2:])} and teacher feature {i} is {tuple(t.shape[2:])}; choose layers of "
                             "equal spatial size with student.feature_layers / teacher.feature_layers")
