"""Heo et al. AAAI 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons" (AB).

Init stage (`init_epochs`): the student's feature extractor and connectors r (1x1 conv + BN) are trained
alone to put each neuron on the teacher's side of its activation boundary, with the alternative loss
||rho(T) * relu(mu - r(S)) + (1 - rho(T)) * relu(mu + r(S))||^2 on pre-ReLU responses (eq. 5, margin mu);
the deeper layers count more (2^(l - n + 1)) and the sum is scaled by `weight` = 3/1000, as in the CRD
benchmark. Then (`schedule.epochs`) the student trains with CE (and KD when `kd_weight` > 0); the
connectors are dropped.
`connector`: `paper` (the 1x1 conv + BN above, on stages of equal resolution) or `convreg` (the CRD benchmark's
Connector, method=crd/ab: the i-th stages paired whatever their sizes, the identity where channels and size are
equal, else its ConvReg without ReLU, which also halves or doubles a map).
"""

from torch import nn

from kdrun import features
from kdrun.losses import ab_loss
from kdrun.methods.base import Stage
from kdrun.methods.feature import FeatureMethod, connector, convreg, same_spatial


class AB(FeatureMethod):
    ranges = {"init_epochs": "[0, inf)", "margin": "[0, inf)", "connector": "{paper, convreg}"}
    positions = "stages"
    preact = (True, True)
    pairing = "resolution"

    def __init__(self, student, teacher, init_epochs: int = 30, margin: float = 1.0, weight: float = 0.003,
                 connector: str = "paper", **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.init_epochs, self.margin, self.connector_form = init_epochs, margin, connector
        if connector == "convreg":
            self.pairing = "index"  # the benchmark pairs feat[1:-1] in order and resamples unequal sizes

    def build(self, s_feats, t_feats):
        if self.connector_form == "convreg":
            self.connectors = nn.ModuleList(nn.Identity() if s.shape[1:3] == t.shape[1:3] else
                                            convreg(s.shape, t.shape, relu=False) for s, t in zip(s_feats, t_feats))
        else:
            same_spatial(s_feats, t_feats, "ab")
            self.connectors = nn.ModuleList(connector(s.shape, t.shape) for s, t in zip(s_feats, t_feats))
        x = features.probe_input(self.student, self.input_shape)
        self.extractor = features.parameters_before(self.student, self.s_hooks.specs[-1], x)

    def stages(self, epochs):
        return [Stage("init", self.init_epochs, params=self.extractor + list(self.connectors.parameters())),
                Stage("task", epochs, params=list(self.student.parameters()))]

    def distill(self, s_feats, t_feats, batch):
        n = len(s_feats)
        total = sum(2.0 ** (i - n + 1) * ab_loss(r(s), t, self.margin)
                    for i, (s, t, r) in enumerate(zip(s_feats, t_feats, self.connectors)))
        return {"ab": self.weight * total}
