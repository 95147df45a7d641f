"""Huang & Wang 2017, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer" (NST).

loss = CE + weight * MMD^2(F_T, F_S) (the paper's lambda/2 folded into `weight` = 50, the CRD benchmark's)
with the polynomial kernel k(x, y) = (x^T y)^2 (eq. 6-8), each channel's normalised spatial map one
sample, summed over the stage outputs. Maps of different sizes are average-pooled to the smaller one.
"""

from kdrun.losses import nst_loss
from kdrun.methods.feature import FeatureMethod, match_spatial


class NST(FeatureMethod):
    positions = "stages"

    def __init__(self, student, teacher, weight: float = 50.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)

    def distill(self, s_feats, t_feats, batch):
        return {"nst": self.weight * sum(nst_loss(*match_spatial(s, t)) for s, t in zip(s_feats, t_feats))}
