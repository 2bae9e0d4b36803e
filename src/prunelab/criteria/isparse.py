"""iSparse: output-informed edge sparsification (docs/methods/isparse.md).

Garg & Candan, "iSparse: Output Informed Sparsification of Neural Networks", ICMR 2020 (also the
ICLR-2020 OpenReview submission ryefmpEYPr).

**The score is OUR reconstruction** (docs/methods/isparse.md), not the paper's equation: only the
abstract and figure captions could be read. What they state: an edge significance score E
measures an edge's importance *with respect to the network output* (Fig. 2: n_i's contribution to the
overall output "rather than only between n_i and n_j"), built from W_l+ = |W_l| (element-wise), and it
is contrasted with Retrain-free's local contribution input x weight (Fig. 3). Every choice below that is
not in that list is ours, and each is a switchable option:

1. Neuron significance N, propagated back from the output with absolute weights (NISP-style):
   ``N_L = 1`` for every output unit (``output="ones"``; ``"softmax"``: the mean softmax probability of
   each class over the scoring examples, our reading of the "class-averaged" alternative;
   ``"activation"``: the mean |output|), and ``N_l = (W_l+)^T N_{l+1}``.
   * a conv layer acts through its channel-to-channel matrix ``sum_{u,v} |K[j, i, u, v]|``;
   * a Linear after a flatten reads channel c as its H*W features: the channel's column of the matrix is
     the sum of |W| over those features (the positions come from ``structure.channel_graph``);
   * a channel read by several layers sums their contributions; pooling, activations, dropout and
     BatchNorm carry channels unchanged (BatchNorm's scale is ignored);
   * each N_l is normalised to sum 1 (scale control in deep nets; a layer whose N is all zero stays 0);
   * the current weights are used, so masked edges carry no significance.
   Channels written by several layers (residual additions), channels passing through other layers with
   parameters (grouped convolutions, option-A shortcuts) and recurrent layers raise a PrunelabError naming
   the layer: a channel written by several layers has no single "next layer" to propagate from.
2. Edge significance of the edge i -> j of layer l (``use_input=True``):
   ``E_l(i, j) = mean_x |x_i| * |w_ij| * N_{l+1}(j)``, x_i the input of n_i over the scoring examples;
   for a conv every kernel element (j, i, u, v) is an edge and x_i is the mean |input| of channel i over
   positions (the unpadded input map) and examples. ``use_input=False``: ``E = |w| * N``.
   ``neuron_importance="ones"`` (N = 1 everywhere) gives Retrain-free's ``mean_x |x_i w_ij|``.
   A bias (``include_bias=True``) is an edge from a constant input 1: ``E = |b_j| N_{l+1}(j)``.
3. Selection (docs/methods/isparse.md, also reconstructed): the fraction ``sparsity`` (the paper's
   "sparsification factor") of the lowest-E edges of *each* layer (scope "layer", default), or globally.

Options (``--method-option key=value``; ``mode`` is also the flag ``--mode``):

* ``mode`` ("sparsify-with"): "sparsify-with" = applied once to a trained model, no fine-tuning (the lab
  resolves ``when="trained"`` with 0 fine-tuning epochs); "train-with" = masks recomputed from the
  current weights while training from scratch (``when="during"``, :class:`TrainWith`).
* ``use_input`` (True), ``neuron_importance`` ("propagated" | "ones"), ``output`` ("ones" | "softmax" |
  "activation"): the parts of the score above.
* ``examples`` (1000): scoring examples drawn without replacement from the data with the seed (all of
  them, in order, when the data holds no more), from any form ``prunelab.data.feed`` takes. ``batch_size``
  (250): forward-pass chunk, memory only.
* ``interval`` (1), ``ramp`` (1): train-with only, see :class:`TrainWith`.
* ``input_shape`` (None): example input shape for tracing the channel graph when no data is given.

Inputs are captured with forward pre-hooks in one no-grad pass (eval mode, nothing in the model changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .. import structure
from ..data import feed
from ..data.feed import as_feed, example_input
from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option
from .snip import attention_slow_path, check_measurable, check_positive_int, scoring_mode

MODES = ("sparsify-with", "train-with")
IMPORTANCE = ("propagated", "ones")
OUTPUTS = ("ones", "softmax", "activation")

# --- checks -----------------------------------------------------------------------------------------------

def check_choice(method: str, name: str, value, allowed) -> str:
    if value not in allowed:
        raise PrunelabError(f"{method} option {name} must be one of: {', '.join(allowed)}; got {value!r}")
    return value


def check_bool(method: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise PrunelabError(f"{method} option {name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class IsparseOptions(Options):
    mode: str = option("sparsify-with", "sparsify-with: prune a trained model; train-with: recompute the masks "
                                        "while training from scratch", choices=MODES, flag=True)
    use_input: bool = option(True, "weigh each edge by the mean |input| it reads")
    neuron_importance: str = option("propagated", "N(j) propagated back from the output through |W|, or 1 "
                                                  "('ones': Retrain-free)", choices=IMPORTANCE)
    output: str = option("ones", "final-response importance: 1 per output, or the mean softmax / |activation|",
                         choices=OUTPUTS)
    examples: int = option(1000, "scoring examples drawn from the data", low=1)
    batch_size: int = option(250, "examples per forward pass while scoring", low=1)
    interval: int = option(1, "train-with: epochs between mask recomputations", low=1)
    ramp: int = option(1, "train-with: recomputations over which the factor rises to its target (ours)", low=1)
    input_shape: Any = option(None, "one example's input shape for tracing when no data is given")


def when_from(options: Mapping[str, Any]) -> str:
    """The lab's schedule implied by ``mode``: sparsify-with prunes a trained model, train-with while training."""
    mode = check_choice("isparse", "mode", options.get("mode", IsparseOptions.mode), MODES)
    return {"sparsify-with": "trained", "train-with": "during"}[mode]


# --- the pieces -------------------------------------------------------------------------------------------

def scored_layers(model: nn.Module, params: Mapping[str, torch.Tensor], method: str) -> dict[str, nn.Module]:
    """``{module name: module}`` owning the scored parameters; only Linear and Conv2d (groups=1) qualify,
    and only where a hook on the layer sees its inputs: not ``nn.MultiheadAttention``'s ``out_proj`` (the
    attention reads its weight directly) and not a weight tied to another layer's."""
    layers = {}
    for name in params:
        module_name, _, local = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        supported = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        if not supported or local not in ("weight", "bias"):
            kind = type(module).__name__ + (f"(groups={module.groups})" if isinstance(module, nn.Conv2d) else "")
            raise PrunelabError(f"{method} scores the edges of Linear and Conv2d layers; {name} belongs to "
                                f"{kind} {module_name!r}, which is not supported")
        check_measurable(method, model, module_name, module, name)
        layers[module_name] = module
    return layers


def scoring_inputs(data, generator: torch.Generator, examples: int, method: str):
    """The scoring inputs: ``examples`` examples drawn with ``generator`` (all, in order, when the data holds
    no more); any form of data ``prunelab.data.feed`` takes, or a tensor of inputs."""
    examples = check_positive_int(method, "examples", examples)
    if data is None:
        raise PrunelabError(f"{method} measures layer inputs on data: pass data=... (or use_input=False)")
    return as_feed(data).draw(examples, generator).inputs


@torch.no_grad()
def layer_statistics(model: nn.Module, layers: Mapping[str, nn.Module], inputs: torch.Tensor, batch_size: int,
                     outputs: Mapping[str, nn.Module] | None = None, output: str = "ones"):
    """One pass over ``inputs``: mean |input| per input channel/feature of each of ``layers``, and for each of
    ``outputs`` the mean per output unit of its softmax (``output="softmax"``) or |output| ("activation").

    Returns ``(inputs_mean, outputs_mean)``, float64 on the CPU, keyed by module name.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(key: str, per_channel: torch.Tensor, count: int) -> None:
        per_channel = per_channel.to("cpu", torch.float64)
        sums[key] = sums[key] + per_channel if key in sums else per_channel
        counts[key] = counts.get(key, 0) + count

    def channels_first(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        # (N, C, ...) for a conv, (..., F) for a Linear: rows of channels -> (rows, C)
        if isinstance(module, nn.Linear):
            return x.reshape(-1, x.shape[-1])
        return x.transpose(0, 1).reshape(x.shape[1], -1).t()

    def input_hook(name):
        def hook(module, args):
            x = channels_first(args[0].detach(), module)
            add("in:" + name, x.abs().sum(0, dtype=torch.float64), x.shape[0])
        return hook

    def output_hook(name):
        def hook(module, _args, result):
            y = channels_first(result.detach(), module)
            y = torch.softmax(y.double(), dim=1) if output == "softmax" else y.abs()
            add("out:" + name, y.sum(0, dtype=torch.float64), y.shape[0])
        return hook

    outputs = outputs or {}
    handles = [m.register_forward_pre_hook(input_hook(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(output_hook(n)) for n, m in outputs.items()]
    try:
        # no dropout, BatchNorm running statistics, all restored; attention's fused inference path would
        # skip Linear.forward (and so the hooks)
        with scoring_mode(model, {}, "eval"), attention_slow_path():
            for chunk in feed.chunks(inputs, batch_size):
                feed.call(model, feed.to_model(model, chunk))
    finally:
        for handle in handles:
            handle.remove()
    missed = [n for n in layers if "in:" + n not in sums]
    if missed:
        raise PrunelabError(f"layer(s) {', '.join(missed)} did not run in the forward pass, so their inputs "
                            "cannot be measured")
    mean = {k: sums[k] / counts[k] for k in sums}
    return {n: mean["in:" + n] for n in layers}, {n: mean["out:" + n] for n in outputs if "out:" + n in mean}


def _normalised(values: torch.Tensor) -> torch.Tensor:
    total = float(values.sum())
    return values / total if total > 0 else values  # an all-zero significance stays zero (no NaN)


def _position_channel(index: tuple[tuple[int, ...], ...], length: int, what: str) -> torch.Tensor:
    """For each position along a module's channel dimension, the group channel it belongs to."""
    owner = torch.full((length,), -1, dtype=torch.long)
    for channel, positions in enumerate(index):
        owner[list(positions)] = channel
    if bool((owner < 0).any()):
        raise PrunelabError(f"internal error: the channel graph does not cover every {what}")
    return owner


class Significance:
    """Neuron significance N per channel group (step 1 in docs/methods/isparse.md), computed lazily."""

    def __init__(self, model: nn.Module, graph: structure.ChannelGraph, method: str, output: str = "ones",
                 output_means: Mapping[str, torch.Tensor] | None = None):
        self.model, self.graph, self.method = model, graph, method
        self.output, self.output_means = output, dict(output_means or {})
        self.memo: dict[int, torch.Tensor] = {}
        self.visiting: set[int] = set()

    def check(self, g: int) -> structure.ChannelGroup:
        """Refuse channel groups with no single producing layer (residual adds, shortcuts, other layers)."""
        group = self.graph.groups[g]
        chain = f"{self.method} propagates significance along plain Conv2d/Linear chains"
        heads = getattr(group, "heads", None)
        if heads is not None:  # the query/key/value layers of one attention module write these channels
            raise PrunelabError(f"{chain}; the channels of {group.root!r} are the heads of attention {heads!r} "
                                "(written by its query, key and value layers), which is not supported")
        writers = [s.module for s in group.layers]
        blocked = getattr(group, "blocked", None)
        if len(writers) > 1 and blocked is not None:  # a shared module writes them (several calls), not an add
            raise PrunelabError(f"{chain}; the channels of {group.root!r} are written by {', '.join(writers)}: "
                                f"{blocked}, which is not supported")
        if len(writers) > 1:
            raise PrunelabError(f"{chain}; the channels of {group.root!r} are written by {len(writers)} layers "
                                f"({', '.join(writers[:4])}{', ...' if len(writers) > 4 else ''}: a residual "
                                f"addition), which is not supported")
        odd = [s for s in group.producers + group.consumers if s.kind not in ("conv", "linear", "norm")]
        if odd:
            s = odd[0]
            kind = type(self.model.get_submodule(s.module)).__name__
            raise PrunelabError(f"{chain}; the channels of {group.root!r} pass through {kind} {s.module!r}, which "
                                "is not supported")
        return group

    def of_group(self, g: int) -> torch.Tensor:
        if g in self.memo:
            return self.memo[g]
        if g in self.visiting:
            raise PrunelabError(f"{self.method}: the channels of {self.graph.groups[g].root!r} feed back into "
                                "themselves; not supported")
        self.visiting.add(g)
        group = self.check(g)
        if group.is_output:
            if self.output == "ones":
                value = torch.ones(group.size, dtype=torch.float64)
            else:
                layer = group.layers[0]  # one writer (checked): its mean softmax / |output| per unit
                means = self.output_means[layer.module]
                value = torch.stack([means[list(ix)].sum() for ix in layer.index])
        else:
            value = torch.zeros(group.size, dtype=torch.float64)
            for s in group.consumers:  # N_l = sum over readers of (W+ reduced to channels)^T N_{l+1}
                module = self.model.get_submodule(s.module)
                weight = module.weight.detach().to("cpu", torch.float64).abs()
                matrix = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(2)  # sum_{u,v} |K|
                columns = _position_channel(s.index, matrix.shape[1], f"input of {s.module}")
                per_channel = torch.zeros(matrix.shape[0], group.size, dtype=torch.float64)
                per_channel.index_add_(1, columns, matrix)  # flatten -> Linear: sum over the H*W features
                value += per_channel.t() @ self.of_rows(s.module, matrix.shape[0])
        self.visiting.discard(g)
        self.memo[g] = _normalised(value)
        return self.memo[g]

    def of_rows(self, module: str, rows: int) -> torch.Tensor:
        """N_{l+1} of each output row (neuron / filter) of ``module``: the significance of what it writes."""
        found = self.graph.producing(module)
        if found is None:
            raise PrunelabError(f"{self.method}: no channel group for the output of {module!r}")
        g, s = found
        return self.of_group(g)[_position_channel(s.index, rows, f"output of {module}")]


def edge_scores(model: nn.Module, params: Mapping[str, torch.Tensor], *, data, generator: torch.Generator,
                method: str = "isparse", use_input: bool = IsparseOptions.use_input,
                neuron_importance: str = IsparseOptions.neuron_importance, output: str = IsparseOptions.output,
                examples: int = IsparseOptions.examples, batch_size: int = IsparseOptions.batch_size,
                input_shape=None) -> dict[str, torch.Tensor]:
    """``E = mean|x_i| * |w_ij| * N_{l+1}(j)`` for every scored parameter (module docstring), float64 on the CPU."""
    check_bool(method, "use_input", use_input)
    check_choice(method, "neuron_importance", neuron_importance, IMPORTANCE)
    check_choice(method, "output", output, OUTPUTS)
    batch_size = check_positive_int(method, "batch_size", batch_size)
    layers = scored_layers(model, params, method)
    propagated = neuron_importance == "propagated"
    graph = structure.channel_graph(model, example_input(model, data, input_shape, method)) if propagated else None
    outputs = {}
    if propagated and output != "ones":
        outputs = {g.layers[0].module: model.get_submodule(g.layers[0].module)
                   for g in graph.groups if g.is_output and g.layers}
    inputs_mean, outputs_mean = {}, {}
    if use_input or outputs:
        inputs = scoring_inputs(data, generator, examples, method)
        inputs_mean, outputs_mean = layer_statistics(model, layers if use_input else {}, inputs, batch_size,
                                                     outputs, output)
    significance = Significance(model, graph, method, output, outputs_mean) if propagated else None
    scores = {}
    for name, param in params.items():
        module_name, _, local = name.rpartition(".")
        value = param.detach().to("cpu", torch.float64).abs()
        rows = value.shape[0]
        n_rows = (significance.of_rows(module_name, rows) if propagated
                  else torch.ones(rows, dtype=torch.float64))
        value = value * n_rows.view(-1, *[1] * (value.dim() - 1))
        if use_input and local == "weight":  # a bias reads a constant 1
            value = value * inputs_mean[module_name].view(1, -1, *[1] * (value.dim() - 2))
        scores[name] = value
    return scores


def check_structure(model: nn.Module, params: Mapping[str, torch.Tensor], data, options: Mapping[str, Any],
                    method: str = "isparse") -> None:
    """Propagate significance on the weights alone (``data`` only gives the traced example), so that a
    residual addition or another unsupported layer on the path is refused before the lab trains anything."""
    if options.get("neuron_importance", IsparseOptions.neuron_importance) != "propagated":
        return
    graph = structure.channel_graph(model, example_input(model, data, None, method))
    significance = Significance(model, graph, method)
    for name, module in scored_layers(model, params, method).items():
        significance.of_rows(name, module.weight.shape[0])


def isparse_scores(model, params, *, data, generator, mode=None, interval=None, ramp=None, **options):
    """iSparse edge significance (module docstring; reconstructed); higher = keep. ``mode``, ``interval`` and
    ``ramp`` belong to the train-with schedule (``prunelab.schedules.Periodic``)."""
    return edge_scores(model, params, data=data, generator=generator, method="isparse", **options)


register(Method(
    "isparse", "output-informed edge significance mean|x_i| |w_ij| N_j, per layer (Garg & Candan 2020; "
    "score reconstructed)", isparse_scores, scope="layer", when="trained", options=IsparseOptions,
    schedule="periodic", retrain=False, when_from=when_from,
    layers=(nn.Linear, nn.Conv2d), check_structure=check_structure,
    paper="Garg & Candan, ICMR 2020 / OpenReview ryefmpEYPr (score reconstructed, docs/methods/isparse.md)"))
