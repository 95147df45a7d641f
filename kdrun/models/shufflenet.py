"""CIFAR ShuffleNet V1 (Zhang et al., 2018) and V2 (Ma et al., 2018) as in the CRD/RepDistiller benchmark.

Both start with a 1x1 conv to 24 channels at full resolution and have three stages (``layer1``..``layer3``)
that each halve the resolution in their first block. V1: groups 3, widths 240/480/960, 4/8/4 blocks.
V2 (size 1x): widths 116/232/464, one downsampling block and 3/7/3 basic blocks per stage, then a 1x1
conv to 1024 channels. Parameter names match RepDistiller's ``ShuffleV1``/``ShuffleV2``, so its
checkpoints load. Its feature lists too: the stages are ``layer1``..``layer3`` (V2's head conv is not one), each
stage's pre-activation the input of its last block's ``relu`` (V2: the kept half and the branch before its
ReLU, concatenated, not yet shuffled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdrun.models.layers import init_weights


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: (N, g*c, H, W) viewed as (N, g, c, H, W), transposed."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1; added to the input, or concatenated
    with its 3x3 average pool when the block has stride 2."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        mid = out_ch // 4
        self.stride = stride
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)  # a module, so hooks can read the block's pre-activation (its input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return self.relu(torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut)


class ShuffleNetV1(nn.Module):
    """CIFAR ShuffleNet V1 with 3 groups; a stage's first block concatenates, so it adds ``width - in`` channels."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, in_ch = [], 24
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = [ShuffleV1Block(in_ch, width - in_ch, 2, groups, first_groups=1 if i == 0 else groups)]
            layers += [ShuffleV1Block(width, width, 1, groups, first_groups=groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


class ShuffleV2Block(nn.Module):
    """Stride-1 unit: split the channels in half, 1x1-3x3 depthwise-1x1 on one half, concatenate, ReLU, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, x = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # the kept half is a ReLU output already: one ReLU module on the concatenation leaves it as it is and
        # gives hooks the benchmark's pre-activation, cat(kept, branch before its ReLU)
        return channel_shuffle(self.relu(torch.cat([kept, out], 1)), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 unit: two branches (3x3 depthwise-1x1, and 1x1-3x3 depthwise-1x1) of ``out/2`` channels each."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.conv1 = nn.Conv2d(in_ch, in_ch, kernel_size=3, stride=2, padding=1, groups=in_ch, bias=False)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = nn.Conv2d(in_ch, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_ch, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNet V2; ``default_feature_layers`` are the three stages, not the 1x1 head conv after them."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, in_ch = [], 24
        for width, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(ShuffleV2DownBlock(in_ch, width), *(ShuffleV2Block(width) for _ in range(n))))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def shufflenetv1(num_classes: int, in_chans: int = 3) -> ShuffleNetV1:
    """The benchmark's ShuffleNetV1 (``ShuffleV1``: groups 3, widths 240/480/960)."""
    return ShuffleNetV1(num_classes, in_chans)


def shufflenetv2(num_classes: int, in_chans: int = 3) -> ShuffleNetV2:
    """The benchmark's ShuffleNetV2 (``ShuffleV2``: size 1x, widths 116/232/464, head 1024)."""
    return ShuffleNetV2(num_classes, in_chans)
