"""Tung & Mori ICCV 2019, "Similarity-Preserving Knowledge Distillation" (SP).

loss = CE + gamma * 1/b^2 * ||G_S - G_T||_F^2 (eq. 2-4), G the row-normalised b x b Gram matrix of the
batch's flattened activations at the last stage; `weight` = 3000 (the CRD benchmark's gamma).
"""

from kdrun.losses import sp_loss
from kdrun.methods.feature import FeatureMethod


class SP(FeatureMethod):
    positions = "last"

    def __init__(self, student, teacher, weight: float = 3000.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)

    def distill(self, s_feats, t_feats, batch):
        return {"sp": self.weight * sum(sp_loss(s, t) for s, t in zip(s_feats, t_feats))}
