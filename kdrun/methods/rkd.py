"""Park et al. CVPR 2019, "Relational Knowledge Distillation" (RKD).

loss = CE + lambda_D * L_RKD-D + lambda_A * L_RKD-A on the embeddings the classifiers receive:
Huber loss between mean-normalised pairwise distances (eq. 2-3) and between the cosines of the angles
of triplets (eq. 4-5); lambda_D = 25, lambda_A = 50 as in the CRD benchmark. Each term is a mean over the
distinct pairs / triplets; `include_diagonal` averages over all B^2 / B^3 entries instead, the degenerate
ones included, as the CRD benchmark's RKDLoss does (method=crd/rkd).
"""

from kdrun.losses import rkd_angle_loss, rkd_distance_loss
from kdrun.methods.feature import FeatureMethod


class RKD(FeatureMethod):
    ranges = {"distance_weight": "[0, inf)", "angle_weight": "[0, inf)"}
    positions = "embedding"

    def __init__(self, student, teacher, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 include_diagonal: bool = False, weight: float = 1.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.include_diagonal = include_diagonal

    def distill(self, s_feats, t_feats, batch):
        s, t = s_feats[0].flatten(1), t_feats[0].flatten(1)
        losses = {}
        if self.distance_weight:
            losses["rkd_d"] = self.weight * self.distance_weight * rkd_distance_loss(s, t, self.include_diagonal)
        if self.angle_weight:
            losses["rkd_a"] = self.weight * self.angle_weight * rkd_angle_loss(s, t, self.include_diagonal)
        return losses
