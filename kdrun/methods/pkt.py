"""Passalis & Tefas ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer" (PKT).

loss = CE + weight * KL(P_T || P_S), P the conditional probabilities p_{j|i} of the cosine-similarity
kernel K = (cos + 1) / 2 between the samples' embeddings (the classifiers' inputs). The divergence is
averaged over the B^2 sample pairs, the normalisation of the CRD benchmark, whose weight is 30000.
"""

from kdrun.losses import pkt_loss
from kdrun.methods.feature import FeatureMethod


class PKT(FeatureMethod):
    positions = "embedding"

    def __init__(self, student, teacher, weight: float = 30000.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)

    def distill(self, s_feats, t_feats, batch):
        return {"pkt": self.weight * pkt_loss(s_feats[0], t_feats[0], reduction="mean")}
