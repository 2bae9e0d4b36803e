"""Masks on a model: attach, apply, keep through optimizer steps, read, make permanent.

One mask per prunable parameter, kept as a non-persistent bool buffer ``<param>_mask`` (a byte per
weight: a quarter of float32 weights' memory; dtype changes of the model leave it alone) on the module
that owns the parameter: it follows ``model.to(device)`` but never enters ``state_dict()``, so a masked
model's state dict loads into an unpruned model of the same architecture, and parameter names stay those
of the unpruned model (``fc1.weight``). ``masks(model)`` returns copies of them.

Why no optimizer (momentum, weight decay, Adam moments) can revive a pruned weight:

1. when a mask is attached, the masked weights are zeroed;
2. a post-accumulate-grad hook zeroes the gradient at masked positions (in place), so an update of a
   zero weight with a zero gradient and zero optimizer state stays exactly zero for SGD (momentum,
   Nesterov, weight decay), Adam, AdamW, RMSprop and Adagrad;
3. the first ``optimizer.step()`` after a mask is attached (a step hook for every optimizer, registered
   when the first mask of the process is attached, not at import; so also for an optimizer never passed
   to ``attach``) zeroes that optimizer's state at masked positions once, so stale momentum from before
   pruning cannot leak back;
4. a ``load_state_dict`` post-hook re-applies the mask as soon as weights are loaded (dense weights, a
   checkpoint), and a forward pre-hook (on the owning module and on the model given to ``attach``)
   re-applies it whenever the weight was changed by anything but an optimizer step (a manual edit:
   tracked by the tensor's version counter), so the forward pass always sees masked weights, also
   where a module reads another's weight (``nn.MultiheadAttention`` and its ``out_proj``, tied layers).

A tied or shared parameter has one mask, under its first name. Masks survive ``model.to()`` (device and
dtype), ``copy.deepcopy`` and ``load_state_dict(..., assign=True)``: the hooks live in the modules' hook
tables and are re-linked to new parameter objects on the next forward pass or load.

Per training step this costs one in-place multiply per masked tensor (the gradient): under 10% of an
epoch even for LeNet-300-100, whose steps are tiny (measured in benchmarks/results/mask_overhead.json).
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import PrunelabError

MASK_SUFFIX = "_mask"
_RECURRENT = (nn.RNNBase,)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
KINDS = ("Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, MultiheadAttention (in_proj_weight, q/k/v_proj_weight, "
         "out_proj), Hugging Face Conv1D, LSTM/GRU/RNN; Embedding when included")
Selector = "str | type | Iterable[str | type] | None"


def prunable_parameters(model: nn.Module, include_bias: bool = False, include_norm: bool = False, *,
                        include: Selector = None, exclude: Selector = None) -> dict[str, nn.Parameter]:
    """The parameters a method may prune, ``{first name: parameter}`` in ``named_parameters()`` order.

    By default the weights of every Linear, Conv (1d/2d/3d, transposed), Hugging Face ``Conv1D`` and
    ``nn.MultiheadAttention`` (packed ``in_proj_weight`` or ``q/k/v_proj_weight``, and ``out_proj``), and
    the weight matrices of recurrent layers (``weight_ih_l0``, ...). ``include_bias`` adds their biases
    (SNIP's official code, NNrelief, LOBSTER); ``include_norm`` adds normalisation-layer affine parameters
    (LOBSTER).

    Parameters are found by tensor, not by module path: a tied or shared parameter appears once, under
    its first name (:func:`aliases` gives the others), and is eligible only when it is eligible under
    every module that holds it (an output layer tied to an embedding is an embedding).

    The policy (``include`` / ``exclude``: a module type, or a string, or a list of them): a string matches
    a parameter when it is a glob pattern of the parameter's name or of its module's name
    (``"classifier"``, ``"*.attention.*"``) or the class name of a module holding it (``"Embedding"``).
    ``include`` opts in parameters that are not prunable by default: embeddings (``include=nn.Embedding``:
    an embedding's rows are token vectors, not connections, so pruning them is a choice), or any
    parameter named. ``exclude`` opts out (``exclude="classifier"`` keeps the output layer dense).
    """
    include, exclude = _selectors(include), _selectors(exclude)
    held_by = holders(model)
    chosen: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        owners = held_by[id(param)]
        default = all(_is_prunable(module, local, include_bias, include_norm) for _, module, local in owners)
        if (default or _matches(include, owners)) and not _matches(exclude, owners):
            chosen[name] = param
    return chosen


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{first name: [other names]}`` for every parameter the model holds under more than one name (tied
    weights, a module registered twice)."""
    found = {}
    for held in holders(model).values():
        names = list(dict.fromkeys(name for name, _, _ in held))
        if len(names) > 1:
            found[names[0]] = names[1:]
    return found


def canonical_name(model: nn.Module, name: str) -> str:
    """The first name of the parameter called ``name`` (itself unless it is an alias)."""
    for first, others in aliases(model).items():
        if name in others:
            return first
    return name


def holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each parameter (by id): every (name, module, local name) that holds it."""
    found: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, param in module.named_parameters(recurse=False):
            found.setdefault(id(param), []).append((param_name(module_name, local), module, local))
    return found


def _is_prunable(module: nn.Module, local: str, include_bias: bool, include_norm: bool) -> bool:
    if isinstance(module, (nn.Linear, _ConvNd)) or _is_hf_conv1d(module):
        return local == "weight" or (include_bias and local == "bias")
    if isinstance(module, nn.MultiheadAttention):
        return local in _ATTENTION_WEIGHTS or (include_bias and local == "in_proj_bias")
    if isinstance(module, _RECURRENT):
        return local.startswith("weight_") or (include_bias and local.startswith("bias_"))
    if isinstance(module, _NORMS):
        return include_norm
    return False


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear with its weight stored (in, out); matched by name so
    that transformers is never imported here."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _selectors(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    items = tuple(value)
    for item in items:
        if not isinstance(item, (str, type)):
            raise PrunelabError(f"include/exclude take module types or name patterns, got {item!r}")
    return items


def _matches(selectors: tuple, owners: list[tuple[str, nn.Module, str]]) -> bool:
    for selector in selectors:
        for name, module, _ in owners:
            if isinstance(selector, type):
                if isinstance(module, selector):
                    return True
            elif (fnmatch.fnmatchcase(name, selector) or fnmatch.fnmatchcase(name.rpartition(".")[0], selector)
                  or type(module).__name__ == selector):
                return True
    return False


def require_prunable(model: nn.Module, params: Mapping[str, nn.Parameter] | None = None) -> None:
    """Raise a clear error for a model without any layer a pruning method could act on."""
    if not (prunable_parameters(model) if params is None else params):
        raise PrunelabError(f"model {type(model).__name__} has no prunable parameters (prunable: {KINDS}; "
                            "see include=/exclude=)")


def attach(model: nn.Module, masks: Mapping[str, torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Attach (or replace) masks, keyed by parameter name, and zero the masked weights now.

    A parameter that already has a mask gets the new one; parameters not named keep theirs. A tied
    parameter may be named by any of its names; its one mask is kept under its first name. An
    optimizer passed here has its state at masked positions zeroed now; any other is cleaned at its
    next step.
    """
    _watch_optimizers()
    params = dict(model.named_parameters())
    resolved: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        first = name if name in params else canonical_name(model, name)
        if first not in params:
            raise PrunelabError(f"mask for unknown parameter {name!r}; the model's prunable parameters: "
                                f"{', '.join(prunable_parameters(model)) or 'none'}")
        if first in resolved and first != name:
            raise PrunelabError(f"two masks for one tied parameter: {name!r} is {first!r}")
        resolved[first] = mask
    for name, mask in resolved.items():
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise PrunelabError(f"mask for {name} has shape {tuple(mask.shape)}, "
                                f"the parameter has {tuple(param.shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise PrunelabError(f"mask for {name} must be boolean or hold only 0 and 1")
        module, local = _owner(model, name)
        module.register_buffer(local + MASK_SUFFIX, mask.detach().to(param.device, torch.bool).clone(),
                               persistent=False)
        _install_hooks(module, local)
        _link(module, local)
    _add_hook(model, "_forward_pre_hooks", _root_pre_hook, model.register_forward_pre_hook)
    apply(model)
    if optimizer is not None:
        mask_optimizer_state(optimizer)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` for every masked parameter, in ``named_parameters()`` order."""
    found = {}
    for module_name, module in model.named_modules():
        for local in getattr(module, "_prunelab_masked", ()):
            found[param_name(module_name, local)] = getattr(module, local + MASK_SUFFIX).clone()
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
        mask = _factor(module, local)
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape and value.is_floating_point():
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
    """A deep copy with its own masks and hooks (``copy.deepcopy(model)`` gives the same: the hooks are
    re-linked at the copy's first forward pass or state-dict load)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        for local in getattr(module, "_prunelab_masked", ()):
            _link(module, local)
    return clone


def make_permanent(model: nn.Module) -> None:
    """Zero the masked weights for good and remove masks and hooks: a plain model with zeros."""
    apply(model)
    remove(model)


def remove(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Drop masks (all, or the named ones) without touching the weights: pruned weights may regrow."""
    wanted = None if names is None else {canonical_name(model, n) for n in names}
    for module_name, module in model.named_modules():
        masked = getattr(module, "_prunelab_masked", ())
        dropped = [local for local in masked if wanted is None or param_name(module_name, local) in wanted]
        for local in dropped:
            delattr(module, local + MASK_SUFFIX)
            _unlink(getattr(module, local))
        if not masked:
            continue
        module._prunelab_masked = tuple(local for local in masked if local not in dropped)
        if not module._prunelab_masked:
            _drop_hook(module, "_forward_pre_hooks", _forward_pre_hook)
            _drop_hook(module, "_load_state_dict_post_hooks", _load_post_hook)
            for attribute in ("_prunelab_masked", "_prunelab_versions"):
                delattr(module, attribute)
    if not is_masked(model):
        _drop_hook(model, "_forward_pre_hooks", _root_pre_hook)


# --- hooks -----------------------------------------------------------------------------------------------
# Module hooks are found by their function, not kept as handles: a handle would not survive
# ``copy.deepcopy``, while the hook dicts, buffers and ``_prunelab_*`` attributes are copied with the module.
# Parameters are new objects in a copy (and after ``load_state_dict(assign=True)``): their link (the
# gradient hook and ``_prunelab_mask``) is re-made by :func:`_refresh` when the link is missing.

def _install_hooks(module: nn.Module, local: str) -> None:
    masked = getattr(module, "_prunelab_masked", ())
    if local in masked:
        return  # the hooks look the buffer up at call time, so a replaced mask needs no new hook
    if not masked:
        module._prunelab_versions = {}
        _add_hook(module, "_forward_pre_hooks", _forward_pre_hook, module.register_forward_pre_hook)
        _add_hook(module, "_load_state_dict_post_hooks", _load_post_hook,
                  module.register_load_state_dict_post_hook)
    module._prunelab_masked = masked + (local,)


def _add_hook(module: nn.Module, table: str, hook, register) -> None:
    if hook not in getattr(module, table).values():
        register(hook)


def _drop_hook(module: nn.Module, table: str, hook) -> None:
    hooks = getattr(module, table)
    for key in [k for k, v in hooks.items() if v is hook]:
        del hooks[key]


def _link(module: nn.Module, local: str) -> None:
    """Tie a parameter to its mask: the gradient hook, and what the optimizer hook reads."""
    param = getattr(module, local)
    if _linked(module, param):
        param._prunelab_generation = next(_generations)  # a replaced mask: optimizers clean again
        return
    param._prunelab_mask = (module, local)
    param._prunelab_generation = next(_generations)
    param._prunelab_grad_hook = param.register_post_accumulate_grad_hook(_mask_gradient)


def _linked(module: nn.Module, param: nn.Parameter) -> bool:
    """Whether ``param`` is tied to ``module``'s mask with its gradient hook in place (a pickled model
    keeps the attributes but not the tensor's hooks)."""
    owner = getattr(param, "_prunelab_mask", None)
    hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
    return owner is not None and owner[0] is module and any(h is _mask_gradient for h in hooks.values())


def _unlink(param: nn.Parameter) -> None:
    handle = vars(param).pop("_prunelab_grad_hook", None)
    if handle is not None:
        handle.remove()
    for attribute in ("_prunelab_mask", "_prunelab_generation"):
        vars(param).pop(attribute, None)


def _refresh(module: nn.Module) -> None:
    """Re-link parameters that lost their link and re-apply masks to weights changed outside a step."""
    versions = module._prunelab_versions
    for local in module._prunelab_masked:
        param = getattr(module, local)
        if not _linked(module, param):
            _link(module, local)
        if param._version != versions.get(local):
            _apply_one(module, local)


def _mask_gradient(param: nn.Parameter) -> None:
    owner = getattr(param, "_prunelab_mask", None)
    if owner is not None and param.grad is not None:
        module, local = owner
        param.grad.mul_(_factor(module, local))


def _forward_pre_hook(module: nn.Module, _inputs) -> None:
    _refresh(module)


def _root_pre_hook(model: nn.Module, _inputs) -> None:
    """On the model given to ``attach``: a masked weight read by another module (``out_proj`` inside
    ``nn.MultiheadAttention``, a tied output layer) is masked before anything reads it."""
    for module in model.modules():
        if getattr(module, "_prunelab_masked", None):
            _refresh(module)


def _load_post_hook(module: nn.Module, _incompatible) -> None:
    """A loaded state dict (dense weights, say) is masked at once, not at the next forward pass."""
    _refresh(module)


def _apply_one(module: nn.Module, local: str) -> None:
    param = getattr(module, local)
    with torch.no_grad():
        param.mul_(_factor(module, local))
    module._prunelab_versions[local] = param._version


def _factor(module: nn.Module, local: str) -> torch.Tensor:
    """The bool mask as 0/1 bytes: multiplying by uint8 is 3-4x faster than by bool (measured on CPU) and
    needs no copy."""
    return getattr(module, local + MASK_SUFFIX).view(torch.uint8)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, local = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), local


def param_name(module: str, local: str) -> str:
    """The parameter name ``module.local`` (just ``local`` for the root module)."""
    return f"{module}.{local}" if module else local
