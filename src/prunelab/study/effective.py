"""Effective sparsity (Vysogorets & Kempe, JMLR 2023): weights cut off from the input or the output count
as removed, however their masks read.

A kept weight of layer k joining input unit i to output unit o is *effective* when unit i has a live
path from the network's input (through kept weights) and unit o a live path to the network's output.
Units are neurons of a Linear layer and channels of a Conv layer (a kernel's connection between two
channels is live when any of its taps is kept); a flatten maps each input feature of a Linear layer to
the channel it came from. Biases are ignored: a unit fed by no live weight outputs a constant, which
carries no information about the input (the paper's convention).

Computed for *chains*: every Linear/Conv layer (groups = 1) reads the previous one's output through
channel-wise operations only (activations, pooling, batch norm, dropout, flatten). Anything else (a
residual addition, a concatenation, a recurrent layer, a grouped convolution) returns None and the
report says "n/a": a path count through such graphs needs the graph's algebra, not a chain's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..checkpoint import MASK_PREFIX, load_tensors
from ..data import dataset_info
from ..models import build_model, model_info

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                       nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d,
                       nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.BatchNorm1d,
                       nn.BatchNorm2d, nn.BatchNorm3d)
CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh,
                         torch.sigmoid, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                         F.adaptive_avg_pool2d)
CHANNELWISE_METHODS = ("relu", "tanh", "sigmoid", "contiguous")
FLATTENS = ("flatten", "view", "reshape")


def run_effective_sparsity(run_dir: str | Path) -> dict[str, Any] | None:
    """Effective sparsity of a finished run, from the masks in its ``model.safetensors``."""
    tensors, meta = load_tensors(Path(run_dir) / "model.safetensors")
    config = meta.get("config", {})
    model = build_model(config["model"], num_classes=dataset_info(config["dataset"]).num_classes,
                        **config.get("model_options", {}))
    masks = {k[len(MASK_PREFIX):]: v.bool() for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    return effective_sparsity(model, masks, torch.zeros(1, *model_info(config["model"]).input_shape))


def effective_sparsity(model: nn.Module, masks: Mapping[str, torch.Tensor],
                       example: torch.Tensor) -> dict[str, Any] | None:
    """``{"sparsity", "nominal", "total", "kept", "effective", "layers"}`` over the chain's weights (kept:
    by the masks; effective: also on an input-output path), or None when the model is not a chain."""
    chain = _chain(model, example)
    if chain is None:
        return None
    names = [f"{name}.weight" for name, _, _ in chain]
    if any(n.endswith(".weight") and n not in names for n in masks):
        return None  # a masked weight outside the chain (e.g. a recurrent layer)
    weights = [masks[n].bool() if n in masks else torch.ones_like(model.get_parameter(n), dtype=torch.bool)
               for n in names]
    links = [w.reshape(w.shape[0], w.shape[1], -1).any(-1) for w in weights]  # (out, in) units
    forward = []  # per layer: its input units reachable from the input
    alive = torch.ones(links[0].shape[1], dtype=torch.bool)
    for k, (_, _, factor) in enumerate(chain):
        alive = alive.repeat_interleave(factor) if k else alive
        forward.append(alive)
        alive = (links[k] & alive[None, :]).any(1)
    backward = [None] * len(chain)  # per layer: its output units that reach the output
    live = torch.ones(links[-1].shape[0], dtype=torch.bool)
    for k in range(len(chain) - 1, -1, -1):
        backward[k] = live
        reach = (links[k] & live[:, None]).any(0)
        factor = chain[k][2]
        live = reach.reshape(-1, factor).any(1) if k else reach
    layers, total, kept, effective = {}, 0, 0, 0
    for k, name in enumerate(names):
        w = weights[k]
        shape = (w.shape[0], w.shape[1]) + (1,) * (w.dim() - 2)
        useful = w & forward[k].view(1, -1, *shape[2:]) & backward[k].view(-1, 1, *shape[2:])
        layers[name] = {"total": w.numel(), "kept": int(w.sum()), "effective": int(useful.sum())}
        total, kept, effective = total + w.numel(), kept + int(w.sum()), effective + int(useful.sum())
    return {"sparsity": 1.0 - effective / total, "nominal": 1.0 - kept / total, "total": total, "kept": kept,
            "effective": effective, "layers": layers}


def _chain(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, int]] | None:
    """``[(layer name, layer, factor)]`` in forward order: factor = input features of this layer per unit
    of the previous one (a flatten's spatial size; 1 otherwise). None when the model is not a chain."""
    model = model.eval()  # batch norm of one example, and no dropout
    try:
        graph = fx.symbolic_trace(model)
        from torch.fx.passes.shape_prop import ShapeProp
        ShapeProp(graph).propagate(example)
    except Exception:  # untraceable (data-dependent control flow): not something a chain can describe
        return None
    modules = dict(graph.named_modules())
    source: dict[fx.Node, tuple[int, int]] = {}  # node -> (index of the layer it carries, -1: input; factor)
    shapes: set[fx.Node] = set()  # x.size(0) and the like: shape queries, which carry no signal
    chain: list[tuple[str, nn.Module, int]] = []
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            if source:
                return None  # a second input
            source[node] = (-1, 1)
            continue
        if node.op == "output":
            result = node.args[0]
            return chain if chain and source.get(result) == (len(chain) - 1, 1) else None
        if node.op == "call_method" and node.target == "size" or node.op == "call_function" and node.target is getattr:
            shapes.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a not in shapes]
        if len(inputs) != 1 or inputs[0] not in source:
            return None
        index, factor = source[inputs[0]]
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, LAYERS):
            if index != len(chain) - 1 or (isinstance(module, nn.Conv2d | nn.Conv1d | nn.Conv3d)
                                           and (module.groups != 1 or factor != 1)):
                return None
            if isinstance(module, nn.Linear) and len(inputs[0].meta["tensor_meta"].shape) != 2:
                return None  # a Linear over the last axis of a sequence or an image: not a unit map
            chain.append((node.target, module, factor))
            source[node] = (len(chain) - 1, 1)
        elif _channelwise(node, module):
            source[node] = (index, factor)
        elif _flatten(node, module):
            before, after = inputs[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
            if len(after) != 2 or before[0] != after[0]:
                return None
            spatial = after[1] // before[1] if len(before) > 2 and index >= 0 else 1  # the input: all alive
            source[node] = (index, factor * spatial)
        else:
            return None
    return None


def _channelwise(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNELWISE_METHODS


def _flatten(node: fx.Node, module: nn.Module | None) -> bool:
    if node.op == "call_module":
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    if node.op == "call_function":
        return node.target is torch.flatten
    return node.op == "call_method" and node.target in FLATTENS
