"""Zagoruyko & Komodakis ICLR 2017, "Paying More Attention to Attention" (AT).

The paper's loss is CE + beta/2 * sum_j || Q_S^j/||Q_S^j||_2 - Q_T^j/||Q_T^j||_2 ||^2 (eq. 2), Q = sum_c |A_c|^p
vectorised, over the stage outputs. Here, as in the authors' code and the CRD benchmark, the term is
`weight` * sum_j mean(difference^2) (averaged over positions and batch, no 1/2), `weight` = 1000 (the
benchmark's beta); maps of different sizes are average-pooled to the smaller one.
"""

from kdrun.losses import at_loss
from kdrun.methods.feature import FeatureMethod, match_spatial


class AT(FeatureMethod):
    ranges = {"p": "(0, inf)"}
    positions = "stages"

    def __init__(self, student, teacher, weight: float = 1000.0, p: float = 2.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.p = p

    def distill(self, s_feats, t_feats, batch):
        return {"at": self.weight * sum(at_loss(*match_spatial(s, t), self.p, squared=True)
                                        for s, t in zip(s_feats, t_feats))}
