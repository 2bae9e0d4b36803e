"""Saving and loading compact models without pickle.

:func:`save_compact` writes safetensors weights and masks, plus the plan (architecture name and options,
torch-pruning's pruning history, kept indices per layer, gathered inputs) as JSON metadata;
:func:`load_compact` rebuilds the architecture with ``build_model`` (a zoo name, or a user's factory
``"module.path:callable"``) or takes a fresh instance of it (``model=``), replays the plan
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
    """Write a compact model: weights and masks (safetensors) and the plan (JSON metadata). No pickle.

    ``name`` (else the plan's, from ``compact(name=...)``): what :func:`load_compact` rebuilds the model
    from, a zoo name or a factory ``"module.path:callable"``; a name that neither names is refused here.
    Without a name the file is written all the same, and ``load_compact(path, model=MyNet())`` loads it."""
    plan = dict(plan)
    if name is not None:
        plan["model"] = name
    if options is not None:
        plan["model_options"] = dict(options)
    if plan.get("format") != PLAN_FORMAT:
        raise PrunelabError(f"not a compaction plan (format {plan.get('format')!r}, expected {PLAN_FORMAT})")
    if plan.get("model") is not None:
        plan["model"] = _rebuildable(plan["model"])
    checkpoint.save_tensors(path, checkpoint.model_tensors(small_model), {"compact": plan})


def _rebuildable(name: Any) -> str:
    """A model name load_compact can rebuild from: a zoo model's canonical name, or a factory name whose
    callable imports; anything else is refused in one line."""
    from ..models.registry import canonical_name, import_factory, is_factory, list_models

    if not isinstance(name, str) or not name.strip():
        raise PrunelabError(f"the model name of a compact model must be a non-empty string, got {name!r}")
    if is_factory(name):
        import_factory(name.strip(), "model")
        return name.strip()
    zoo = {m.name for m in list_models()}
    if canonical_name(name) in zoo:
        return canonical_name(name)
    raise PrunelabError(f"cannot record model name {name!r}: load_compact could not rebuild it, as it is neither "
                        f"a zoo model ({', '.join(sorted(zoo))}) nor a factory 'module.path:callable'; give a "
                        "factory name, or save without name= and load with load_compact(path, model=...)")


def _plan_example(plan: Mapping[str, Any], device) -> Any:
    """A batch of one to trace the rebuilt model with: zeros of the recorded shape(s) and dtype(s)."""
    def zeros(shape, dtype):
        return torch.zeros(1, *shape, dtype=getattr(torch, dtype or "float32"), device=device)

    if plan.get("inputs"):
        return {k: zeros(v["shape"], v.get("dtype")) for k, v in plan["inputs"].items()}
    return zeros(plan["input_shape"], plan.get("input_dtype"))


def apply_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Replay a compaction plan's channel removals on a freshly built model (in place)."""
    from .graph import attention_modules, set_heads

    example = _plan_example(plan, next(model.parameters()).device)
    dg = _dependency_graph(model, example)
    for module_name, is_out, idxs in plan["history"]:
        module = _submodule(model, module_name)
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        dg.get_pruning_group(module, fn, [int(i) for i in idxs]).prune()
    for attention, ((query, _, _), size) in attention_modules(model).items():
        if _submodule(model, query).out_features != getattr(model.get_submodule(attention), "all_head_size", None):
            set_heads(model, attention)
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


def check_plan(plan: Mapping[str, Any], where: Any) -> None:
    """Refuse, in one line, a plan whose fields do not have the shapes :func:`apply_plan` replays."""
    def bad(problem: str) -> PrunelabError:
        return PrunelabError(f"{where}: corrupt compaction plan ({problem})")

    def shape_ok(shape) -> bool:
        return isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)

    def dtype_ok(dtype) -> bool:
        return dtype is None or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype))

    inputs = plan.get("inputs")
    if inputs is not None:
        if not isinstance(inputs, dict) or not inputs or not all(
                isinstance(v, dict) and shape_ok(v.get("shape")) and dtype_ok(v.get("dtype")) for v in inputs.values()):
            raise bad("inputs must map input names to {'shape': [int, ...], 'dtype': str}")
    else:
        shape = plan.get("input_shape")
        if not shape_ok(shape) or not shape:
            raise bad(f"input_shape must be a list of positive integers, got {shape!r}")
        if not dtype_ok(plan.get("input_dtype")):
            raise bad(f"input_dtype must name a torch dtype, got {plan.get('input_dtype')!r}")
    history = plan.get("history")
    if not isinstance(history, list):
        raise bad(f"history must be a list, got {type(history).__name__}")
    for step in history:
        if not (isinstance(step, list) and len(step) == 3 and isinstance(step[0], str) and isinstance(step[1], bool)
                and isinstance(step[2], list) and all(isinstance(i, int) for i in step[2])):
            raise bad(f"each history step is [module, is_output, [channel, ...]], got {step!r}")
    gathered = plan.get("gathered") or {}
    if not isinstance(gathered, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) for i in v) for v in gathered.values()):
        raise bad("gathered must map module names to lists of input indices")
    if plan.get("num_classes") is not None and (not isinstance(plan["num_classes"], int) or plan["num_classes"] < 1):
        raise bad(f"num_classes must be a positive integer, got {plan['num_classes']!r}")


def load_compact(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by :func:`save_compact`: the model (built by ``build_model`` from the
    recorded name, a zoo name or a factory ``"module.path:callable"``; or ``model``, a fresh instance of
    the architecture before compaction, changed in place), the plan replayed on it, weights/masks loaded."""
    from ..models import build_model

    tensors, meta = checkpoint.load_tensors(path)
    plan = meta.get("compact")
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise PrunelabError(f"{path} is not a compact model (no {PLAN_FORMAT} plan in its metadata)")
    if not isinstance(plan.get("model_options") or {}, dict) or not (
            plan.get("model") is None or isinstance(plan.get("model"), str)):
        raise PrunelabError(f"{path}: its plan's model name or options are corrupt")
    if model is None and not plan.get("model"):
        raise PrunelabError(f"{path}: its plan names no model to rebuild: pass model=, a fresh instance of the "
                            "architecture it was compacted from")
    if model is not None and not isinstance(model, nn.Module):
        raise PrunelabError(f"model must be a torch nn.Module (a fresh instance of the architecture), got "
                            f"{type(model).__name__}")
    check_plan(plan, path)
    what = type(model).__name__ if model is not None else repr(plan["model"])
    if model is None:
        kwargs = dict(plan.get("model_options") or {})
        if plan.get("num_classes") is not None:
            kwargs["num_classes"] = plan["num_classes"]
        model = build_model(plan["model"], **kwargs)
    try:
        apply_plan(model, plan)
    except (RuntimeError, IndexError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PrunelabError(f"{path}: the plan does not fit model {what}: {first}") from None
    checkpoint.restore_model(model, tensors)
    model.eval()
    return model
