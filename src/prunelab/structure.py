"""Channels: which output channels are coupled, channel masks, and physical channel removal.

Structured methods (PFP, PFEC, SoftNet, NNrelief neuron removal) are simulated with masks, as every
method in prunelab is (methods.md section 0): a removed channel has its producing weight rows (filters
or neurons), bias entries and BatchNorm gamma/beta masked, and the matching input slices of the layers
that read it. :func:`compact` then turns such a masked model into a physically smaller dense model
that computes the same function, so that the speed-up can be measured.

Coupling comes from torch-pruning's ``DependencyGraph`` (a traced graph of which layers must lose a
channel together: residual adds, flatten -> Linear, BatchNorm after a conv). :func:`channel_graph`
turns it into plain data, keyed by the module names of ``model.named_modules()``:

* a :class:`ChannelGroup` is one set of coupled channels, named by its root layer (the first Conv2d or
  Linear that produces it). Its ``producers`` write the channel (weight rows of Conv2d/Linear,
  BatchNorm entries, the zero-padding shortcut of option-A ResNets), its ``consumers`` read it (input
  slices of Conv2d/Linear, the shortcut's input). ``index[r]`` lists, for channel ``r`` of the group,
  the positions along that module's channel dimension (a Linear after a flatten reads one conv
  channel as H*W features).
* a group is *safe* when exactly one Conv2d/Linear produces it (plus BatchNorm) and only Conv2d/Linear
  layers read it: removing a channel then touches one filter and its readers, with no residual add.
  PFEC/SoftNet prune only safe groups (PFEC's "first conv of each residual block").
* a group without consumers is the network output: never removed.

:func:`compact` removes a channel only when that is exact for the masked model: either every layer
that reads it has a zero input slice (its value does not matter), or every layer that writes it has a
zero weight row, so the channel carries a constant (act(bias), or the BatchNorm shift
act(beta - gamma * mean / sqrt(var + eps)) with the running statistics in eval mode, carried through
residual adds) that can be folded exactly into the bias of each reader: a Linear, or a conv without
padding (with zero padding the constant's contribution is not uniform at the borders). A constant
channel that cannot be folded (a padded conv reading it, a reader without bias, a shortcut) is kept and
reported. A layer can also have zero input slices for channels it cannot drop because another layer
still reads them (PFP masks the residual-stream inputs of each block's first conv): such a Conv2d or
Linear becomes a :class:`GatheredConv2d` / :class:`GatheredLinear`, which keeps only the columns it uses
and selects those input channels before its product (``gather_inputs``; network slimming's "channel
selection" layer), so every masked channel slice leaves the computation. The result is checked against
the masked model on a probe batch.

A compact model is saved without pickle (:func:`save_compact`): safetensors weights and masks, plus the
plan (architecture name and options, torch-pruning's pruning history, kept indices per layer) as JSON
metadata; :func:`load_compact` rebuilds the architecture with ``build_model``, replays the plan and
loads the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from . import checkpoint, masking, metrics
from .errors import PrunelabError
from .hooks import run_with_hooks

PLAN_FORMAT = "prunelab.compact/1"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- the channel graph --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slice:
    """One module's share of a channel group: ``index[r]`` = its positions for group channel ``r``.

    ``kind``: "conv" (Conv2d, groups=1), "linear", "norm" (BatchNorm), "shortcut" (option-A zero-pad
    shortcut) or "other" (anything else that carries parameters or channel maps; blocks removal).
    """

    module: str
    kind: str
    index: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    root: str                      # the Conv2d/Linear whose output channels define the group
    size: int                      # number of channels
    producers: tuple[Slice, ...]   # output dims (weight rows, bias, BatchNorm entries, shortcut outputs)
    consumers: tuple[Slice, ...]   # input dims (weight columns / input-channel slices, shortcut inputs)

    @property
    def is_output(self) -> bool:
        """No layer reads this group: it is (part of) the network output and is never removed."""
        return not self.consumers

    @property
    def layers(self) -> list[Slice]:
        """The Conv2d/Linear producers (weight rows)."""
        return [s for s in self.producers if s.kind in ("conv", "linear")]

    @property
    def safe(self) -> bool:
        """One Conv2d/Linear (plus BatchNorm) writes the channels and only Conv2d/Linear layers read them."""
        return (not self.is_output and len(self.layers) == 1
                and all(s.kind in ("conv", "linear", "norm") for s in self.producers)
                and all(s.kind in ("conv", "linear") for s in self.consumers))

    @property
    def has_other(self) -> bool:
        return any(s.kind == "other" for s in self.producers + self.consumers)


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    _dg: Any = field(default=None, repr=False)       # the torch-pruning DependencyGraph (for compact)
    _model: Any = field(default=None, repr=False)

    def producing(self, module: str) -> tuple[int, Slice] | None:
        """(group index, slice) of the group whose channels ``module`` writes."""
        for g, group in enumerate(self.groups):
            for s in group.producers:
                if s.module == module:
                    return g, s
        return None

    def consuming(self, module: str) -> tuple[int, Slice] | None:
        """(group index, slice) of the group whose channels ``module`` reads (None: the model input)."""
        for g, group in enumerate(self.groups):
            for s in group.consumers:
                if s.module == module:
                    return g, s
        return None


def _kind(module: nn.Module) -> str | None:
    from .models.resnet_cifar import PadShortcut

    if isinstance(module, nn.Conv2d):
        return "conv" if module.groups == 1 else "other"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, PadShortcut):
        return "shortcut"
    if any(True for _ in module.parameters(recurse=False)):
        return "other"
    return None  # parameter-free (activation, pooling): carries channels unchanged


def _pruners() -> dict:
    from .models import torch_pruning_pruners
    return torch_pruning_pruners()


def _dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                       customized_pruners=_pruners(), verbose=False)
    except Exception as error:  # tracing failures come in every type; name the model and the cause
        raise PrunelabError(f"cannot trace {type(model).__name__} for channel coupling "
                            f"(torch-pruning): {type(error).__name__}: {error}") from None
    finally:
        for module, mode in modes.items():  # tracing switches to eval() and does not switch back
            module.train(mode)
    return dg


def channel_graph(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """The coupled output-channel groups of ``model`` (traced on ``example_input``; model unchanged)."""
    if not torch.is_tensor(example_input) or example_input.dim() < 2:
        raise PrunelabError("example_input must be a batch tensor (N, ...) that the model accepts")
    device = next(model.parameters()).device
    dg = _dependency_graph(model, example_input[:1].to(device))
    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    roots = (nn.Conv2d, nn.Linear)
    for group in dg.get_all_groups(root_module_types=roots):
        root_module = group[0].dep.target.module
        size = len(group[0].idxs)
        producers: dict[str, tuple[str, list[list[int]]]] = {}
        consumers: dict[str, tuple[str, list[list[int]]]] = {}
        for item in group:
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            name = names.get(id(module))
            if name is None:
                continue  # torch-pruning's pseudo nodes (elementwise, reshape, slice)
            kind = _kind(module)
            if kind is None:
                continue
            roots_of = item.root_idxs
            out = dg.is_out_channel_pruning_fn(dep.handler)
            if kind == "norm":
                out = True  # BatchNorm prunes its in and out channels with one function
            side = producers if out else consumers
            entry = side.setdefault(name, (kind, [[] for _ in range(size)]))
            for idx, root in zip(idxs, roots_of):
                if int(idx) not in entry[1][int(root)]:
                    entry[1][int(root)].append(int(idx))
        def freeze(side):
            return tuple(Slice(n, k, tuple(tuple(sorted(ix)) for ix in index)) for n, (k, index) in side.items())
        groups.append(ChannelGroup(names[id(root_module)], size, freeze(producers), freeze(consumers)))
    return ChannelGraph(groups, dg, model)


# --- channel masks --------------------------------------------------------------------------------------

def _param(model: nn.Module, module: str, local: str):
    owner = model.get_submodule(module) if module else model
    return getattr(owner, local, None)


def _join(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local


def channel_masks(model: nn.Module, graph: ChannelGraph, removed: Mapping[int, Iterable[int]],
                  alive: Mapping[str, torch.Tensor] | None = None, mask_bias: bool = True,
                  consumers: bool = True) -> dict[str, torch.Tensor]:
    """Masks that remove channels: ``removed`` maps a group index to the channels taken out.

    For each removed channel: the producing weight rows, and (``mask_bias``) the bias entries and the
    BatchNorm weight/bias, and (``consumers``) the input slices of every Conv2d/Linear reading it.
    Masks start from ``alive`` (pruned entries stay pruned). Only parameters touched are returned.
    """
    masks: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())

    def mask_of(name: str) -> torch.Tensor:
        if name not in masks:
            base = alive.get(name) if alive is not None else None
            masks[name] = (base.detach().to("cpu", torch.bool).clone() if base is not None
                           else torch.ones(params[name].shape, dtype=torch.bool))
        return masks[name]

    for g, channels in removed.items():
        channels = sorted(set(int(c) for c in channels))
        if not channels:
            continue
        group = graph.groups[g]
        for s in group.producers:
            if s.kind not in ("conv", "linear", "norm"):
                continue
            idx = [i for c in channels for i in s.index[c]]
            locals_ = ("weight", "bias") if (s.kind == "norm" or mask_bias) else ("weight",)
            if s.kind != "norm" or mask_bias:
                for local in locals_:
                    name = _join(s.module, local)
                    if name in params:
                        mask_of(name)[idx] = False
        if consumers:
            for s in group.consumers:
                if s.kind not in ("conv", "linear"):
                    continue
                idx = [i for c in channels for i in s.index[c]]
                name = _join(s.module, "weight")
                mask_of(name)[:, idx] = False
    return masks


# --- layers that read a subset of their input channels ------------------------------------------------

def _select_channels(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    picked = x.index_select(dim, index)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        picked = picked.contiguous(memory_format=torch.channels_last)  # keep the fast layout
    return picked


class GatheredConv2d(nn.Conv2d):
    """A Conv2d over the input channels ``input_index`` only (made by :func:`compact`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_select_channels(x, self.input_index, 1))


class GatheredLinear(nn.Linear):
    """A Linear over the input features ``input_index`` only (made by :func:`compact`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_select_channels(x, self.input_index, -1))


_GATHERED = {nn.Conv2d: GatheredConv2d, nn.Linear: GatheredLinear}


def _used_inputs(module: nn.Module) -> list[int] | None:
    """Input channels a plain Conv2d/Linear reads through a non-zero weight, None when it reads all (or none)."""
    if type(module) not in _GATHERED or (isinstance(module, nn.Conv2d) and module.groups != 1):
        return None
    w = module.weight.detach()
    used = (w != 0).transpose(0, 1).reshape(w.shape[1], -1).any(dim=1)
    if bool(used.all()) or not bool(used.any()):
        return None
    return torch.nonzero(used).squeeze(1).tolist()


@torch.no_grad()
def _gather_inputs(module: nn.Module, index: list[int]) -> None:
    """Turn ``module`` (in place) into its Gathered class reading only input channels ``index``."""
    weight = module.weight
    keep = torch.as_tensor(index, dtype=torch.long, device=weight.device)
    module.weight = nn.Parameter(weight[:, keep].clone(), requires_grad=weight.requires_grad)
    module.register_buffer("input_index", keep)
    if isinstance(module, nn.Conv2d):
        module.in_channels = len(index)
    else:
        module.in_features = len(index)
    module.__class__ = _GATHERED[type(module)]


# --- compaction -----------------------------------------------------------------------------------------

@dataclass
class CompactReport:
    """What :func:`compact` did: channels removed per group, constant channels kept, the check."""

    max_abs_diff: float
    tolerance: float
    output_scale: float  # max |output| of the masked model on the probes: the check allows tolerance x max(1, it)
    params_before: int
    params_after: int
    groups: list[dict[str, Any]]
    kept_constant: list[dict[str, Any]]
    plan: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _all_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all())


def _shortcut_dst(module, i: int):
    dst = module.dst
    return (module.pad_front + i) if dst is None else dst[i]


def _capture_inputs(model: nn.Module, modules: Iterable[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in set(modules):
        def hook(_module, inputs, name=name):
            seen.setdefault(name, inputs[0].detach())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    run_with_hooks(model, example, hooks, eval_mode=False)
    return seen


def _constant(x: torch.Tensor, idx: list[int]) -> float | None:
    """The value of input features/channels ``idx`` if it is one constant over batch and positions."""
    values = x[:, idx]
    lo, hi = float(values.min()), float(values.max())
    scale = max(1.0, abs(lo), abs(hi))
    if hi - lo > 1e-6 * scale:
        return None
    return float(values.double().mean())


def _padded(module: nn.Module) -> bool:
    pad = module.padding
    if isinstance(pad, str):
        return pad != "valid"
    return any(int(p) != 0 for p in pad)


def _foldable(module: nn.Module, kind: str, idx: list[int], value: float) -> tuple[bool, str]:
    """Whether a constant input ``value`` on features ``idx`` can be folded exactly into the bias."""
    if value == 0.0 or _all_zero(module.weight[:, idx]):
        return True, ""
    if kind == "conv" and _padded(module):
        return False, "reader is a zero-padded conv (the constant is not uniform at the borders)"
    if module.bias is None:
        return False, "reader has no bias to absorb the constant"
    return True, ""


@torch.no_grad()
def _fold(module: nn.Module, kind: str, idx: list[int], value: float) -> None:
    if value == 0.0 or _all_zero(module.weight[:, idx]):
        return
    w = module.weight[:, idx].double()
    contribution = w.sum(dim=tuple(range(1, w.dim()))) * value
    module.bias.add_(contribution.to(module.bias.dtype))


def compact(model: nn.Module, example_input: torch.Tensor, tolerance: float = 1e-5, *,
            name: str | None = None, options: Mapping[str, Any] | None = None,
            seed: int = 0, gather_inputs: bool = True) -> tuple[nn.Module, CompactReport]:
    """A physically smaller copy of a channel-masked model that computes the same outputs.

    ``example_input``: a batch the model accepts (traced, and used as the probe for the equivalence
    check together with a seeded standard-normal batch of the same shape). ``name``/``options``: the
    ``build_model`` name and keyword options of the architecture, recorded in the plan so that
    :func:`load_compact` can rebuild it. ``gather_inputs``: layers left with zero input slices read only
    their used channels (see the module docstring). The input model is not modified. Masks of surviving
    weights are carried over (re-indexed). Raises PrunelabError if the outputs differ by more than
    ``tolerance * max(1, max |output|)``: removing zero terms changes the order of floating-point sums, so
    the exact difference grows with the size of the outputs (trained logits of 10-30 give a few 1e-6).
    """
    if not torch.is_tensor(example_input) or example_input.dim() < 2:
        raise PrunelabError("example_input must be a batch tensor (N, ...) that the model accepts")
    if any(isinstance(m, tuple(_GATHERED.values())) for m in model.modules()):
        raise PrunelabError("this model is already compact (it has gathered layers); compact the masked model")
    old_masks = masking.masks(model)
    reference = masking.copy_model(model).eval()
    small = masking.copy_model(model)
    masking.make_permanent(small)  # the masked weights are exact zeros from here on
    small.eval()
    device = next(small.parameters()).device
    example = example_input.to(device)
    graph = channel_graph(small, example)
    groups = graph.groups
    modules = dict(small.named_modules())

    readers = [s.module for g in groups for s in g.consumers if s.kind in ("conv", "linear", "shortcut")]
    inputs = _capture_inputs(small, readers, example[:2])

    # shortcut links: (module, input channel) -> (group, channel) it reads; output position -> (group, channel)
    source_of: dict[tuple[str, int], tuple[int, int]] = {}
    target_of: dict[tuple[str, int], tuple[int, int]] = {}
    for g, group in enumerate(groups):
        for s in group.consumers:
            if s.kind == "shortcut":
                for r, ix in enumerate(s.index):
                    for i in ix:
                        source_of[(s.module, i)] = (g, r)
        for s in group.producers:
            if s.kind == "shortcut":
                for r, ix in enumerate(s.index):
                    for t in ix:
                        target_of[(s.module, t)] = (g, r)

    # value-dead: every weight row that writes the channel is zero -> a data-independent constant
    constant = [[False] * g.size for g in groups]
    for _ in range(len(groups) + 1):
        changed = False
        for g, group in enumerate(groups):
            if group.has_other:
                continue
            for r in range(group.size):
                if constant[g][r]:
                    continue
                ok = True
                for s in group.producers:
                    if s.kind in ("conv", "linear"):
                        ok = _all_zero(modules[s.module].weight[list(s.index[r])])
                    elif s.kind == "shortcut":
                        sc = modules[s.module]
                        srcs = [i for i in range(sc.in_channels) if _shortcut_dst(sc, i) in s.index[r]]
                        ok = all(constant[source_of[(s.module, i)][0]][source_of[(s.module, i)][1]]
                                 for i in srcs if (s.module, i) in source_of)
                    if not ok:
                        break
                if ok:
                    constant[g][r] = changed = True
        if not changed:
            break

    pinned: set[tuple[int, int]] = set()
    kept_constant: list[dict[str, Any]] = []
    while True:
        removed = [[False] * g.size for g in groups]
        reasons: dict[tuple[int, int], str] = {}
        for _ in range(len(groups) + 1):
            changed = False
            for g, group in enumerate(groups):
                if group.is_output or group.has_other:
                    continue
                for r in range(group.size):
                    if removed[g][r] or (g, r) in pinned:
                        continue
                    unread, folds = True, True
                    for s in group.consumers:
                        idx = list(s.index[r])
                        if s.kind in ("conv", "linear"):
                            module = modules[s.module]
                            if not _all_zero(module.weight[:, idx]):
                                unread = False
                                if not constant[g][r]:
                                    folds = False
                                    continue
                                value = _constant(inputs[s.module], idx) if s.module in inputs else None
                                if value is None:
                                    folds = False
                                    reasons[(g, r)] = f"{s.module}: input not constant on the probe"
                                    continue
                                ok, why = _foldable(module, s.kind, idx, value)
                                if not ok:
                                    folds = False
                                    reasons[(g, r)] = f"{s.module}: {why} (constant {value:.6g})"
                        else:  # shortcut: removing the input zeroes the output position it feeds
                            sc = modules[s.module]
                            targets = [target_of.get((s.module, _shortcut_dst(sc, i))) for i in idx]
                            if all(t is not None and removed[t[0]][t[1]] for t in targets):
                                continue
                            unread = False
                            value = _constant(inputs[s.module], idx) if (constant[g][r] and s.module in inputs) else None
                            if value != 0.0:
                                folds = False
                                if constant[g][r]:
                                    reasons[(g, r)] = f"{s.module}: shortcut carries the constant {value}"
                    if unread or (constant[g][r] and folds):
                        removed[g][r] = changed = True
            if not changed:
                break
        collapsed = [g for g, group in enumerate(groups) if group.size and all(removed[g])]
        if not collapsed:
            break
        for g in collapsed:  # keep one channel: a layer of width 0 cannot be built
            pinned.add((g, 0))

    for g, group in enumerate(groups):
        for r in range(group.size):
            if constant[g][r] and not removed[g][r] and not group.is_output:
                kept_constant.append({"group": group.root, "channel": r,
                                      "reason": reasons.get((g, r), "kept to avoid removing every channel"
                                                            if (g, r) in pinned else "not removable")})

    # fold the constants of removed constant channels into the readers' biases
    for g, group in enumerate(groups):
        for r in range(group.size):
            if not (removed[g][r] and constant[g][r]):
                continue
            for s in group.consumers:
                if s.kind in ("conv", "linear") and s.module in inputs:
                    idx = list(s.index[r])
                    module = modules[s.module]
                    if _all_zero(module.weight[:, idx]):
                        continue
                    _fold(module, s.kind, idx, _constant(inputs[s.module], idx))

    # removed indices per module and dimension, then the surgery
    removed_out: dict[str, set[int]] = {}
    removed_in: dict[str, set[int]] = {}
    for g, group in enumerate(groups):
        channels = [r for r in range(group.size) if removed[g][r]]
        for s in group.producers:
            removed_out.setdefault(s.module, set()).update(i for r in channels for i in s.index[r])
        for s in group.consumers:
            removed_in.setdefault(s.module, set()).update(i for r in channels for i in s.index[r])
    shapes_before = {n: tuple(p.shape) for n, p in small.named_parameters()}
    dg = graph._dg
    summary = []
    for g, group in enumerate(groups):
        channels = [r for r in range(group.size) if removed[g][r]]
        summary.append({"root": group.root, "channels": group.size, "removed": len(channels),
                        "safe": group.safe, "output": group.is_output})
        if not channels:
            continue
        root = modules[group.root]
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, channels).prune()
    history = [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in dg.pruning_history()]

    new_masks = {}
    for pname, mask in old_masks.items():
        module_name, _, local = pname.rpartition(".")
        kept = mask
        out_drop = removed_out.get(module_name, set())
        in_drop = removed_in.get(module_name, set())
        if out_drop:
            kept = kept[[i for i in range(kept.shape[0]) if i not in out_drop]]
        if in_drop and kept.dim() >= 2 and local == "weight":
            kept = kept[:, [i for i in range(kept.shape[1]) if i not in in_drop]]
        new_masks[pname] = kept
    gathered: dict[str, list[int]] = {}
    if gather_inputs:
        for module_name, module in small.named_modules():
            index = _used_inputs(module)
            if index is None:
                continue
            _gather_inputs(module, index)
            gathered[module_name] = index
            key = _join(module_name, "weight")
            if key in new_masks:
                new_masks[key] = new_masks[key][:, index]
    params_after = dict(small.named_parameters())
    for pname, mask in new_masks.items():
        if tuple(mask.shape) != tuple(params_after[pname].shape):
            raise PrunelabError(f"internal error: mask of {pname} re-indexed to {tuple(mask.shape)}, "
                                f"the compact parameter is {tuple(params_after[pname].shape)}")
    if new_masks:
        masking.attach(small, new_masks)
    kept_index = {}
    for module_name in sorted(set(removed_out) | set(removed_in)):
        before = shapes_before.get(_join(module_name, "weight"))
        if before is None:
            continue
        entry = {}
        if removed_out.get(module_name):
            entry["out"] = [i for i in range(before[0]) if i not in removed_out[module_name]]
        if len(before) >= 2 and removed_in.get(module_name):
            entry["in"] = [i for i in range(before[1]) if i not in removed_in[module_name]]
        if entry:
            kept_index[module_name] = entry

    with torch.no_grad():
        out_ref = reference(example)
        num_classes = int(out_ref.shape[-1]) if out_ref.dim() >= 2 else None
    diff, scale = _equivalence(reference, small, example, seed)
    plan = {
        "format": PLAN_FORMAT,
        "model": name,
        "model_options": dict(options or {}),
        "num_classes": num_classes,
        "input_shape": [int(d) for d in example.shape[1:]],
        "history": history,
        "kept": kept_index,
        "gathered": gathered,
    }
    report = CompactReport(diff, tolerance, scale, sum(p.numel() for p in model.parameters()),
                           sum(p.numel() for p in small.parameters()), summary, kept_constant, plan)
    if not diff <= tolerance * max(1.0, scale):
        raise PrunelabError(f"compact model differs from the masked model by {diff:.3g} on the probe batch "
                            f"(outputs up to {scale:.3g}; tolerance {tolerance:g} x max(1, that))")
    return small, report


def equivalence(reference: nn.Module, small: nn.Module, example: torch.Tensor, seed: int = 0) -> float:
    """Largest |reference(x) - small(x)| over ``example`` and a seeded normal batch of its shape (eval
    mode, modes restored). inf when the output shapes differ."""
    return _equivalence(reference, small, example, seed)[0]


@torch.no_grad()
def _equivalence(reference: nn.Module, small: nn.Module, example: torch.Tensor, seed: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    probes = [example, torch.randn(example.shape, generator=generator).to(example.device, example.dtype)]
    modes = [(m, m.training) for net in (reference, small) for m in net.modules()]
    reference.eval()
    small.eval()
    worst, scale = 0.0, 0.0
    try:
        for x in probes:
            a, b = reference(x), small(x)
            if a.shape != b.shape:
                return float("inf"), scale
            d = float((a - b).abs().max()) if a.numel() else 0.0
            if d != d:  # NaN
                return float("inf"), scale
            worst = max(worst, d)
            scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
    finally:
        for m, mode in modes:
            m.train(mode)
    return worst, scale


# --- saving without pickle -------------------------------------------------------------------------------

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
    graph_model = model
    dg = _dependency_graph(graph_model, example)
    for module_name, is_out, idxs in plan["history"]:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise PrunelabError(f"plan names module {module_name!r}, which the model does not have") from None
        pruner = dg.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        dg.get_pruning_group(module, fn, [int(i) for i in idxs]).prune()
    for module_name, index in (plan.get("gathered") or {}).items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise PrunelabError(f"plan names module {module_name!r}, which the model does not have") from None
        if type(module) not in _GATHERED:
            raise PrunelabError(f"plan gathers the inputs of {module_name!r}, a {type(module).__name__}")
        _gather_inputs(module, [int(i) for i in index])
    return model


def load_compact(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by :func:`save_compact`: build_model, replay the plan, load weights/masks."""
    from .models import build_model

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


# --- what a structured model costs --------------------------------------------------------------------

def structured_metrics(dense: nn.Module, small: nn.Module, example: torch.Tensor, *, threads: int = 1,
                       latency: bool = True, min_run_time: float = 0.3,
                       channels_last: bool = False) -> dict[str, Any]:
    """PR, FR and measured CPU latency of a compact model against the dense architecture.

    * ``pr`` = 1 - params(small) / params(dense), over all parameters (PFP's prune ratio of the
      physically smaller model); ``pr_nonzero`` counts the small model's non-zero parameters instead
      (masks still inside the small model count as zero).
    * ``fr`` = 1 - FLOPs(small) / FLOPs(dense), one example, ``metrics.module_flops``.
    * ``latency_ms``: ``metrics.latency_ms`` on ``example`` (its batch size) with ``threads`` threads, for
      both models without mask hooks, in three alternating rounds; the median round of each is reported.
      ``channels_last=True`` times both in the channels-last layout (see ``compare_latency``).
    """
    p_dense = sum(p.numel() for p in dense.parameters())
    p_small = sum(p.numel() for p in small.parameters())
    nnz_small = metrics.parameter_counts(small)["nonzero"]
    f_dense, _ = metrics.module_flops(dense, example[:1])
    f_small, _ = metrics.module_flops(small, example[:1])
    result = {
        "params": {"dense": p_dense, "small": p_small, "small_nonzero": nnz_small},
        "pr": 1.0 - p_small / p_dense,
        "pr_nonzero": 1.0 - nnz_small / p_dense,
        "flops": {"dense": f_dense, "small": f_small},
        "fr": 1.0 - f_small / max(f_dense, 1),
        "latency_ms": None,
    }
    if latency:
        result["latency_ms"] = compare_latency(dense, small, example, threads=threads, min_run_time=min_run_time,
                                               channels_last=channels_last)
    return result


def compare_latency(dense: nn.Module, small: nn.Module, example: torch.Tensor, *, threads: int = 1,
                    min_run_time: float = 0.3, channels_last: bool = False) -> dict[str, Any]:
    """Median CPU latency (ms) of two models on ``example`` (its batch size), and the speed-up dense/small.

    Both run without mask hooks, alternating over three rounds so that a slow spell of a shared machine
    hits both; the median round of each is reported. ``channels_last=True`` times both in the
    channels-last layout (image inputs only), which oneDNN runs faster on many CPUs than the default
    one, most of all for channel counts that are not a multiple of 8 or 16.
    """
    plain_dense, plain_small = masking.copy_model(dense), masking.copy_model(small)
    masking.make_permanent(plain_dense)
    masking.make_permanent(plain_small)
    if channels_last:
        if example.dim() != 4:
            raise PrunelabError("channels_last timing needs an image batch (N, C, H, W)")
        plain_dense = plain_dense.to(memory_format=torch.channels_last)
        plain_small = plain_small.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    rounds = [(metrics.latency_ms(plain_dense, example, threads=threads, min_run_time=min_run_time / 3),
               metrics.latency_ms(plain_small, example, threads=threads, min_run_time=min_run_time / 3))
              for _ in range(3)]
    dense_ms = sorted(r[0] for r in rounds)[1]
    small_ms = sorted(r[1] for r in rounds)[1]
    return {"dense": dense_ms, "small": small_ms, "speedup": dense_ms / small_ms if small_ms else None,
            "batch": int(example.shape[0]), "threads": threads,
            "layout": "channels_last" if channels_last else "contiguous", "rounds": [list(r) for r in rounds]}
