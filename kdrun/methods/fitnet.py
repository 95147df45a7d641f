"""Romero et al. ICLR 2015, "FitNets: Hints for Thin Deep Nets".

Stage 1 (hints, `hint_epochs`): the student's lower part up to the guided layer and a regressor r are
trained alone to predict the teacher's hint layer, L_HT = ||u_h - r(v_g)||^2 (eq. 3; here the MSE times
`weight`). Stage 2 (`schedule.epochs`): the whole student is trained with KD, eq. (2),
L_KD = H(y, P_S) + lambda * H(P_T^tau, P_S^tau), computed (and logged as `kd`) as lambda * KL(P_T^tau || P_S^tau),
which differs from the cross-entropy by the teacher's entropy, a constant: the same gradient. lambda is annealed
linearly from `lambda_start` to `lambda_end` over the stage (tau = 3, lambda 4 -> 1 in the authors' CIFAR
configuration); the regressor is dropped. `stages=1` is the one-stage variant of the CRD benchmark: CE + weight * L_HT throughout.
The regressor ends in a ReLU when the hint is a ReLU output (`regressor_relu` null); the CRD benchmark's ConvReg
always has one (`regressor_relu=true`, method=crd/fitnet), also for WRN's hint, a residual sum that can be negative.
`regressor`: `paper` (Sec. 2.2's valid convolution; a guided map smaller than the hint moves down to the deepest
student stage at least as large) or `convreg` (the CRD benchmark's ConvReg, method=crd/fitnet: a 3x3 stride-2
convolution when the guided map is twice the hint's size, a 4x4 stride-2 transposed convolution when it is half,
else the valid convolution; the guided layer stays where it is).
"""

import torch
from torch import nn

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.losses import hint_loss, kd_loss
from kdrun.methods.base import Stage, accuracy
from kdrun.methods.feature import FeatureMethod, convreg


def regressor(s_shape, t_shape, relu: bool, form: str = "paper") -> nn.Module:
    """The paper's convolutional regressor: a conv of kernel (1 + Hs - Ht, 1 + Ws - Wt) without padding maps the
    guided map onto the hint's size (Sec. 2.2) and, when the hint is a ReLU output, a ReLU (r keeps the hint's
    non-linearity); between them a BatchNorm, which the paper's regressor does not have (the CRD benchmark's
    ConvReg does); for vector features a Linear regressor. `form="convreg"`: the CRD benchmark's ConvReg
    (`kdrun.methods.feature.convreg`), which also halves or doubles the guided map's size."""
    if len(s_shape) != len(t_shape) or len(s_shape) not in (2, 4):
        raise KdrunError(f"FitNets' regressor maps the student's guided layer onto the teacher's hint, two feature "
                         f"maps (C, H, W) or two vectors, but they are {tuple(s_shape[1:])} and {tuple(t_shape[1:])}; "
                         "choose layers of one kind with student.feature_layers and teacher.feature_layers (PATH:in "
                         "reads a module's input, e.g. fc:in for the classifier's input vector)")
    if len(s_shape) == 2:
        return nn.Sequential(nn.Linear(s_shape[1], t_shape[1]), *([nn.ReLU()] if relu else []))
    if form == "convreg":
        return convreg(s_shape, t_shape, relu)
    (hs, ws), (ht, wt) = s_shape[2:], t_shape[2:]
    if hs < ht or ws < wt:
        raise KdrunError(f"FitNets' regressor maps a larger guided layer onto a smaller hint, but the student's "
                         f"guided map is {hs}x{ws} and the teacher's hint {ht}x{wt}; pick a student layer at least "
                         "as large with student.feature_layers (or a smaller teacher.feature_layers)")
    conv = nn.Conv2d(s_shape[1], t_shape[1], (1 + hs - ht, 1 + ws - wt), bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(t_shape[1]), *([nn.ReLU()] if relu else []))


class FitNet(FeatureMethod):
    ranges = {"stages": "{1, 2}", "hint_epochs": "[0, inf)", "lambda_start": "[0, inf)", "lambda_end": "[0, inf)",
              "regressor": "{paper, convreg}"}
    positions = "middle"

    def __init__(self, student, teacher, stages: int = 2, hint_epochs: int = 30, weight: float = 100.0,
                 temperature: float = 3.0, lambda_start: float = 4.0, lambda_end: float = 1.0,
                 ce_weight: float = 1.0, kd_weight: float = 0.0, regressor_relu: bool | None = None,
                 regressor: str = "paper", student_layers=None, teacher_layers=None):
        super().__init__(student, teacher, weight, ce_weight, kd_weight, temperature, student_layers, teacher_layers)
        self.num_stages = stages
        self.hint_epochs = hint_epochs
        self.lambda_start = lambda_start
        self.lambda_end = lambda_end
        self.regressor_relu = regressor_relu
        self.regressor_form = regressor

    def specs(self, model, role, t_feats=None):
        """The hint is the teacher's middle stage; the guided layer the student's middle stage or, when that
        map is smaller than the hint and the regressor is the paper's, the deepest student stage at least as large
        (the paper's regressor only shrinks)."""
        specs = super().specs(model, role, t_feats)
        if role == "teacher" or self.layers["student"] or t_feats[0].dim() != 4 or self.regressor_form == "convreg":
            return specs
        stages = self.stages_of(model, role)
        middle = stages.index(specs[0])
        h, w = t_feats[0].shape[2:]
        feats = self.probe(model, stages, role)
        large = [i for i, f in enumerate(feats[: middle + 1]) if f.dim() == 4 and f.shape[2] >= h and f.shape[3] >= w]
        return [stages[large[-1]]] if large and large[-1] != middle else specs

    def build(self, s_feats, t_feats):
        if self.num_stages not in (1, 2):
            raise KdrunError(f"method.stages={self.num_stages}: FitNets has 2 stages (hints, then KD) or the 1-stage "
                             "variant; use 1 or 2")
        if len(s_feats) != 1:
            raise KdrunError(f"FitNets guides one student layer by one teacher hint, got {len(s_feats)}; give one "
                             "path each in student.feature_layers and teacher.feature_layers")
        relu = bool((t_feats[0] >= 0).all()) if self.regressor_relu is None else self.regressor_relu
        self.regressor = regressor(s_feats[0].shape, t_feats[0].shape, relu=relu, form=self.regressor_form)
        x = features.probe_input(self.student, self.input_shape)
        self.guided_params = features.parameters_before(self.student, self.s_hooks.specs[0], x)

    def stages(self, epochs):
        if self.num_stages == 1:
            return [Stage("train", epochs)]
        return [Stage("hint", self.hint_epochs, params=self.guided_params + list(self.regressor.parameters())),
                Stage("kd", epochs, params=list(self.student.parameters()))]

    def on_stage_start(self, stage, loop):
        super().on_stage_start(stage, loop)
        self.kd_epochs = stage.epochs  # lambda anneals over the KD stage

    def kd_lambda(self) -> float:
        """lambda of stage 2, linear in the epochs of that stage from lambda_start to lambda_end."""
        done = (self.epoch - self.hint_epochs) / max(1, self.kd_epochs - 1)
        return self.lambda_start + (self.lambda_end - self.lambda_start) * min(max(done, 0.0), 1.0)

    def training_step(self, batch):
        if self.stage != "kd":
            return super().training_step(batch)
        logits = self.student(batch["image"])
        t_logits = self.teacher_outputs(batch)
        soft = kd_loss(logits, t_logits, self.temperature) / self.temperature**2  # H(P_T^tau, P_S^tau) up to a constant
        losses = {"ce": torch.nn.functional.cross_entropy(logits, batch["label"]), "kd": self.kd_lambda() * soft}
        return losses, {"acc": accuracy(logits, batch["label"])}

    def distill(self, s_feats, t_feats, batch):
        return {"hint": self.weight * hint_loss(self.regressor(s_feats[0]), t_feats[0])}
