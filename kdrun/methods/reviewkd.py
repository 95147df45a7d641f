"""Chen et al. CVPR 2021, "Distilling Knowledge via Knowledge Review" (ReviewKD).

The student's stage outputs and its pooled embedding (the classifier's input, as a 1x1 map) are reviewed
from the deepest up: an attention-based fusion (ABF) module per level maps the student feature to a middle
width (1x1 conv + BN), fuses it with the upsampled result of the level below through two sigmoid attention
maps, and produces (3x3 conv + BN) the level's output at the teacher's size. Each output is compared with the
teacher's pre-ReLU stage response (the last level with the teacher's embedding) by the hierarchical context
loss (`kdrun.losses.hcl_loss`): loss = CE + weight * min((epoch + 1) / warmup_epochs, 1) * sum_levels HCL, epoch
counting completed epochs (the first has weight 1 / warmup_epochs, as in mdistiller).
Weight 1 and a 20-epoch warm-up follow mdistiller (which uses weight 5 for resnet32x4 -> resnet8x4).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import features
from kdrun.errors import KdrunError
from kdrun.losses import hcl_loss
from kdrun.methods.feature import FeatureMethod


class ABF(nn.Module):
    """Attention-based fusion: returns (the level's output at `out_size`, the residual passed upward)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.BatchNorm2d(mid_ch))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_ch, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual, out_size):
        x = self.conv1(x)
        if self.att is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            z = self.att(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if x.shape[2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKD(FeatureMethod):
    ranges = {"warmup_epochs": "(0, inf)", "max_mid_channels": "[1, inf)"}
    positions = "stages"
    preact = (False, True)
    pairing = "fixed"  # each level's output is resampled to the teacher's size

    def __init__(self, student, teacher, weight: float = 1.0, warmup_epochs: float = 20, max_mid_channels: int = 512,
                 **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.warmup_epochs, self.max_mid_channels = warmup_epochs, max_mid_channels

    def specs(self, model, role, t_feats=None):
        """The stages (the teacher's before ReLU), then the embedding (mdistiller's `pooled_feat`) or, with
        given layers, the last of them again, to be pooled."""
        given = self.layers[role]
        last = given[-1] if given else features.classifier_input(model, features.probe_input(model, self.input_shape),
                                                                  role)
        return super().specs(model, role, t_feats) + [last]

    @staticmethod
    def levels(feats):
        """Stage maps, shallowest first, and the global average of the last feature (a vector: itself) as a 1x1 map."""
        last = feats[-1]
        return list(feats[:-1]) + [F.adaptive_avg_pool2d(last, 1) if last.dim() == 4 else last[:, :, None, None]]

    def build(self, s_feats, t_feats):
        if any(f.dim() != 4 for f in s_feats[:-1] + t_feats[:-1]):
            raise KdrunError("reviewkd fuses feature maps with convolutions; choose (B, C, H, W) feature layers")
        s_levels, t_levels = self.levels(s_feats), self.levels(t_feats)
        # mdistiller's min(512, in_channels[-1]): its pooled feature has the last stage's channels; kdrun's cnn
        # flattens a 3x3 map there (9x as wide), which as the width would put 432 channels at 28x28 for cnn_small
        mid = min(self.max_mid_channels, s_feats[-2].shape[1])
        self.abfs = nn.ModuleList(ABF(s.shape[1], mid, t.shape[1], fuse=i < len(s_levels) - 1)
                                  for i, (s, t) in enumerate(zip(s_levels, t_levels)))

    def distill(self, s_feats, t_feats, batch):
        s_levels, t_levels = self.levels(s_feats), self.levels(t_feats)
        outputs, residual = [], None
        for s, t, abf in reversed(list(zip(s_levels, t_levels, self.abfs))):
            out, residual = abf(s, residual, t.shape[2:])
            outputs.insert(0, out)
        ramp = min((self.epoch + 1) / self.warmup_epochs, 1.0)
        return {"reviewkd": self.weight * ramp * hcl_loss(outputs, t_levels)}
