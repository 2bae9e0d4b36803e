"""Wide ResNets for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

Follows the authors' PyTorch code (szagoruyko/wide-residual-networks, `pytorch/resnet.py`):
pre-activation basic blocks, convs without bias, a 1x1 conv shortcut where the shape changes, taken
from the *pre-activated* input, and dropout (paper: 0.3 in some runs) between the two convs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import PrunelabError
from .registry import check_float, check_int, register


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, added to x or to conv1x1(BN-ReLU(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-width: conv3x3 16, 3 stages of (depth-4)/6 blocks at 16k/32k/64k channels
    (stride 2 entering stages 2 and 3), BN-ReLU, global average pool, fc. WRN-16-8: 10,961,370
    parameters for 10 classes."""

    def __init__(self, depth: int = 16, width: int = 8, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise PrunelabError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c = 16
        for i, base in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(WideBlock(c, base * width, stride, dropout))
                c = base * width
            setattr(self, f"stage{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.conv1(x))))
        x = self.pool(F.relu(self.bn(x)))
        return self.fc(self.flatten(x))


def wrn(depth: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """Any WRN-depth-width (depth = 6n+4), with argument checks."""
    return WideResNet(check_int("depth", depth, low=10), check_int("width", width, low=1),
                      num_classes, check_float("dropout", dropout, 0.0, 1.0, high_open=True))


def _builder(depth, width):
    def build(num_classes, dropout=0.0):
        return wrn(depth, width, num_classes, dropout)
    return build


for _d, _k in ((16, 8), (16, 10), (22, 8)):
    register(f"wrn-{_d}-{_k}", f"Wide ResNet WRN-{_d}-{_k} (Zagoruyko & Komodakis 2016) for CIFAR",
             "cifar10", (3, 32, 32), _builder(_d, _k),
             {"dropout": "dropout probability between the two convs of a block (default 0.0)"})
