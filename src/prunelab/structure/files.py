"""Saving and loading compact models without pickle.

:func:`save_compact` writes safetensors weights and masks, plus the plan (architecture name and options,
torch-pruning's pruning history, kept indices per layer, gathered inputs) as JSON metadata;
:func:`load_compact` rebuilds the architecture with ``build_model``, replays the plan
(:func:`apply_plan`) and loads the weights.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from .. import checkpoint
from ..errors import PrunelabError
from .compaction import PLAN_FORMAT
from .graph import _dependency_graph
from .layers import _GATHERED, _gather_inputs


def save_compact(path: str | os.PathLike, small_model: nn.Module, plan: Mapping[str, Any], *,
                 name: str | None = None, options: Mapping[str, Any] | None = None) -> None:
    """Write a compact model: weights and masks (safetensors) and the plan (JSON metadata). No pickle."""
    plan = dict(plan)
    if name is not None:
        plan["model"] = name
    if options is not None:
        plan["model_options"] = dict(options)
    if plan.get("format") != PLAN_FORMAT:
        raise PrunelabError(f"not a compaction plan (format {plan.get('format')!r}, expected {PLAN_FORMAT})")
    if not plan.get("model"):
        raise PrunelabError("the plan does not name the architecture: pass name= (a build_model name) to "
                            "compact() or save_compact()")
    checkpoint.save_tensors(path, checkpoint.model_tensors(small_model), {"compact": plan})


def apply_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Replay a compaction plan's channel removals on a freshly built model (in place)."""
    example = torch.zeros(1, *plan["input_shape"], device=next(model.parameters()).device)
    dg = _dependency_graph(model, example)
    for module_name, is_out, idxs in plan["history"]:
        module = _submodule(model, module_name)
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        dg.get_pruning_group(module, fn, [int(i) for i in idxs]).prune()
    for module_name, index in (plan.get("gathered") or {}).items():
        module = _submodule(model, module_name)
        if type(module) not in _GATHERED:
            raise PrunelabError(f"plan gathers the inputs of {module_name!r}, a {type(module).__name__}")
        _gather_inputs(module, [int(i) for i in index])
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PrunelabError(f"plan names module {name!r}, which the model does not have") from None


def load_compact(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_compact`: build_model, replay the plan, load weights/masks."""
    from ..models import build_model

    tensors, meta = checkpoint.load_tensors(path)
    plan = meta.get("compact")
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise PrunelabError(f"{path} is not a compact model (no {PLAN_FORMAT} plan in its metadata)")
    if not isinstance(plan.get("model"), str) or not isinstance(plan.get("model_options") or {}, dict):
        raise PrunelabError(f"{path}: its plan names no model to rebuild (corrupt metadata)")
    kwargs = dict(plan.get("model_options") or {})
    if plan.get("num_classes") is not None:
        kwargs["num_classes"] = plan["num_classes"]
    model = build_model(plan["model"], **kwargs)
    apply_plan(model, plan)
    checkpoint.restore_model(model, tensors)
    model.eval()
    return model
