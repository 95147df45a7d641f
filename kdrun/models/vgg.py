"""CIFAR VGGs with BatchNorm, as in the CRD/RepDistiller benchmark (its ``vgg*_bn``).

Five stages of 3x3 conv-BN-ReLU layers (``block0``..``block4``); 2x2 max pooling after the first three
stages, global average pooling after the last, then one linear layer (no VGG fully connected stack).
Convolutions keep their bias, as in the benchmark. Parameter names match RepDistiller's
``models/vgg.py``, so its checkpoints load; its extra max pooling for 64x64 inputs is left out. Its feature
lists too: the stem is ``block0`` (before its max pooling), the stages ``block1``..``block4``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdrun.models.layers import init_weights

_CONFIGS = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _stage(in_ch: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_ch = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BatchNorm; ``config`` gives the conv widths of each of the five stages."""

    def __init__(self, config: tuple[tuple[int, ...], ...], num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.block0 = _stage(in_chans, config[0])
        self.block1 = _stage(config[0][-1], config[1])
        self.block2 = _stage(config[1][-1], config[2])
        self.block3 = _stage(config[2][-1], config[3])
        self.block4 = _stage(config[3][-1], config[4])
        self.pool0 = nn.MaxPool2d(2)
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)
        self.default_feature_layers = ["block1", "block2", "block3", "block4"]
        self.stem_layer = "pool0:in"
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def vgg8(num_classes: int, in_chans: int = 3) -> VGG:
    """VGG-8 (one conv per stage)."""
    return VGG(_CONFIGS["vgg8"], num_classes, in_chans)


def vgg11(num_classes: int, in_chans: int = 3) -> VGG:
    """VGG-11 (configuration A)."""
    return VGG(_CONFIGS["vgg11"], num_classes, in_chans)


def vgg13(num_classes: int, in_chans: int = 3) -> VGG:
    """VGG-13 (configuration B)."""
    return VGG(_CONFIGS["vgg13"], num_classes, in_chans)
