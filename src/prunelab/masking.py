"""Masks on a model: attach, apply, keep through optimizer steps, read, make permanent.

One boolean mask per prunable parameter, kept as a non-persistent buffer ``<param>_mask`` on the module
that owns the parameter, so it follows ``model.to(device)`` but never enters ``state_dict()``: a masked
model's state dict loads into an unpruned model of the same architecture, and parameter names stay those
of the unpruned model (``fc1.weight``).

A mask holds in four places, which together mean no optimizer (momentum, weight decay, Adam moments)
can revive a pruned weight, whether or not the optimizer existed when the mask was attached:

1. when attached, the weights (and the state of an optimizer passed in) at masked positions are zeroed;
2. a gradient hook zeroes the gradient at masked positions, so momentum and Adam moments stay zero there
   and weight decay acts on a weight that is already zero;
3. after every ``optimizer.step()`` of any torch optimizer, a global step hook zeroes masked weights and
   the optimizer's state there again (stale momentum from before pruning cannot leak back);
4. a forward pre-hook multiplies the weights by the mask in place, so the forward pass always sees the
   masked weights whatever code touched them since (a custom update rule, a loaded state dict).

Together the hooks cost a few element-wise products per masked tensor per step (measured in the
README: a few percent of an epoch).
"""

from __future__ import annotations

import copy
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
                chosen[_join(module_name, local)] = param
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

    A parameter that already has a mask gets the new one; parameters not named keep theirs. Pass the
    optimizer in use, if any, so its state at masked positions is zeroed too.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise PrunelabError(f"mask for unknown parameter {name!r}; the model has: "
                                f"{', '.join(prunable_parameters(model))}")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                f"the parameter has {tuple(param.shape)}")
        module, local = _owner(model, name)
        mask = mask.detach().to(device=param.device, dtype=torch.bool).clone()
        module.register_buffer(local + MASK_SUFFIX, mask, persistent=False)
        _install_hooks(module, local, param)
        param._prunelab_mask_owner = (module, local + MASK_SUFFIX)
    apply(model)
    if optimizer is not None:
        mask_optimizer_state(optimizer)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` for every masked parameter, in ``named_parameters()`` order."""
    found = {}
    for module_name, module in model.named_modules():
        for local in getattr(module, "_prunelab_masked", ()):
            found[_join(module_name, local)] = getattr(module, local + MASK_SUFFIX)
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def is_masked(model: nn.Module) -> bool:
    return any(getattr(m, "_prunelab_masked", ()) for m in model.modules())


@torch.no_grad()
def apply(model: nn.Module) -> None:
    """Zero every masked weight in place."""
    for module in model.modules():
        _apply_module(module)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero masked weights and the optimizer's per-parameter state (momentum, Adam moments) there."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner = getattr(param, "_prunelab_mask_owner", None)
            if owner is None:
                continue
            mask = getattr(*owner)
            param.mul_(mask)
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask)


def _after_step(optimizer: torch.optim.Optimizer, _args, _kwargs) -> None:
    mask_optimizer_state(optimizer)


register_optimizer_step_post_hook(_after_step)


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
        dropped = [local for local in masked if wanted is None or _join(module_name, local) in wanted]
        for local in dropped:
            delattr(module, local + MASK_SUFFIX)
            vars(getattr(module, local)).pop("_prunelab_mask_owner", None)
            module._prunelab_handles.pop(local).remove()
        module._prunelab_masked = tuple(local for local in masked if local not in dropped)
        if not module._prunelab_masked:
            for handle in getattr(module, "_prunelab_handles", {}).values():
                handle.remove()
            for attribute in ("_prunelab_masked", "_prunelab_handles"):
                if hasattr(module, attribute):
                    delattr(module, attribute)


def _install_hooks(module: nn.Module, local: str, param: nn.Parameter) -> None:
    masked = getattr(module, "_prunelab_masked", ())
    if local in masked:
        return  # the hooks look the buffer up at call time, so a replaced mask needs no new hook
    handles = getattr(module, "_prunelab_handles", None)
    if handles is None:
        handles = {"forward": module.register_forward_pre_hook(_forward_pre_hook)}
        module._prunelab_handles = handles
    buffer_name = local + MASK_SUFFIX
    handles[local] = param.register_hook(lambda grad: grad * getattr(module, buffer_name))
    module._prunelab_masked = masked + (local,)


def _forward_pre_hook(module: nn.Module, _inputs) -> None:
    with torch.no_grad():
        _apply_module(module)


def _apply_module(module: nn.Module) -> None:
    for local in getattr(module, "_prunelab_masked", ()):
        getattr(module, local).data.mul_(getattr(module, local + MASK_SUFFIX))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, local = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), local


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
