"""iSparse's competitors: Retrain-free, NISP and DropConnect as pruning methods.

See docs/methods/isparse-competitors.md.

PFEC, the fourth competitor, is ``pfec`` in ``criteria/filters.py``.

* ``retrain-free``: Ashouri, Abdelrahman & Dos Remedios, "Retraining-free methods for fast on-the-fly
  pruning of convolutional neural networks", NeurIPS-2018 CDNNRIA workshop. Only the abstract is held; the
  score is the one iSparse ascribes to it (Fig. 3: an edge's local contribution input x weight):
  ``E(i, j) = mean_x |x_i w_ij|``, per layer, applied to a trained model without retraining. For a conv,
  x_i is the mean |input| of channel i over positions and examples, as in iSparse, so this is exactly
  iSparse with ``neuron_importance="ones"``. Options ``examples`` (1000), ``batch_size`` (250).
* ``nisp``: Yu et al., "NISP: Pruning Networks using Neuron Importance Score Propagation", CVPR 2018.
  Neuron importance propagated from the output with absolute weights, ``s_k = |W_{k+1}|^T s_{k+1}``
  (conv layers as channel-to-channel matrices, flatten -> Linear summed over each channel's positions:
  the same propagation as iSparse, ``isparse.Significance``, with each layer normalised, which does not
  change a ranking). The final-response importance is 1 per output unit (``output="ones"``) or its mean
  |activation| on the data (``"activation"``), a proxy for the paper's Inf-FS feature ranking. In every
  safe layer (as ``pfec``; attention heads excepted) the round(sparsity * n) least important
  neurons/channels are removed (at least one kept),
  the output layer never; ``sparsity`` is thus a fraction of *channels*, as for ``pfec``. Masks as
  ``pfec``: the filter, its bias and BatchNorm entries, and the readers' input slices.
* ``dropconnect``: Wan et al., "Regularization of Neural Networks using DropConnect", ICML 2013, used
  as iSparse uses it: a random mask of edges, the fraction ``sparsity`` in every layer, drawn from the
  seeded generator, applied to a trained model without retraining (not the per-batch training
  regulariser).
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
from .baselines import random_scores
from .filters import channel_groups, lowest_channels
from .isparse import OUTPUTS, Significance, check_choice, edge_scores, layer_statistics, scoring_inputs
from .snip import check_positive_int


# --- Retrain-free -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetrainFreeOptions(Options):
    examples: int = option(1000, "scoring examples drawn from the data", low=1)
    batch_size: int = option(250, "examples per forward pass while scoring", low=1)


@dataclass(frozen=True)
class NispOptions(RetrainFreeOptions):
    mask_bias: bool = option(True, "also mask the removed channels' biases and BatchNorm entries")
    input_shape: Any = option(None, "one example's input shape for tracing when no data is given")
    output: str = option("ones", "final-response importance: 1 per output, or the mean softmax / |activation| "
                                 "on the data", choices=OUTPUTS)


def retrain_free_scores(model, params, *, data, generator, examples=RetrainFreeOptions.examples,
                        batch_size=RetrainFreeOptions.batch_size, **_):
    """``E(i, j) = mean_x |x_i w_ij|`` (the local contribution; iSparse Fig. 3's reading of Ashouri et al.)."""
    return edge_scores(model, params, data=data, generator=generator, method="retrain-free", use_input=True,
                       neuron_importance="ones", examples=examples, batch_size=batch_size)


# --- NISP -------------------------------------------------------------------------------------------------

def nisp_groups(model: nn.Module, graph: structure.ChannelGraph, params=None) -> list[int]:
    """The groups NISP prunes: the channel groups of ``pfec`` (shared layers and models without a prunable
    group refused in one line), attention heads excepted (NISP's propagation is over neurons)."""
    chosen = channel_groups(model, graph, params, "nisp")
    plain = [g for g in chosen if graph.groups[g].heads is None]
    if not plain:
        raise PrunelabError(f"nisp: no layer can lose channels (the prunable groups are attention heads, e.g. "
                            f"{graph.groups[chosen[0]].heads!r}, which NISP's neuron propagation does not cover)")
    return plain


def neuron_importance(model: nn.Module, graph: structure.ChannelGraph, *, data, generator: torch.Generator,
                      output: str = NispOptions.output, examples: int = NispOptions.examples,
                      batch_size: int = NispOptions.batch_size, groups=None) -> dict[int, torch.Tensor]:
    """``{group index: importance per channel}`` of every safe group, or of ``groups`` (NISP's s_k, each
    layer summing to 1)."""
    check_choice("nisp", "output", output, OUTPUTS)
    batch_size = check_positive_int("nisp", "batch_size", batch_size)
    means = {}
    if output != "ones":
        outputs = {g.layers[0].module: model.get_submodule(g.layers[0].module)
                   for g in graph.groups if g.is_output and g.layers}
        _, means = layer_statistics(model, {}, scoring_inputs(data, generator, examples, "nisp"), batch_size,
                                    outputs, output)
    significance = Significance(model, graph, "nisp", output, means)
    if groups is None:
        groups = [g for g, group in enumerate(graph.groups) if group.safe and group.heads is None]
    return {g: significance.of_group(g) for g in groups}


def nisp_masks(model: nn.Module, sparsity: float, *, example: torch.Tensor, data, generator: torch.Generator,
               alive: Mapping[str, torch.Tensor] | None = None, mask_bias: bool = True,
               params: Mapping[str, torch.Tensor] | None = None, **options) -> dict[str, torch.Tensor]:
    """Masks removing the round(sparsity * n) least important channels of every safe layer (ties: the lower
    index is kept). Channels already dead stay dead and count toward the target (as ``pfec``)."""
    sparsity = check_sparsity(sparsity)
    graph = structure.channel_graph(model, example)
    importance = neuron_importance(model, graph, data=data, generator=generator,
                                   groups=nisp_groups(model, graph, params), **options)
    removed = lowest_channels(model, graph, importance, sparsity, alive)
    return structure.channel_masks(model, graph, removed, alive=alive, mask_bias=mask_bias)


def nisp_pruner(model, params, *, sparsity, scope, alive, data, generator, mask_bias=NispOptions.mask_bias,
                input_shape=None, output=NispOptions.output, examples=NispOptions.examples,
                batch_size=NispOptions.batch_size, **_):
    if scope != "layer":
        raise PrunelabError(f"nisp removes the same fraction of neurons in every layer: scope must be 'layer', "
                            f"got {scope!r}")
    return nisp_masks(model, sparsity, example=example_input(model, data, input_shape, "nisp"), data=data,
                      generator=generator, alive=alive, mask_bias=mask_bias, params=params, output=output,
                      examples=examples, batch_size=batch_size)


def nisp_check_structure(model: nn.Module, params: Mapping[str, torch.Tensor], data,
                         options: Mapping[str, Any]) -> None:
    """NISP's propagation on the weights alone (output "ones"; ``data`` only gives the traced example):
    refuses a residual net before training."""
    graph = structure.channel_graph(model, example_input(model, data, None, "nisp"))
    neuron_importance(model, graph, data=None, generator=None, groups=nisp_groups(model, graph, params))


def nisp_scores(model, params, *, data, generator, input_shape=None, output=NispOptions.output,
                examples=NispOptions.examples, batch_size=NispOptions.batch_size, **_):
    """Each weight of a safe layer scored by the importance of the neuron/filter it belongs to (inspection)."""
    graph = structure.channel_graph(model, example_input(model, data, input_shape, "nisp"))
    importance = neuron_importance(model, graph, data=data, generator=generator, output=output,
                                   examples=examples, batch_size=batch_size, groups=nisp_groups(model, graph, params))
    scores = {}
    for g, value in importance.items():
        layer = graph.groups[g].layers[0]
        name = param_name(layer.module, "weight")
        if name in params:
            score = torch.zeros(params[name].shape, dtype=torch.float64)
            for c, ix in enumerate(layer.index):
                score[list(ix)] = value[c]
            scores[name] = score
    return {n: scores[n] for n in params if n in scores}


register(Method(
    "retrain-free", "local edge contribution mean|x_i w_ij|, per layer, no retraining (Ashouri et al. 2018, "
    "as characterised by iSparse)", retrain_free_scores, scope="layer", when="trained", retrain=False,
    options=RetrainFreeOptions, layers=(nn.Linear, nn.Conv2d),
    paper="Ashouri et al., NeurIPS-2018 CDNNRIA workshop"))
register(Method(
    "nisp", "neuron importance propagated from the output with |W|; least important neurons/channels "
    "per layer (Yu et al. 2018)", nisp_scores, scope="layer", when="trained", pruner=nisp_pruner,
    structured=True, options=NispOptions, layers=(nn.Linear, nn.Conv1d, nn.Conv2d), targets=("channels",),
    check_structure=nisp_check_structure, paper="Yu et al., CVPR 2018"))
register(Method(
    "dropconnect", "random edges, the same fraction in every layer, no retraining (Wan et al. 2013 as "
    "iSparse's competitor)", random_scores, scope="layer", when="trained", retrain=False,
    paper="Wan et al., ICML 2013"))
