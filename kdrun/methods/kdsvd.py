"""Lee, Kim & Song ECCV 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (KD-SVD).

loss = CE + weight * sum over consecutive stages of ||G_S - G_T||^2, G the radial-basis correlation of
the (aligned, singular-value-scaled) top-k right singular vectors of two consecutive feature maps
(`kdrun.losses.kdsvd_loss`); k = 1 and weight 1 as in mdistiller's CIFAR-100 setting. Student and
teacher need the same channel count at each stage.
"""

from kdrun.errors import KdrunError
from kdrun.losses import kdsvd_loss
from kdrun.methods.feature import FeatureMethod


class KDSVD(FeatureMethod):
    ranges = {"k": "[1, inf)"}
    positions = "stages"

    def __init__(self, student, teacher, k: int = 1, weight: float = 1.0, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.k = k

    def build(self, s_feats, t_feats):
        channels = [(s.shape[1], t.shape[1]) for s, t in zip(s_feats, t_feats)]
        if len(s_feats) < 2 or any(a != b or s.dim() != 4 for (a, b), s in zip(channels, s_feats)):
            raise KdrunError(f"kdsvd compares singular vectors of at least two feature maps channel by channel, but "
                             f"the (student, teacher) channels are {channels}; pick layers with equal channel counts "
                             "(student.feature_layers / teacher.feature_layers) or a student of the teacher's widths")

    def distill(self, s_feats, t_feats, batch):
        return {"kdsvd": self.weight * kdsvd_loss(s_feats, t_feats, self.k)}
