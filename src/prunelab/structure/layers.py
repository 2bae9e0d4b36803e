"""Layers that read a subset of their input channels: GatheredConv1d, GatheredConv2d and GatheredLinear.

A layer can have zero input slices for channels it cannot drop because another layer still reads them
(PFP masks the residual-stream inputs of each block's first conv). :func:`~.compaction.compact` turns
such a Conv2d or Linear into a Gathered one, which keeps only the columns it uses and selects those
input channels before its product (network slimming's "channel selection" layer), so every masked
channel slice leaves the computation.
"""

from __future__ import annotations

import torch
from torch import nn


def _select_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    picked = x.index_select(dim, index)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        picked = picked.contiguous(memory_format=torch.channels_last)  # keep the fast layout
    return picked


class GatheredConv1d(nn.Conv1d):
    """A Conv1d over the input channels ``input_index`` only (made by :func:`compact`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_select_channels(x, self.input_index, 1))


class GatheredConv2d(nn.Conv2d):
    """A Conv2d over the input channels ``input_index`` only (made by :func:`compact`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_select_channels(x, self.input_index, 1))


class GatheredLinear(nn.Linear):
    """A Linear over the input features ``input_index`` only (made by :func:`compact`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_select_channels(x, self.input_index, -1))


_GATHERED = {nn.Conv1d: GatheredConv1d, nn.Conv2d: GatheredConv2d, nn.Linear: GatheredLinear}


def _used_inputs(module: nn.Module) -> list[int] | None:
    """Input channels a plain Conv2d/Linear reads through a non-zero weight, None when it reads all (or none)."""
    if type(module) not in _GATHERED or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1):
        return None
    w = module.weight.detach()
    if not w.numel():
        return None
    used = (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1)
    if bool(used.all()) or not bool(used.any()):
        return None
    return torch.nonzero(used).squeeze(1).tolist()


@torch.no_grad()
def _gather_inputs(module: nn.Module, index: list[int]) -> None:
    """Turn ``module`` (in place) into its Gathered class reading only input channels ``index``."""
    weight = module.weight
    keep = torch.as_tensor(index, dtype=torch.long, device=weight.device)
    module.weight = nn.Parameter(weight[:, keep].clone(), requires_grad=weight.requires_grad)
    module.register_buffer("input_index", keep)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        module.in_channels = len(index)
    else:
        module.in_features = len(index)
    module.__class__ = _GATHERED[type(module)]
