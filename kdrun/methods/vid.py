"""Ahn et al. CVPR 2019, "Variational Information Distillation for Knowledge Transfer" (VID).

loss = CE + weight * sum_k -log q(t_k | s_k): a Gaussian with mean mu(s_k), a small conv net on the student
feature (1x1 conv - ReLU - 1x1 conv - ReLU - 1x1 conv), and per-channel variance
sigma_c^2 = softplus(alpha_c) + eps (eq. 2-4), over the stage outputs. The negative log-likelihood is
averaged over elements and `weight` = 1, as in the CRD benchmark; the variances start at 5.
"""

import math

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.losses import vid_loss
from kdrun.methods.feature import FeatureMethod, match_spatial


class VID(FeatureMethod):
    ranges = {"init_var": "(0, inf)", "eps": "(0, inf)"}
    positions = "stages"

    def __init__(self, student, teacher, weight: float = 1.0, init_var: float = 5.0, eps: float = 1e-5, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.init_var, self.eps = init_var, eps

    def build(self, s_feats, t_feats):
        if any(f.dim() != 4 for f in s_feats + t_feats):
            raise KdrunError("vid regresses feature maps with 1x1 convolutions; choose (B, C, H, W) feature layers")
        self.means = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False), nn.ReLU(),
                          nn.Conv2d(t.shape[1], t.shape[1], 1, bias=False), nn.ReLU(),
                          nn.Conv2d(t.shape[1], t.shape[1], 1, bias=False))
            for s, t in zip(s_feats, t_feats))
        alpha = math.log(math.expm1(self.init_var - self.eps))  # softplus(alpha) + eps = init_var
        self.alphas = nn.ParameterList(nn.Parameter(torch.full((t.shape[1],), alpha)) for t in t_feats)

    def distill(self, s_feats, t_feats, batch):
        total = 0.0
        for s, t, mean, alpha in zip(s_feats, t_feats, self.means, self.alphas):
            s, t = match_spatial(s, t)
            total = total + vid_loss(mean(s), t, alpha, self.eps, reduction="mean")
        return {"vid": self.weight * total}
