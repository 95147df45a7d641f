"""Passalis & Tefas ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge Transfer" (PKT).

loss = CE + weight * KL(P_T || P_S), P the conditional probabilities p_{j|i} of the cosine-similarity
kernel K = (cos + 1) / 2 between the samples' embeddings (the classifiers' inputs), the self-pairs j = i
left out as in the paper. The divergence is averaged over the B^2 sample pairs, the normalisation of the CRD
benchmark, whose weight is 30000; `include_diagonal` keeps the self-pairs, as the benchmark's PKT does
(method=crd/pkt).
"""

from kdrun.losses import pkt_loss
from kdrun.methods.feature import FeatureMethod


class PKT(FeatureMethod):
    positions = "embedding"

    def __init__(self, student, teacher, weight: float = 30000.0, include_diagonal: bool = False, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.include_diagonal = include_diagonal

    def distill(self, s_feats, t_feats, batch):
        return {"pkt": self.weight * pkt_loss(s_feats[0], t_feats[0], reduction="mean",
                                                 include_diagonal=self.include_diagonal)}
