"""Heo et al. ICCV 2019, "A Comprehensive Overhaul of Feature Distillation" (OFD).

At the end of each stage, before the ReLU, a connector r (1x1 conv + BN) maps the student's response onto
the teacher's, and loss = CE + alpha * sum_i d_p(sigma_m(T_i), r(S_i)) / 2^(n - i - 1) (eq. 5-6): the
margin ReLU sigma_m(T) = max(T, m) of the teacher's pre-ReLU response, compared by a partial L2 that
ignores a student already below a negative target, summed over elements and divided by the batch size;
alpha = `weight` = 1e-3 (the CIFAR setting). The per-channel margin m = E[t | t < 0] of a Gaussian with
the response's mean and standard deviation: the paper reads those from the BatchNorm before the ReLU;
kdrun measures them on the teacher's pre-ReLU responses of the first training batch (exact also where a
residual sum sits between the BatchNorm and the ReLU) and keeps them as buffers.
`align`: `resolution` (stages of equal size, compared position by position) or `pool` (mdistiller's, the CRD
table's OFD row, method=crd/ofd: the stages paired in order whatever their sizes, each teacher map average-pooled
to its student map's size; with unequal stage counts kdrun pairs by resolution where mdistiller keeps each list's
last ones, which no pair of the table has).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.losses import ofd_loss, ofd_margin
from kdrun.methods.feature import FeatureMethod, connector, same_spatial


class OFD(FeatureMethod):
    ranges = {"align": "{resolution, pool}"}
    positions = "stages"
    preact = (True, True)
    pairing = "resolution"

    def __init__(self, student, teacher, weight: float = 1e-3, align: str = "resolution", **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.margins_known, self.align = False, align
        if align == "pool":
            self.pairing = "index"

    def build(self, s_feats, t_feats):
        if self.align == "resolution":
            same_spatial(s_feats, t_feats, "ofd")
        self.connectors = nn.ModuleList(connector(s.shape, t.shape) for s, t in zip(s_feats, t_feats))
        for i, t in enumerate(t_feats):
            self.register_buffer(f"margin_{i}", torch.full((t.shape[1],), float("nan")))

    def margins(self, t_feats) -> list[torch.Tensor]:
        """The per-channel margins, measured once on the first batch seen (NaN until then)."""
        margins = [getattr(self, f"margin_{i}") for i in range(len(t_feats))]
        if not self.margins_known:
            for m, t in zip(margins, t_feats):
                if torch.isnan(m).any():
                    dims = [0] + list(range(2, t.dim()))
                    m.copy_(ofd_margin(t.float().mean(dims), t.float().std(dims).clamp_min(1e-5)))
            self.margins_known = True
        return margins

    def distill(self, s_feats, t_feats, batch):
        n, margins = len(s_feats), self.margins(t_feats)
        if self.align == "pool":
            t_feats = [t if t.shape[2:] == s.shape[2:] else F.adaptive_avg_pool2d(t, s.shape[2:])
                       for s, t in zip(s_feats, t_feats)]
        total = sum(ofd_loss(r(s), t, m) / 2 ** (n - i - 1)
                    for i, (s, t, r, m) in enumerate(zip(s_feats, t_feats, self.connectors, margins)))
        return {"ofd": self.weight * total}
