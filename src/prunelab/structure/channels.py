"""Channel masks: turn a choice of channels to remove into masks of the parameters that carry them.

Structured methods (PFP, PFEC, SoftNet, NNrelief neuron removal) are simulated with masks, as every
method in prunelab is (docs/methods/README.md): a removed channel has its producing weight rows (filters
or neurons), bias entries and BatchNorm gamma/beta masked, and the matching input slices of the layers
that read it. A depthwise conv carrying the channel loses its filter (and bias) too; an attention head
(a unit of a heads group, :mod:`.graph`) is its query/key/value rows and the output layer's columns.
Masks are keyed by each parameter's first name (a tied parameter has one mask).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from ..masking import param_name
from .graph import ChannelGraph


def channel_masks(model: nn.Module, graph: ChannelGraph, removed: Mapping[int, Iterable[int]],
                  alive: Mapping[str, torch.Tensor] | None = None, mask_bias: bool = True,
                  consumers: bool = True) -> dict[str, torch.Tensor]:
    """Masks that remove channels: ``removed`` maps a group index to the channels taken out.

    For each removed channel: the producing weight rows, and (``mask_bias``) the bias entries and the
    BatchNorm weight/bias, and (``consumers``) the input slices of every Conv/Linear reading it.
    Masks start from ``alive`` (pruned entries stay pruned). Only parameters touched are returned.
    """
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    first: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), n)
    canonical = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}

    def mask_of(name: str) -> torch.Tensor:
        name = canonical[name]
        if name not in masks:
            base = alive.get(name) if alive is not None else None
            masks[name] = (base.detach().to("cpu", torch.bool).clone() if base is not None
                           else torch.ones(params[name].shape, dtype=torch.bool))
        return masks[name]

    for g, channels in removed.items():
        channels = sorted(set(int(c) for c in channels))
        if not channels:
            continue
        group = graph.groups[g]
        for s in group.producers:
            if s.kind not in ("conv", "linear", "norm", "depthwise"):
                continue
            idx = [i for c in channels for i in s.index[c]]
            locals_ = ("weight", "bias") if (s.kind == "norm" or mask_bias) else ("weight",)
            if s.kind != "norm" or mask_bias:
                for local in locals_:
                    name = param_name(s.module, local)
                    if name in canonical:
                        mask_of(name)[idx] = False
        if consumers:
            for s in group.consumers:
                if s.kind not in ("conv", "linear"):
                    continue
                idx = [i for c in channels for i in s.index[c]]
                name = param_name(s.module, "weight")
                mask_of(name)[:, idx] = False
    return masks
