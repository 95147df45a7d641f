"""CIFAR ResNets (He et al., 2016) in the layout of the CRD/RepDistiller benchmark (Tian et al., 2020).

Depth 6n+2: a 3x3 stem, three stages of n BasicBlocks (strides 1, 2, 2), global average pooling and a
linear head. Parameter names match RepDistiller's ``models/resnet.py``, so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.layers import conv3x3, init_weights

_WIDTHS = (16, 16, 32, 64)
_WIDTHS_X4 = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (1x1 conv-BN where the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + shortcut)  # a module call, so a hook can read the pre-activation


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 with stage widths ``widths[1:]`` after a ``widths[0]``-channel stem."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise KdrunError(f"a CIFAR ResNet needs depth 6n+2 (8, 14, 20, 32, 44, 56, 110), not {depth}")
        n = (depth - 2) // 6
        self.conv1 = conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        init_weights(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_ch, out_ch, stride)]
        layers += [BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet8(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-8, widths 16/16/32/64."""
    return ResNet(8, _WIDTHS, num_classes, in_chans)


def resnet14(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-14, widths 16/16/32/64."""
    return ResNet(14, _WIDTHS, num_classes, in_chans)


def resnet20(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-20, widths 16/16/32/64."""
    return ResNet(20, _WIDTHS, num_classes, in_chans)


def resnet32(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-32, widths 16/16/32/64."""
    return ResNet(32, _WIDTHS, num_classes, in_chans)


def resnet44(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-44, widths 16/16/32/64."""
    return ResNet(44, _WIDTHS, num_classes, in_chans)


def resnet56(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-56, widths 16/16/32/64."""
    return ResNet(56, _WIDTHS, num_classes, in_chans)


def resnet110(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-110, widths 16/16/32/64."""
    return ResNet(110, _WIDTHS, num_classes, in_chans)


def resnet8x4(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-8 with four times the width: 32/64/128/256."""
    return ResNet(8, _WIDTHS_X4, num_classes, in_chans)


def resnet32x4(num_classes: int, in_chans: int = 3) -> ResNet:
    """ResNet-32 with four times the width: 32/64/128/256."""
    return ResNet(32, _WIDTHS_X4, num_classes, in_chans)
