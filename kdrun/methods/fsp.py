"""Yim et al. CVPR 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
Transfer Learning" (FSP).

Init stage (`init_epochs`): the student's feature extractor is trained alone to match the teacher's FSP
matrices G = sum_{h,w} F1 F2^T / (h w) (eq. 1) between consecutive feature positions (the input of the
first stage, then each stage's output): sum_i ||G_T^i - G_S^i||^2 (eq. 2, all lambda_i equal), averaged
over the matrix entries as in the CRD benchmark, with `weight` = 1. The larger map of a pair is
average-pooled to the smaller. Then (`schedule.epochs`) the student trains for the task with CE (and KD
when `kd_weight` > 0). Teacher and student need equal channel counts at every position.
"""

import torch.nn.functional as F

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.losses import fsp_loss
from kdrun.methods.base import Stage
from kdrun.methods.feature import FeatureMethod


def _pairs(feats):
    """Consecutive maps, the larger of each pair pooled to the smaller's size."""
    out = []
    for a, b in zip(feats, feats[1:]):
        size = min(a.shape[2:], b.shape[2:], key=lambda s: s[0] * s[1])
        out.append(tuple(f if f.shape[2:] == size else F.adaptive_avg_pool2d(f, size) for f in (a, b)))
    return out


class FSP(FeatureMethod):
    ranges = {"init_epochs": "[0, inf)"}
    positions = "input+stages"

    def __init__(self, student, teacher, init_epochs: int = 30, weight: float = 1.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.init_epochs = init_epochs

    def build(self, s_feats, t_feats):
        channels = [(s.shape[1], t.shape[1]) for s, t in zip(s_feats, t_feats)]
        if len(s_feats) < 2 or any(a != b or s.dim() != 4 for (a, b), s in zip(channels, s_feats)):
            raise KdrunError(f"fsp matches C1 x C2 flow matrices between at least two feature maps, but the (student, "
                             f"teacher) channels are {channels}; pick layers with equal channel counts "
                             "(student.feature_layers / teacher.feature_layers) or a student of the teacher's widths")
        x = features.probe_input(self.student, self.input_shape)
        self.extractor = features.parameters_before(self.student, self.s_hooks.specs[-1], x)

    def stages(self, epochs):
        return [Stage("init", self.init_epochs, params=self.extractor),
                Stage("task", epochs, params=list(self.student.parameters()))]

    def distill(self, s_feats, t_feats, batch):
        return {"fsp": self.weight * fsp_loss(_pairs(s_feats), _pairs(t_feats), reduction="mean")}
