"""Masks on a model: attach, apply, keep through optimizer steps, read, make permanent.

One mask per prunable parameter, kept as a non-persistent buffer ``<param>_mask`` (in the parameter's
dtype, 0 or 1, so applying it needs no conversion) on the module that owns the parameter: it follows
``model.to(device)`` but never enters ``state_dict()``, so a masked model's state dict loads into an
unpruned model of the same architecture, and parameter names stay those of the unpruned model
(``fc1.weight``). ``masks(model)`` returns them as bool tensors.

Why no optimizer (momentum, weight decay, Adam moments) can revive a pruned weight:

1. when a mask is attached, the masked weights are zeroed;
2. a post-accumulate-grad hook zeroes the gradient at masked positions (in place), so an update of a
   zero weight with a zero gradient and zero optimizer state stays exactly zero for SGD (momentum,
   Nesterov, weight decay), Adam, AdamW, RMSprop and Adagrad;
3. the first ``optimizer.step()`` after a mask is attached (a step hook for every optimizer, registered
   when the first mask of the process is attached, not at import; so also for an optimizer never passed
   to ``attach``) zeroes that optimizer's state at masked positions once, so stale momentum from before
   pruning cannot leak back;
4. a forward pre-hook re-applies the mask whenever the weight was changed by anything but an optimizer
   step (a loaded state dict, a manual edit: tracked by the tensor's version counter), so the forward
   pass always sees masked weights.

Per training step this costs one in-place multiply per masked tensor (the gradient): under 10% of an
epoch even for LeNet-300-100, whose steps are tiny (measured in benchmarks/results/mask_overhead.json).
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import PrunelabError

MASK_SUFFIX = "_mask"
_CONV_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RECURRENT = (nn.RNNBase,)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def prunable_parameters(model: nn.Module, include_bias: bool = False,
                        include_norm: bool = False) -> dict[str, nn.Parameter]:
    """The parameters a method may prune, in ``named_parameters()`` order.

    By default the ``weight`` of every Linear/Conv layer and the weight matrices of recurrent layers
    (``weight_ih_l0``, ``weight_hh_l0``, ...). ``include_bias`` adds their biases (SNIP's official code,
    NNrelief, LOBSTER); ``include_norm`` adds normalisation-layer affine parameters (LOBSTER).
    """
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if _is_prunable(module, local, include_bias, include_norm):
                chosen[param_name(module_name, local)] = param
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return dict(sorted(chosen.items(), key=lambda item: order.get(item[0], len(order))))


def _is_prunable(module: nn.Module, local: str, include_bias: bool, include_norm: bool) -> bool:
    if isinstance(module, _CONV_LINEAR):
        return local == "weight" or (include_bias and local == "bias")
    if isinstance(module, _RECURRENT):
        return local.startswith("weight_") or (include_bias and local.startswith("bias_"))
    if isinstance(module, _NORMS):
        return include_norm
    return False


def require_prunable(model: nn.Module) -> None:
    """Raise a clear error for a model without any layer a pruning method could act on."""
    if not prunable_parameters(model):
        kinds = "Linear, Conv1d/2d/3d, LSTM/GRU/RNN"
        raise PrunelabError(f"model {type(model).__name__} has no prunable layers (supported: {kinds})")


def attach(model: nn.Module, masks: Mapping[str, torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Attach (or replace) masks, keyed by parameter name, and zero the masked weights now.

    A parameter that already has a mask gets the new one; parameters not named keep theirs. An
    optimizer passed here has its state at masked positions zeroed now; any other is cleaned at its
    next step.
    """
    _watch_optimizers()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise PrunelabError(f"mask for unknown parameter {name!r}; the model has: "
                                f"{', '.join(prunable_parameters(model))}")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                f"the parameter has {tuple(param.shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise PrunelabError(f"mask for {name} must be boolean or hold only 0 and 1")
        module, local = _owner(model, name)
        module.register_buffer(local + MASK_SUFFIX, mask.detach().to(param.device, param.dtype).clone(),
                               persistent=False)
        _install_hooks(module, local, param)
        param._prunelab_mask = (module, local)
        param._prunelab_generation = next(_generations)
    apply(model)
    if optimizer is not None:
        mask_optimizer_state(optimizer)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` for every masked parameter, in ``named_parameters()`` order."""
    found = {}
    for module_name, module in model.named_modules():
        for local in getattr(module, "_prunelab_masked", ()):
            found[param_name(module_name, local)] = getattr(module, local + MASK_SUFFIX).bool()
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def is_masked(model: nn.Module) -> bool:
    return any(getattr(m, "_prunelab_masked", ()) for m in model.modules())


@torch.no_grad()
def apply(model: nn.Module) -> None:
    """Zero every masked weight in place."""
    for module in model.modules():
        for local in getattr(module, "_prunelab_masked", ()):
            _apply_one(module, local)


def _masked_params(optimizer: torch.optim.Optimizer):
    """(parameter, owning module, local name) for every masked parameter the optimizer updates."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner = getattr(param, "_prunelab_mask", None)
            if owner is not None:
                yield param, *owner


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero masked weights and the optimizer's per-parameter state (momentum, Adam moments) there."""
    cleaned = optimizer.__dict__.setdefault("_prunelab_cleaned", {})
    for param, module, local in _masked_params(optimizer):
        mask = getattr(module, local + MASK_SUFFIX)
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                value.mul_(mask)
        _apply_one(module, local)
        cleaned[id(param)] = param._prunelab_generation


def _after_step(optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
    """Global step hook: clean the state of a mask this optimizer has not seen, then trust the zeros."""
    cleaned = optimizer.__dict__.get("_prunelab_cleaned", {})
    for param, module, local in _masked_params(optimizer):
        if cleaned.get(id(param)) != param._prunelab_generation:
            mask_optimizer_state(optimizer)
            return
        module._prunelab_versions[local] = param._version  # the step kept the zeros: no re-apply


_generations = itertools.count()
_step_hook = None


def _watch_optimizers() -> None:
    """Register the step hook once, when the first mask is attached: a process that never prunes is
    left exactly as it was."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_after_step)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy with its own masks and hooks (``copy.deepcopy`` drops gradient hooks)."""
    current = masks(model)
    clone = copy.deepcopy(model)
    remove(clone)
    attach(clone, current)
    return clone


def make_permanent(model: nn.Module) -> None:
    """Zero the masked weights for good and remove masks and hooks: a plain model with zeros."""
    apply(model)
    remove(model)


def remove(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Drop masks (all, or the named ones) without touching the weights: pruned weights may regrow."""
    wanted = None if names is None else set(names)
    for module_name, module in model.named_modules():
        masked = getattr(module, "_prunelab_masked", ())
        dropped = [local for local in masked if wanted is None or param_name(module_name, local) in wanted]
        for local in dropped:
            delattr(module, local + MASK_SUFFIX)
            module._prunelab_handles.pop(local).remove()
            for attribute in ("_prunelab_mask", "_prunelab_generation"):
                vars(getattr(module, local)).pop(attribute, None)
        if not masked:
            continue
        module._prunelab_masked = tuple(local for local in masked if local not in dropped)
        if not module._prunelab_masked:
            for handle in module._prunelab_handles.values():
                handle.remove()
            for attribute in ("_prunelab_masked", "_prunelab_handles", "_prunelab_versions"):
                delattr(module, attribute)


def _install_hooks(module: nn.Module, local: str, param: nn.Parameter) -> None:
    masked = getattr(module, "_prunelab_masked", ())
    if local in masked:
        return  # the hooks look the buffer up at call time, so a replaced mask needs no new hook
    if not masked:
        module._prunelab_handles = {"forward": module.register_forward_pre_hook(_forward_pre_hook)}
        module._prunelab_versions = {}
    module._prunelab_handles[local] = param.register_post_accumulate_grad_hook(_mask_gradient)
    module._prunelab_masked = masked + (local,)


def _mask_gradient(param: nn.Parameter) -> None:
    owner = getattr(param, "_prunelab_mask", None)
    if owner is not None and param.grad is not None:
        module, local = owner
        param.grad.mul_(getattr(module, local + MASK_SUFFIX))


def _forward_pre_hook(module: nn.Module, _inputs) -> None:
    versions = module._prunelab_versions
    for local in module._prunelab_masked:
        if getattr(module, local)._version != versions.get(local):
            with torch.no_grad():
                _apply_one(module, local)


def _apply_one(module: nn.Module, local: str) -> None:
    param = getattr(module, local)
    with torch.no_grad():
        param.mul_(getattr(module, local + MASK_SUFFIX))
    module._prunelab_versions[local] = param._version


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, local = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), local


def param_name(module: str, local: str) -> str:
    """The parameter name ``module.local`` (just ``local`` for the root module)."""
    return f"{module}.{local}" if module else local

