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
* Token ids and dicts of inputs (docs/methods/grasp-synflow.md): an example's entries become ones in their
  dtype, and every embedding is a Linear layer on the all-ones vector (its output is 1ᵀ|E|).
* Refused, naming the layer (the flow is defined for positively homogeneous networks): attention, a
  softmax, LayerNorm-like normalisation, a layer that a saturating activation cuts off from the flow, and
  a negative R. A layer that cannot reach the output at all gets no flow and is simply pruned first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import masking, selection
from ..data import feed
from ..data.feed import Inputs, as_feed, parse_shape
from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option
from .snip import attention_slow_path, check_positive_int, scoring_mode


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


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


def all_ones_input(model: nn.Module, data, input_shape) -> Inputs:
    """The all-ones input, a batch of one: float ones of ``input_shape`` if given, else of the shape of one
    example of ``data``, else of ``model.input_shape``. Integer inputs of a model with embeddings stay
    integers (token id 1; the embeddings' outputs are replaced, see `_feed_embeddings_ones`), and a dict
    of inputs (Hugging Face) becomes ones in each entry's dtype (the attention mask attends everywhere)."""
    if input_shape is None and data is not None:
        example = as_feed(data).example()
        if isinstance(example, Mapping):
            return {key: torch.ones_like(value) for key, value in example.items()}
        if not example.is_floating_point() and _has_embedding(model):
            return torch.ones_like(example)
        return torch.ones((1, *example.shape[1:]))  # the example is drawn once (a generator's too)
    return torch.ones((1, *resolve_input_shape(model, None, input_shape)))


def _has_embedding(model: nn.Module) -> bool:
    return any(isinstance(m, _EMBEDDINGS) for m in model.modules())


def _feed_embeddings_ones(clone: nn.Module) -> None:
    """Make every embedding of ``clone`` a Linear layer on the all-ones input: an embedding is a Linear
    map of a one-hot vector, so the all-ones vector reaching it gives 1ᵀ|E| (the column sums of |E|) at
    every position, whatever the ids. The ids are replaced by 0 first, so any input indexes validly."""
    for module in clone.modules():
        if isinstance(module, _EMBEDDINGS):
            module.register_forward_pre_hook(
                lambda m, args: (torch.zeros_like(args[0], dtype=torch.long), *args[1:]))
            module.register_forward_hook(lambda m, args, out: m.weight.sum(0).expand(out.shape))


def _linearised_copy(model: nn.Module, alive: Mapping[str, torch.Tensor], absolute: bool = True) -> nn.Module:
    """A float64 copy, without masks, whose masked weights are 0 and every other value is |value|
    (``absolute=False``: the values themselves)."""
    clone = copy.deepcopy(model)
    masking.remove(clone)
    reference = next(clone.parameters())
    clone.to("cpu" if reference.device.type == "mps" else reference.device, torch.float64)  # MPS has no float64
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, mask in alive.items():
            params[name].mul_(mask.to(params[name].device, torch.float64))
        for tensor in [*clone.parameters(), *clone.buffers()] if absolute else []:
            if tensor.is_floating_point():
                tensor.abs_()
    _feed_embeddings_ones(clone)
    return clone


# operations the all-ones probe of the |w| network cannot rank weights through (module doc), and why
_ATTENTION = ("computes attention: every position of the all-ones input is the same, so the attention weights "
              "ignore the queries and keys, which get no synaptic flow")
_NORMALISING = "divides out the scale of its input, so the flow does not rank the weights before it"
_NOT_HOMOGENEOUS = {
    F.scaled_dot_product_attention: _ATTENTION, F.multi_head_attention_forward: _ATTENTION,
    **dict.fromkeys((F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax,
                     torch.Tensor.log_softmax),
                    "applies a softmax: its outputs sum to 1 whatever the weights before it, so the flow does "
                    "not rank them"),
    **dict.fromkeys((F.layer_norm, F.group_norm, F.instance_norm, *([F.rms_norm] if hasattr(F, "rms_norm") else [])),
                    "applies a normalisation that " + _NORMALISING),
}


class _OperationProbe(TorchFunctionMode):
    """Records the first operation of ``_NOT_HOMOGENEOUS`` called, and the innermost module calling it."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack, self.found = stack, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.found is None and func in _NOT_HOMOGENEOUS:
            self.found = (self.stack[-1] if self.stack else "", _NOT_HOMOGENEOUS[func])
        return func(*args, **(kwargs or {}))


def _refuse_not_homogeneous(clone: nn.Module, ones: Inputs) -> None:
    """Refuse a model whose forward pass on the all-ones input goes through attention, a softmax or a
    scale-removing normalisation (LayerNorm, GroupNorm): SynFlow's flow is defined for positively
    homogeneous networks, and through these the flow of the weights before them is meaningless."""
    stack: list[str] = []
    handles = []
    for name, module in clone.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(lambda m, args, out: _pop(stack)))
    probe = _OperationProbe(stack)
    try:
        with torch.no_grad(), attention_slow_path(), scoring_mode(clone, {}, "eval", restore_buffers=False), probe:
            feed.call(clone, ones)
    except Exception:  # noqa: BLE001 - the scoring pass itself reports a model that cannot run
        pass
    finally:
        for handle in handles:
            handle.remove()
    if probe.found is not None:
        module, why = probe.found
        raise PrunelabError(f"synflow: {module or 'the model'!s} {why} (the synaptic flow is defined for positively "
                            "homogeneous networks)")


def _pop(stack: list[str]) -> None:
    if stack:
        stack.pop()


def _refuse_dead_flow(model, params, alive, ones, saliency, get_logits) -> None:
    """Refuse a prunable tensor that gets no synaptic flow at all although its weights are not zero and do
    reach the output: a saturating activation (ReLU6, tanh, sigmoid) on its path cuts the all-ones signal,
    so SynFlow would rank its weights by nothing. A tensor that cannot reach the output (no gradient with
    the signed weights either) is left alone: pruning it first is right."""
    dead = [name for name, score in saliency.items() if not bool(score.any()) and bool(params[name].detach().any())]
    if not dead:
        return
    signed = _linearised_copy(model, alive, absolute=False)
    named = dict(signed.named_parameters())
    weights = {name: named[name] for name in dead}
    with scoring_mode(signed, weights, "eval", restore_buffers=False):
        output = _forward(signed, ones, get_logits).sum()
        grads = torch.autograd.grad(output, list(weights.values()), allow_unused=True, materialize_grads=True)
    for name, grad in zip(dead, grads):
        if bool(grad.any()):
            raise PrunelabError(f"synflow: no synaptic flow reaches {name} on the all-ones input, although its "
                                "weights affect the output: a saturating activation (ReLU6, tanh, sigmoid) on its "
                                "path cuts the signal, so SynFlow cannot rank them")


def _forward(clone: nn.Module, ones: Inputs, get_logits) -> torch.Tensor:
    """The clone's logits on the all-ones input; a model that cannot take it is refused in one line."""
    try:
        return get_logits(feed.call(clone, ones))
    except PrunelabError:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise PrunelabError(f"synflow: the model cannot take the all-ones input {_describe(ones)} "
                            f"({type(error).__name__}: {first}); give input_shape") from None


def _describe(inputs: Inputs) -> str:
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in inputs.items()) + "}"
    return f"{tuple(inputs.shape)} {inputs.dtype}"


def _saliency(clone: nn.Module, params: Mapping[str, nn.Parameter], ones: Inputs,
              get_logits=feed.default_logits) -> dict[str, torch.Tensor]:
    """S = θ ⊙ dR/dθ with R the sum of the outputs (the logits) on the all-ones input."""
    with scoring_mode(clone, params, "eval", restore_buffers=False):
        flow = _forward(clone, ones, get_logits).sum()
        grads = torch.autograd.grad(flow, list(params.values()), allow_unused=True, materialize_grads=True)
    if not torch.isfinite(flow):
        raise PrunelabError(f"synflow: the synaptic flow R overflowed float64 ({float(flow)}) on this model")
    if flow < 0:
        raise PrunelabError(f"synflow: the synaptic flow R = {float(flow):.3g} of the |w| network on the all-ones "
                            "input is negative: a layer that is not positively homogeneous flips the signal")
    return {name: (p.detach() * g).abs().cpu() for (name, p), g in zip(params.items(), grads)}


def _prepare(model, params, alive, data, input_shape):
    inputs = all_ones_input(model, data, input_shape)
    alive = dict(alive or {})
    clone = _linearised_copy(model, alive)
    inputs = feed.to_model(clone, inputs)
    _refuse_not_homogeneous(clone, inputs)
    named = dict(clone.named_parameters())
    clone_params = {name: named[name] for name in params}
    return clone, clone_params, alive, inputs


def _logits_of(data):
    """The data's logits adapter (a Hugging Face output's ``.logits``), or the default."""
    return data.get_logits if isinstance(data, feed.Feed) else feed.default_logits


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
    alive = masking.masks(model)
    clone, clone_params, alive, ones = _prepare(model, params, alive, data, input_shape)
    saliency = _saliency(clone, clone_params, ones, _logits_of(data))
    _refuse_dead_flow(model, clone_params, alive, ones, saliency, _logits_of(data))
    return saliency


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
        saliency = _saliency(clone, clone_params, ones, _logits_of(data))
        if k == 1:
            _refuse_dead_flow(model, clone_params, alive, ones, saliency, _logits_of(data))
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
