"""Peng et al. ICCV 2019, "Correlation Congruence for Knowledge Distillation" (CC).

loss = CE + weight * 1/n^2 ||psi(F_T) - psi(F_S)||^2, psi the batch's n x n correlation matrix under the
Gaussian RBF kernel approximated by its order-P Taylor series (P = 2, gamma = 0.4), on embeddings of the
classifiers' inputs: a Linear to `feat_dim` = 128 on each side (as in the CRD benchmark), then L2
normalisation. This is the paper's kernel form (`form=kernel`), for which kdrun found no published weight:
the default 2 gives the term the size of the benchmark's 0.02 x its own loss at initialisation (measured on
the default Fashion-MNIST pair). The CRD benchmark runs a simplified loss the authors shared,
`form=delta_product` (`kdrun.losses.cc_loss`) on the un-normalised linear embeddings, weight 0.02
(method=crd/cc).
"""

import torch.nn.functional as F
from torch import nn

from kdrun.losses import cc_loss
from kdrun.methods.feature import FeatureMethod


class CC(FeatureMethod):
    ranges = {"gamma": "(0, inf)", "order": "[0, inf)", "feat_dim": "[1, inf)", "form": "{kernel, delta_product}"}
    positions = "embedding"

    def __init__(self, student, teacher, weight: float = 2.0, gamma: float = 0.4, order: int = 2,
                 feat_dim: int = 128, form: str = "kernel", **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.gamma, self.order, self.feat_dim, self.form = gamma, order, feat_dim, form

    def build(self, s_feats, t_feats):
        self.embed_s = nn.Linear(s_feats[0].flatten(1).shape[1], self.feat_dim)
        self.embed_t = nn.Linear(t_feats[0].flatten(1).shape[1], self.feat_dim)

    def distill(self, s_feats, t_feats, batch):
        s, t = self.embed_s(s_feats[0].flatten(1)), self.embed_t(t_feats[0].flatten(1))
        if self.form == "kernel":
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return {"cc": self.weight * cc_loss(s, t, self.gamma, self.order, self.form)}
