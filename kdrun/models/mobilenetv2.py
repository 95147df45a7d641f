"""The CIFAR MobileNetV2 (Sandler et al., 2018) of the CRD/RepDistiller benchmark ("MobileNetV2", width 0.5).

The benchmark's variant (from Jin et al., 2019, RCO): a stride-2 3x3 stem, seven groups of inverted
residual blocks (expansion 6, the first 1; the expansion conv is kept even at expansion 1), a 1x1 conv
to 1280 channels, global average pooling and a linear head. Parameter names match RepDistiller's
``models/mobilenetv2.py`` (``mobile_half``), so its checkpoints load. Its feature lists too: the stem is
``conv1``, the stages the groups ``blocks.1``, ``blocks.2``, ``blocks.4`` and ``blocks.6`` (not the 1x1 head
``conv2``); their outputs are linear, so they are their own pre-activations.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.models.layers import conv_bn_relu, init_weights

# (expansion, output channels at width 1, blocks, stride of the first block)
_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (carrying the stride), linear 1x1 projection; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            *conv_bn_relu(in_ch, hidden, kernel_size=1),
            *conv_bn_relu(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2; ``default_feature_layers`` are the last group at each resolution."""

    def __init__(self, num_classes: int, in_chans: int = 3, width_mult: float = 0.5) -> None:
        super().__init__()
        in_ch = int(32 * width_mult)
        self.conv1 = conv_bn_relu(in_chans, in_ch, kernel_size=3, stride=2)
        groups = []
        for expansion, channels, blocks, stride in _GROUPS:
            out_ch = int(channels * width_mult)
            layers = []
            for i in range(blocks):
                layers.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
            groups.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(groups)
        last_ch = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_ch, last_ch, kernel_size=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_ch, num_classes))
        self.default_feature_layers = ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]
        self.stem_layer = "conv1"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def mobilenetv2(num_classes: int, in_chans: int = 3, width_mult: float = 0.5) -> MobileNetV2:
    """The benchmark's MobileNetV2 (``mobile_half``: expansion 6, width 0.5)."""
    return MobileNetV2(num_classes, in_chans, width_mult)
