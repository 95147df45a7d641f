"""Small nets for small images (Fashion-MNIST, scikit-learn digits): an MLP and a plain three-stage CNN."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from kdrun.errors import KdrunError
from kdrun.models.layers import conv_bn_relu, init_weights


class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout per hidden width (``hidden.fc1``, ``hidden.relu1``, ...), then ``fc``."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 28,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_shape = (in_chans, image_size, image_size)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_chans * image_size * image_size
        for i, out in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, out)
            layers[f"relu{i}"] = nn.ReLU()
            layers[f"drop{i}"] = nn.Dropout(dropout)
            width = out
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(layers)
        self.fc = nn.Linear(width, num_classes)
        self.default_feature_layers = [f"hidden.relu{i}" for i in range(1, len(hidden) + 1)]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            c, h, w = x.shape[1:]
            raise KdrunError(
                f"mlp was built for {'x'.join(map(str, self.input_shape))} images but got {c}x{h}x{w}; "
                f"build it with in_chans={c} and image_size={h}"
            )
        return self.fc(self.hidden(self.flatten(x)))


class SmallCNN(nn.Module):
    """Three stages ``layer1``..``layer3`` of ``depth`` x (conv3x3-BN-ReLU) with widths w, 2w, 4w; the first
    two end with 2x2 max pooling. Then max pooling to a 3x3 grid, dropout and a linear ``fc`` on the
    flattened grid: on Fashion-MNIST this head learns much faster than global average pooling
    (measured: 0.886 vs 0.858 test accuracy after 2 epochs at width 32)."""

    def __init__(
        self, num_classes: int, in_chans: int = 3, width: int = 32, depth: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise KdrunError(f"cnn needs width >= 1 and depth >= 1, not width={width}, depth={depth}")
        stages, in_ch = [], in_chans
        for i in range(3):
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers.extend(conv_bn_relu(in_ch, width * 2**i))
                in_ch = width * 2**i
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveMaxPool2d(3)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch * 9, num_classes)
        self.default_feature_layers = ["layer1", "layer2", "layer3"]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def mlp(
    num_classes: int, in_chans: int = 3, image_size: int = 28, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
) -> MLP:
    """An MLP on flattened ``in_chans`` x ``image_size`` x ``image_size`` images."""
    return MLP(num_classes, in_chans, image_size, tuple(hidden), dropout)


def cnn(num_classes: int, in_chans: int = 3, width: int = 32, depth: int = 1, dropout: float = 0.0) -> SmallCNN:
    """The plain three-stage CNN behind kdrun's default Fashion-MNIST teacher and student."""
    return SmallCNN(num_classes, in_chans, width, depth, dropout)
