"""Pre-activation Wide ResNets (Zagoruyko & Komodakis, 2016) in the CRD/RepDistiller benchmark layout.

WRN-d-k: a 3x3 stem with 16 channels, three stages of (d-4)/6 pre-activation blocks with widths
16k/32k/64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear head. Parameter
names match RepDistiller's ``models/wrn.py`` (hence ``layer`` and ``convShortcut``), so its checkpoints load.
Its feature lists too: the stages are the three blocks' raw outputs (before the final BN-ReLU), and their
pre-ReLU responses the next BatchNorm's outputs (the next block's ``bn1``, the final ``bn1``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.layers import conv3x3, init_weights


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus a shortcut (1x1 conv of the activated input if shapes differ)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.convShortcut = None
        if stride != 1 or in_ch != out_ch:
            self.convShortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """``blocks`` pre-activation blocks held as ``.layer``; the first one changes width and stride."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, stride: int, dropout: float) -> None:
        super().__init__()
        layers = [PreActBlock(in_ch, out_ch, stride, dropout)]
        layers += [PreActBlock(out_ch, out_ch, 1, dropout) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; ``default_feature_layers`` are the blocks, ``preact_layers`` their BN-ed outputs."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_chans: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise KdrunError(f"a Wide ResNet needs depth 6n+4 (10, 16, 22, 28, 40, ...), not {depth}")
        if widen_factor < 1:
            raise KdrunError(f"a Wide ResNet needs widen_factor >= 1, not {widen_factor}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = conv3x3(in_chans, widths[0])
        self.block1 = WideStage(widths[0], widths[1], n, 1, dropout)
        self.block2 = WideStage(widths[1], widths[2], n, 2, dropout)
        self.block3 = WideStage(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.default_feature_layers = ["block1", "block2", "block3"]
        self.preact_layers = {"block1": "block2.layer.0.relu1:in", "block2": "block3.layer.0.relu1:in",
                              "block3": "relu:in"}
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn(depth: int, widen_factor: int, num_classes: int, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    """Any WRN-depth-widen_factor, e.g. ``create("wrn", 100, depth=28, widen_factor=10)``."""
    return WideResNet(depth, widen_factor, num_classes, in_chans, dropout)


def wrn_16_2(num_classes: int, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, in_chans, dropout)


def wrn_40_1(num_classes: int, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes, in_chans, dropout)


def wrn_40_2(num_classes: int, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes, in_chans, dropout)
