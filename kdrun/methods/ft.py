"""Kim, Park & Kwak NeurIPS 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (FT).

Paraphraser stage (`init_epochs`): a convolutional auto-encoder (three 3x3 convs down to `rate` x C_T
channels, three 3x3 transposed convs back, BN and leaky ReLU) learns to reconstruct the teacher's last
feature map (L2 reconstruction loss); its encoder output is the teacher factor F_T. Then
(`schedule.epochs`) the paraphraser is frozen, a translator (three 3x3 convs) turns the student's last
map into the student factor F_S, and loss = CE + beta * L_FT with
L_FT = || F_T/||F_T||_2 - F_S/||F_S||_2 ||_p, p = 1 (eq. 3), averaged over elements as in the common
implementations, beta = `weight` = 200 (the CRD benchmark's). The CRD benchmark's FactorTransfer first
reduces each factor over channels to mean_c F_c^2 (`reduce_channels`) and its paraphraser has no BatchNorm
(`paraphraser_bn=false`): method=crd/ft. `paraphraser_lr` trains the paraphraser at its own learning rate (null:
the schedule's): RepDistiller's init stage uses 0.01 for ResNet and WRN students and the row's rate otherwise, so
crd/ft fixes 0.01 (every row but VGG8's, whose rate is 0.05: crd/ft_vgg).
"""

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.errors import KdrunError
from kdrun.losses import ft_loss
from kdrun.methods.base import Stage
from kdrun.methods.feature import FeatureMethod, match_spatial


def _block(conv: nn.Module, channels: int, bn: bool = True) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(channels)] if bn else []), nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """The teacher-side auto-encoder: `encode` gives the factor, `forward` the reconstruction."""

    def __init__(self, channels: int, factor: int, bn: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(*_block(nn.Conv2d(channels, channels, 3, padding=1), channels, bn),
                                     *_block(nn.Conv2d(channels, factor, 3, padding=1), factor, bn),
                                     *_block(nn.Conv2d(factor, factor, 3, padding=1), factor, bn))
        self.decoder = nn.Sequential(*_block(nn.ConvTranspose2d(factor, factor, 3, padding=1), factor, bn),
                                     *_block(nn.ConvTranspose2d(factor, channels, 3, padding=1), channels, bn),
                                     *_block(nn.ConvTranspose2d(channels, channels, 3, padding=1), channels, bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class FT(FeatureMethod):
    ranges = {"init_epochs": "[0, inf)", "rate": "(0, inf)", "p": "(0, inf)", "paraphraser_lr": "(0, inf)"}
    positions = "last"

    def __init__(self, student, teacher, init_epochs: int = 30, rate: float = 0.5, p: float = 1.0,
                 weight: float = 200.0, reduce_channels: bool = False, paraphraser_bn: bool = True,
                 paraphraser_lr: float | None = None, **kwargs):
        super().__init__(student, teacher, weight, **kwargs)
        self.init_epochs, self.rate, self.p, self.paraphraser_lr = init_epochs, rate, p, paraphraser_lr
        self.reduce_channels, self.paraphraser_bn = reduce_channels, paraphraser_bn

    def build(self, s_feats, t_feats):
        (s,), (t,) = s_feats, t_feats
        if s.dim() != 4 or t.dim() != 4:
            raise KdrunError("ft paraphrases feature maps with convolutions; choose (B, C, H, W) feature layers")
        factor = max(1, round(self.rate * t.shape[1]))
        self.paraphraser = Paraphraser(t.shape[1], factor, self.paraphraser_bn)
        self.translator = nn.Sequential(*_block(nn.Conv2d(s.shape[1], s.shape[1], 3, padding=1), s.shape[1]),
                                        *_block(nn.Conv2d(s.shape[1], factor, 3, padding=1), factor),
                                        *_block(nn.Conv2d(factor, factor, 3, padding=1), factor))

    def stages(self, epochs):
        return [Stage("paraphraser", self.init_epochs, params=list(self.paraphraser.parameters()),
                      lr=self.paraphraser_lr),
                Stage("train", epochs, params=list(self.student.parameters()) + list(self.translator.parameters()))]

    def on_stage_start(self, stage, loop):
        super().on_stage_start(stage, loop)
        self.paraphraser.requires_grad_(stage.name == "paraphraser")
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "paraphraser") and self.stage != "paraphraser":
            self.paraphraser.eval()  # trained, then fixed: its BatchNorm statistics stay
        return self

    def training_step(self, batch):
        if self.stage != "paraphraser":
            return super().training_step(batch)
        _, (t,) = self.teacher_features(batch)
        return {"reconstruction": F.mse_loss(self.paraphraser(t), t)}, {}

    def distill(self, s_feats, t_feats, batch):
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(t_feats[0])
        factor_s, factor_t = match_spatial(self.translator(s_feats[0]), factor_t)
        return {"ft": self.weight * ft_loss(factor_s, factor_t, self.p, reduction="mean",
                                               reduce_channels=self.reduce_channels)}
