"""SynFlow: iterative synaptic flow pruning, data-free, at initialisation (docs/methods/grasp-synflow.md).

Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively conserving
synaptic flow", NeurIPS 2020.

On a copy of the network with every weight replaced by its absolute value (the network "linearised":
with non-negative weights and an all-ones input, ReLUs pass everything and BatchNorm, in eval mode, is
an affine map), feed one all-ones input and take R = 1ᵀ f(1) (for a ReLU MLP, R = 1ᵀ(Π|W_l|)1). The
synaptic saliency is S = θ ⊙ dR/dθ (non-negative). SynFlow prunes iteratively: at round k of n
(``rounds`` = 100) it keeps the top (1 - s)^(k/n) of the weights (exponential schedule), recomputing S
on the masked copy every round. Because the scores are recomputed, a layer that has lost weights sees
its remaining weights' saliency rise, which is what avoids layer collapse (the paper's Theorem 2:
the total flow through every layer is conserved).

Implemented as a ``pruner`` (it returns masks; ``prunelab.scores(model, "synflow")`` gives one round's
S on the current masks). Details:

* Everything is computed on a float64 deep copy (docs/methods/grasp-synflow.md; on the CPU for a model
  on Apple's MPS, which has no float64): the model's weights, buffers and masks are never touched, and
  no randomness is used (the result is deterministic).
* Like the official code (ganguli-lab/Synaptic-Flow ``Pruners/pruners.py::SynFlow``, ``prune.py``,
  read for this implementation), the absolute value is taken of every floating parameter *and* buffer
  (BatchNorm running statistics), the model is in eval mode, S = |θ ⊙ dR/dθ| and the schedule keeps
  density^(k/n) at round k. The official code runs in float32 (its ``model.double()`` is commented out);
  float64 here keeps R finite on deep networks.
* Masks already on the model (``alive``) stay: those weights are zero in the copy and never selected.
  Each round selects with `prunelab.selection` (global by default, ``scope="layer"`` allowed), so the
  last round, at exactly the target sparsity, keeps exactly round((1 - s) m) weights.
* The input shape (one example, without the batch dimension) comes from the ``input_shape`` option
  (a sequence of ints, or a string "1,28,28" / "1x28x28" from the command line); else from one example
  of ``data`` if given (the lab always passes the training set); else from a ``input_shape`` attribute
  of the model; else a PrunelabError asks for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .. import masking, selection
from ..data.feed import as_feed, parse_shape
from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option
from .snip import check_positive_int, scoring_mode


def resolve_input_shape(model: nn.Module, data, input_shape) -> tuple[int, ...]:
    """One example's input shape: the option, else ``data``'s, else ``model.input_shape``."""
    if input_shape is None and data is not None:
        return as_feed(data).input_shape()
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise PrunelabError("synflow needs the shape of one input example: pass input_shape=(C, H, W) "
                            "(--method-option input_shape=1,28,28) or data to take it from")
    return parse_shape(input_shape, "synflow")


def _linearised_copy(model: nn.Module, alive: Mapping[str, torch.Tensor]) -> nn.Module:
    """A float64 copy, without masks, whose masked weights are 0 and every other value is |value|."""
    clone = copy.deepcopy(model)
    masking.remove(clone)
    reference = next(clone.parameters())
    clone.to("cpu" if reference.device.type == "mps" else reference.device, torch.float64)  # MPS has no float64
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, mask in alive.items():
            params[name].mul_(mask.to(params[name].device, torch.float64))
        for tensor in [*clone.parameters(), *clone.buffers()]:
            if tensor.is_floating_point():
                tensor.abs_()
    return clone


def _saliency(clone: nn.Module, params: Mapping[str, nn.Parameter], ones: torch.Tensor) -> dict[str, torch.Tensor]:
    """S = θ ⊙ dR/dθ with R the sum of the outputs on the all-ones input."""
    with scoring_mode(clone, params, "eval", restore_buffers=False):
        output = clone(ones)
        flow = output.sum()
        grads = torch.autograd.grad(flow, list(params.values()), allow_unused=True, materialize_grads=True)
    if not torch.isfinite(flow):
        raise PrunelabError(f"synflow: the synaptic flow R overflowed float64 ({float(flow)}) on this model")
    return {name: (p.detach() * g).abs().cpu() for (name, p), g in zip(params.items(), grads)}


def _prepare(model, params, alive, data, input_shape):
    shape = resolve_input_shape(model, data, input_shape)
    alive = dict(alive or {})
    clone = _linearised_copy(model, alive)
    named = dict(clone.named_parameters())
    clone_params = {name: named[name] for name in params}
    device = next(clone.parameters()).device
    ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
    return clone, clone_params, alive, ones


@dataclass(frozen=True)
class SynflowOptions(Options):
    rounds: int = option(100, "pruning rounds, each keeping (1 - sparsity)^(k/rounds)", low=1)
    intermediate_count: str = option("round", "weights an intermediate round keeps: round(d N) (ours, the "
                                              "selection rule of every prunelab method) or ceil(d N) (the "
                                              "authors' Synaptic-Flow code)", choices=("round", "ceil"))
    input_shape: Any = option(None, "one example's input shape, e.g. 1,28,28; None: from the data or "
                                    "model.input_shape")


def synflow_scores(model: nn.Module, params: Mapping[str, nn.Parameter], *, data=None,
                   input_shape=None, **_) -> dict[str, torch.Tensor]:
    """One round of synaptic saliency S = |θ| ⊙ dR/d|θ| on the model as masked now (higher = keep)."""
    clone, clone_params, _, ones = _prepare(model, params, masking.masks(model), data, input_shape)
    return _saliency(clone, clone_params, ones)


def _round_masks(scores: Mapping[str, torch.Tensor], sparsity: float,
                 current: Mapping[str, torch.Tensor], count: str = "round") -> dict[str, torch.Tensor]:
    """Global top-k within ``current`` by an O(m) threshold (kthvalue) instead of a full sort.

    The same masks as `selection.global_topk` (the highest scores; among scores equal to the threshold,
    the first in parameter then flat order), used for the intermediate rounds where the sort dominated.
    """
    names = list(scores)
    flat = torch.cat([scores[n].to(torch.float64).flatten() for n in names])
    alive = torch.cat([current[n].flatten() for n in names])
    flat = flat.masked_fill(~alive, float("-inf"))
    total = flat.numel()
    # ceil: the authors' code prunes int((1 - d) N) = int(s N) and keeps the rest, about ceil(d N)
    wanted = total - int(sparsity * total) if count == "ceil" else selection.keep_count(total, sparsity)
    keep = min(wanted, int(alive.sum()))
    if keep == 0:
        chosen = torch.zeros_like(alive)
    else:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest
        chosen = flat > threshold
        ties = (flat == threshold).nonzero().flatten()[: keep - int(chosen.sum())]
        chosen[ties] = True
    result, start = {}, 0
    for name in names:
        size = scores[name].numel()
        result[name] = chosen[start:start + size].view(scores[name].shape)
        start += size
    return result


def synflow_pruner(model: nn.Module, params: Mapping[str, nn.Parameter], *, sparsity: float, scope: str,
                   alive: Mapping[str, torch.Tensor], data=None, rounds: int = SynflowOptions.rounds,
                   input_shape=None, intermediate_count: str = SynflowOptions.intermediate_count,
                   **_) -> dict[str, torch.Tensor]:
    """SynFlow masks: ``rounds`` rounds, keeping (1 - sparsity)^(k/rounds) at round k (Tanaka et al. 2020)."""
    rounds = check_positive_int("synflow", "rounds", rounds)
    clone, clone_params, alive, ones = _prepare(model, params, alive, data, input_shape)
    base = {name: p.detach().clone() for name, p in clone_params.items()}  # |θ| with old masks applied
    current = {name: alive[name].cpu().bool() if name in alive else torch.ones(p.shape, dtype=torch.bool)
               for name, p in params.items()}
    for k in range(1, rounds + 1):
        target = sparsity if k == rounds else 1.0 - (1.0 - sparsity) ** (k / rounds)
        with torch.no_grad():
            for name, p in clone_params.items():
                p.copy_(base[name] * current[name].to(p.device, p.dtype))
        saliency = _saliency(clone, clone_params, ones)
        if k < rounds and scope == "global":
            current = _round_masks(saliency, target, current, intermediate_count)
        else:  # the last round (and layer-wise scope) through the library's exact selection
            current = selection.select(saliency, target, scope, current)
    return current


register(Method(
    "synflow", "iterative synaptic flow |θ|⊙dR/d|θ| on an all-ones input; data-free, avoids layer collapse",
    synflow_scores, scope="global", when="init", needs_data=False,
    options=SynflowOptions, pruner=synflow_pruner,
    paper="Tanaka, Kunin, Yamins & Ganguli, NeurIPS 2020"))
