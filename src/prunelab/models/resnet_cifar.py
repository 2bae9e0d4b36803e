"""CIFAR ResNet-20/32/56/110 with basic blocks (He et al., "Deep Residual Learning", CVPR 2016, §4.2).

Layout and parameter names follow akamaster/pytorch_resnet_cifar10 (`resnet.py`), which LOBSTER uses,
and which NNrelief copies: conv1, bn1, layer1..3 (blocks with conv1/bn1/conv2/bn2/shortcut), linear.
So akamaster's checkpoints load with `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_choice, register

DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}  # depth -> basic blocks per stage, n = (depth - 2) / 6


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by `stride`, zero-pad the new channels (no parameters).

    Pads (out - in) / 2 channels on each side as akamaster does, so the identity lands in the middle
    channels. A named module (not a lambda) so that graph tools such as torch-pruning can trace it.

    Structured pruning needs the input->output channel map to survive channel removal, which F.pad
    cannot express; `prune_in_channels` / `prune_out_channels` keep it explicitly (`torch_pruning_pruners`
    hands them to torch-pruning). The map is a plain attribute, so the state_dict has no entries.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("PadShortcut cannot reduce the number of channels")
        self.stride, self.in_channels, self.out_channels = stride, in_channels, out_channels
        extra = out_channels - in_channels
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2
        self.dst = None  # after pruning: output position of each input channel (None = dropped)

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        if self.dst is None:
            return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        src = [i for i, d in enumerate(self.dst) if d is not None]
        dst = torch.tensor([self.dst[i] for i in src], dtype=torch.long, device=x.device)
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        return out.index_copy(1, dst, x.index_select(1, torch.tensor(src, dtype=torch.long, device=x.device)))

    def _map(self):
        if self.dst is None:
            self.dst = [self.pad_front + i for i in range(self.in_channels)]
        return self.dst

    def prune_in_channels(self, idxs):
        """Remove input channels `idxs` (their outputs become zero channels)."""
        drop = set(int(i) for i in idxs)
        self.dst = [d for i, d in enumerate(self._map()) if i not in drop]
        self.in_channels = len(self.dst)

    def prune_out_channels(self, idxs):
        """Remove output channels `idxs`; inputs that fed them are dropped."""
        drop = sorted(set(int(i) for i in idxs))
        shift = lambda d: d - sum(j < d for j in drop)  # noqa: E731  new index of a kept channel
        self.dst = [None if d is None or d in drop else shift(d) for d in self._map()]
        self.out_channels -= len(drop)

    def extra_repr(self):
        mapping = f"pad=({self.pad_front}, {self.pad_back})" if self.dst is None else "pruned"
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, {mapping}"


def torch_pruning_pruners() -> dict:
    """`customized_pruners` for torch-pruning, so it can physically prune option-A ResNets.

    Pass to e.g. `tp.pruner.MagnitudePruner(..., customized_pruners=torch_pruning_pruners())`.
    Without it, torch-pruning treats F.pad as element-wise and produces mismatched shapes.
    """
    import torch_pruning as tp  # optional dependency, imported only when asked for

    class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = PadShortcut

        def prune_out_channels(self, layer, idxs):
            layer.prune_out_channels(idxs)
            return layer

        def prune_in_channels(self, layer, idxs):  # distinct from the above: no intra-layer coupling
            layer.prune_in_channels(idxs)
            return layer

        def get_out_channels(self, layer):
            return layer.out_channels

        def get_in_channels(self, layer):
            return layer.in_channels

    return {PadShortcut: PadShortcutPruner()}


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (post-activation, He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:  # option B: projection, named shortcut.0 / shortcut.1 as in akamaster
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. 2016 CIFAR ResNet-(6n+2): conv3x3 16, 3 stages of n blocks at 16/32/64 channels
    (stride 2 entering stages 2 and 3), global average pool, fc 64->n. Convs have no bias (BN follows).

    shortcut="A" (default): parameter-free zero-padding, as in the paper's CIFAR experiments,
    akamaster, LOBSTER and NNrelief. "B": 1x1 conv + BN projection where the shape changes (PFP's
    ResNet-20). Note PFP's ResNet-56/110 use bottleneck blocks, which this class does not build.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        n = DEPTHS[depth]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks_in = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(blocks_in, width, stride, shortcut))
                blocks_in = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


def _builder(depth):
    def build(num_classes, shortcut="A"):
        return CifarResNet(depth, num_classes, check_choice("shortcut", shortcut, ("A", "B")))
    return build


for _depth, _n in DEPTHS.items():
    register(f"resnet{_depth}", f"CIFAR ResNet-{_depth} (He et al. 2016), {_n} basic blocks per stage",
             "cifar10", (3, 32, 32), _builder(_depth),
             {"shortcut": "A = zero-pad (parameter-free), B = 1x1 conv + BN projection (default A)"})
