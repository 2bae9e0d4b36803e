"""Norm-based filter pruning with a uniform per-layer ratio: PFEC (L1) and SoftNet-style (L2).

* ``pfec``: Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017
  (arXiv 1608.08710), section 3.1: the importance of filter F_{i,j} of conv layer i is the sum of the
  absolute values of its kernel weights, s_j = sum |K| (the L1 norm of the filter); in each layer the m
  filters with the smallest s_j are removed together with their feature maps and the matching kernel
  channels of the next layer. For a Linear layer the unit is a neuron and s_j is the L1 norm of its
  weight row. This is "FT" in PFP's tables (torchprune: L1 filter norm, one uniform ratio per layer).
* ``softnet``: the same with the L2 norm of the filter, as in He, Kang, Dong, Fu & Yang, "Soft Filter
  Pruning for Accelerating Deep Convolutional Neural Networks", IJCAI 2018 (PFP's "SoftNet" baseline:
  L2 filter norm, uniform per-layer ratio). The *soft* schedule of that paper (pruned filters are zeroed
  but keep training and may come back) is not reproduced: prunelab's masks prune for good, which is how
  PFP's comparison ran it (prune, then retrain).

**What ``sparsity`` means here**: the fraction of channels (filters / neurons) removed in *every*
prunable layer: a layer with n channels loses round(sparsity * n) of them (at least one channel is
kept). The fraction of weights removed is larger, because a removed channel also takes the matching
input slice of the next layer. Channels already removed (an iterative schedule) count toward the
target and never come back.

**Which layers**: the channel groups that are *safe* (`prunelab.structure.ChannelGroup.safe`): exactly
one Conv1d/Conv2d/Linear writes the channels (plus its BatchNorm, and a depthwise conv that carries them
on, as in MobileNetV2: the group is ranked by the writing conv's filter norms) and only Conv/Linear
layers read them. The output layer is never pruned, and in a ResNet only the first conv of each residual
block is (its channels do not reach a residual add), which is what PFEC does for ResNets. Coupled
channels (the residual stream) are left alone. The heads of a Hugging Face self-attention (BERT) are
units too: a head is ranked by the norm of its query, key and value rows together and removed whole.
``nn.MultiheadAttention`` is accepted and left whole (its heads cannot be cut out of the module); the
feed-forward layers around it are pruned.

Refused in one line naming the layer, before the model changes (:func:`channel_groups`): a prunable
layer called more than once per forward pass (a shared module), and a model in which no group can lose
channels (e.g. its channels are read through a weight tied to an embedding), with the reason.

**Masks** (docs/methods/pfec-softnet.md): for a removed channel, the filter (weight row), its bias entry, the
BatchNorm weight and bias of that channel (so the channel outputs exactly 0 in eval and train mode),
and the input slices of the layers reading it. ``mask_bias=False`` masks only the weights.

Finding the coupling traces the model once, which needs an example input: the first example of
``data`` when given (the lab always passes the training set), else the ``input_shape`` option, else a
``model.input_shape`` attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .. import structure
from ..data.feed import example_input
from ..errors import PrunelabError
from ..masking import param_name
from ..methods import Method, register
from ..options import Options, option
from ..selection import check_sparsity


def _unsafe_reason(model: nn.Module, group: structure.ChannelGroup) -> str:
    """Why a group is not pruned by a channel method (one phrase)."""
    if group.blocked is not None:
        return group.blocked
    if group.is_output:
        return "it is the network output"
    odd = [s for s in group.producers + group.consumers
           if s.kind not in ("conv", "linear", "norm", "depthwise")]
    if odd:
        kind = type(model.get_submodule(odd[0].module)).__name__
        return f"its channels pass through {kind} {odd[0].module!r}, which does not keep channels separate"
    writers = [s.module for s in group.layers]
    if len(writers) > 1 and group.heads is None:
        return (f"its channels are written by {len(writers)} layers ({', '.join(writers[:3])}"
                f"{', ...' if len(writers) > 3 else ''}: a residual addition or a concatenation)")
    reader = next((s for s in group.consumers if s.kind not in ("conv", "linear")), None)
    if reader is not None:
        return f"its channels are read by {type(model.get_submodule(reader.module)).__name__} {reader.module!r}"
    return "its channels are coupled with other layers"


def channel_groups(model: nn.Module, graph: structure.ChannelGraph, params: Mapping[str, torch.Tensor] | None,
                   method: str) -> list[int]:
    """The groups a channel method prunes: safe groups whose scored weights are all in ``params``.

    Refuses (one line, naming the layer) a prunable layer called more than once per forward pass (a
    shared module), and a model in which no group can lose channels, with the reason for the first
    group whose weights were eligible."""
    owners = None if params is None else {n.rpartition(".")[0] for n in params}
    reused = graph.reused(owners)
    if reused:
        name, calls = reused[0]
        raise PrunelabError(f"{method}: layer {name!r} is called {calls} times per forward pass (a shared "
                            f"module, its channels are coupled across the calls); {method} does not prune "
                            f"shared layers: exclude it (exclude={name!r}) or give each call its own layer")
    chosen, refused = [], None
    for g, group in enumerate(graph.groups):
        writers = list(group.layers)  # its one Conv/Linear writer, or a head's query/key/value rows
        eligible = bool(writers) and (params is None or all(param_name(s.module, "weight") in params
                                                            for s in writers))
        if group.safe and eligible:
            chosen.append(g)
        elif refused is None and eligible and not group.is_output:
            refused = (group.root, _unsafe_reason(model, group))
    if not chosen:
        where = (f"{refused[0]}: {refused[1]}" if refused is not None
                 else "every eligible layer is an output layer")
        raise PrunelabError(f"{method}: no layer can lose channels ({where})")
    return chosen


def filter_norms(model: nn.Module, graph: structure.ChannelGraph, p: int = 1,
                 params: Mapping[str, torch.Tensor] | None = None, method: str = "pfec") -> dict[int, torch.Tensor]:
    """``{group index: per-channel norm}`` of every prunable group (:func:`channel_groups`): the Lp norm
    of each channel's weight row (an attention head: of its query, key and value rows together).

    Only groups whose producing weights are in ``params`` (default: all). The current weights are used,
    so masked entries count as zero.
    """
    norms = {}
    for g in channel_groups(model, graph, params, method):
        group = graph.groups[g]
        rows = []
        for layer in group.layers:
            weight = model.get_submodule(layer.module).weight.detach().to("cpu", torch.float64)
            rows.append(torch.stack([weight[list(ix)].flatten() for ix in layer.index]))
        rows = torch.cat(rows, 1)
        norms[g] = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1).sqrt()
    return norms


def dead_channels(model: nn.Module, group: structure.ChannelGroup, alive) -> torch.Tensor:
    """Channels whose weight rows are already fully masked (an earlier pruning step removed them)."""
    layer = group.layers[0]
    name = param_name(layer.module, "weight")
    mask = alive.get(name) if alive else None
    if mask is None:
        return torch.zeros(group.size, dtype=torch.bool)
    mask = mask.to("cpu", torch.bool)
    return torch.tensor([not bool(mask[list(ix)].any()) for ix in layer.index])


def lowest_channels(model: nn.Module, graph: structure.ChannelGraph, scores: Mapping[int, torch.Tensor],
                    sparsity: float, alive=None) -> dict[int, list[int]]:
    """``{group: channels to remove}``: the round(sparsity * n) lowest-scoring channels of each group in
    ``scores`` (at least one kept). Channels already dead stay dead and count toward the target; ties keep
    the lower channel index."""
    removed = {}
    for g, score in scores.items():
        group = graph.groups[g]
        n = group.size
        target = min(int(round(sparsity * n)), n - 1)
        dead = dead_channels(model, group, alive)
        order = torch.sort(score.masked_fill(dead, float("-inf")), descending=True, stable=True).indices
        keep = min(max(n - max(target, int(dead.sum())), 0), int((~dead).sum()))
        kept = set(order[:keep].tolist())
        removed[g] = [c for c in range(n) if c not in kept]
    return removed


def filter_pruning_masks(model: nn.Module, sparsity: float, *, p: int = 1, example,
                         alive: Mapping[str, torch.Tensor] | None = None, mask_bias: bool = True,
                         params: Mapping[str, torch.Tensor] | None = None,
                         method: str = "pfec") -> dict[str, torch.Tensor]:
    """Masks removing round(sparsity * n) lowest-Lp-norm channels of every safe layer (see module doc)."""
    sparsity = check_sparsity(sparsity)
    graph = structure.channel_graph(model, example)
    removed = lowest_channels(model, graph, filter_norms(model, graph, p, params, method), sparsity, alive)
    return structure.channel_masks(model, graph, removed, alive=alive, mask_bias=mask_bias)


def _pruner(p: int, method: str):
    def pruner(model, params, *, sparsity, scope, alive, data, generator, mask_bias=True, input_shape=None, **_):
        if scope != "layer":
            raise PrunelabError(f"{method} removes the same fraction of channels in every layer: scope must "
                                f"be 'layer', got {scope!r}")
        example = example_input(model, data, input_shape, method)
        return filter_pruning_masks(model, sparsity, p=p, example=example, alive=alive, mask_bias=mask_bias,
                                    params=params, method=method)
    return pruner


def _criterion(p: int, method: str):
    def criterion(model, params, *, data, generator, mask_bias=True, input_shape=None, **_):
        """Each weight of a safe layer scored by the norm of its filter/neuron (inspection only)."""
        example = example_input(model, data, input_shape, method)
        graph = structure.channel_graph(model, example)
        scores = {}
        for g, norm in filter_norms(model, graph, p, params, method).items():
            for layer in graph.groups[g].layers:
                name = param_name(layer.module, "weight")
                score = torch.zeros(params[name].shape, dtype=torch.float64)
                for c, ix in enumerate(layer.index):
                    score[list(ix)] = norm[c]
                scores[name] = score
        return {n: scores[n] for n in params if n in scores}  # parameter order
    return criterion


# Linear and Conv1d/Conv2d layers; nn.MultiheadAttention is accepted and left whole (its heads cannot be
# removed from the module: the feed-forward layers around it are pruned)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)


@dataclass(frozen=True)
class FilterOptions(Options):
    mask_bias: bool = option(True, "also mask the removed channels' biases and BatchNorm entries")
    input_shape: Any = option(None, "one example's input shape for tracing when no data is given, e.g. 1,28,28")


register(Method("pfec", "L1-norm filter pruning, uniform fraction of channels per layer (Li et al.; PFP's FT)",
                _criterion(1, "pfec"), scope="layer", options=FilterOptions, pruner=_pruner(1, "pfec"), structured=True,
                layers=_LAYERS, targets=("channels",), paper="Li et al., ICLR 2017"))
register(Method("softnet", "L2-norm filter pruning, uniform fraction of channels per layer (He et al. 2018)",
                _criterion(2, "softnet"), scope="layer", options=FilterOptions, pruner=_pruner(2, "softnet"), structured=True,
                layers=_LAYERS, targets=("channels",), paper="He et al., IJCAI 2018"))
