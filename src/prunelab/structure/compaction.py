"""Compaction: turn a channel-masked model into a physically smaller dense model computing the same function.

:func:`compact` removes the channels that :mod:`.removable` finds exactly removable (folding the
constants some of them carry into the readers' biases), cuts them out with torch-pruning, and carries
the surviving masks over. Layers left with zero input slices for channels that others still read
become Gathered layers (``gather_inputs``, see :mod:`.layers`). The result is checked against the
masked model on a probe batch.

The steps, in order: :func:`~.removable.trace`, :func:`~.removable.constant_channels`,
:func:`~.removable.removable_channels`, :func:`~.removable.fold_constants`, :func:`remove_channels`,
:func:`reindex_masks`, :func:`gather_used_inputs`, :func:`make_plan`, :func:`verify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .. import masking
from ..errors import PrunelabError
from ..masking import param_name
from .graph import ChannelGroup
from .layers import _GATHERED, _gather_inputs, _used_inputs
from .removable import Flags, Traced, constant_channels, fold_constants, removable_channels, trace

PLAN_FORMAT = "prunelab.compact/1"


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
    reference, small, example = _copies(model, example_input)
    old_masks = masking.masks(model)
    traced = trace(small, example)
    constant = constant_channels(traced)
    removed, kept_constant = removable_channels(traced, constant)
    fold_constants(traced, constant, removed)
    shapes_before = {n: tuple(p.shape) for n, p in small.named_parameters()}
    removed_out, removed_in = _removed_positions(traced.groups, removed)
    history = remove_channels(traced, removed)
    masks = reindex_masks(old_masks, removed_out, removed_in)
    gathered = gather_used_inputs(small, masks) if gather_inputs else {}
    _attach(small, masks)
    plan = make_plan(reference, example, name, options, history, gathered,
                     _kept_positions(shapes_before, removed_out, removed_in))
    diff, scale = verify(reference, small, example, tolerance, seed)
    return small, CompactReport(diff, tolerance, scale, sum(p.numel() for p in model.parameters()),
                                sum(p.numel() for p in small.parameters()), _summary(traced.groups, removed),
                                kept_constant, plan)


# --- the steps ----------------------------------------------------------------------------------------------

def _copies(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The masked reference, the copy to cut (masks made permanent, eval mode) and the example on its device."""
    if not torch.is_tensor(example_input) or example_input.dim() < 2:
        raise PrunelabError("example_input must be a batch tensor (N, ...) that the model accepts")
    if any(isinstance(m, tuple(_GATHERED.values())) for m in model.modules()):
        raise PrunelabError("this model is already compact (it has gathered layers); compact the masked model")
    reference = masking.copy_model(model).eval()
    small = masking.copy_model(model)
    masking.make_permanent(small)  # the masked weights are exact zeros from here on
    small.eval()
    return reference, small, example_input.to(next(small.parameters()).device)


def remove_channels(traced: Traced, removed: Flags) -> list[list]:
    """Cut the removed channels out with torch-pruning; its pruning history (the plan's replay list)."""
    dg = traced.graph._dg
    for g, group in enumerate(traced.groups):
        channels = _chosen(removed[g])
        if channels:
            root = traced.modules[group.root]
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, channels).prune()
    return [[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in dg.pruning_history()]


def reindex_masks(masks: Mapping[str, torch.Tensor], removed_out: Mapping[str, set[int]],
                  removed_in: Mapping[str, set[int]]) -> dict[str, torch.Tensor]:
    """The masked model's masks without the rows/columns of removed channels."""
    new_masks = {}
    for pname, mask in masks.items():
        module_name, _, local = pname.rpartition(".")
        kept = mask
        out_drop = removed_out.get(module_name, set())
        in_drop = removed_in.get(module_name, set())
        if out_drop:
            kept = kept[[i for i in range(kept.shape[0]) if i not in out_drop]]
        if in_drop and kept.dim() >= 2 and local == "weight":
            kept = kept[:, [i for i in range(kept.shape[1]) if i not in in_drop]]
        new_masks[pname] = kept
    return new_masks


def gather_used_inputs(small: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Make each layer with unused input channels a Gathered layer (masks follow); {layer: inputs kept}."""
    gathered: dict[str, list[int]] = {}
    for module_name, module in small.named_modules():
        index = _used_inputs(module)
        if index is None:
            continue
        _gather_inputs(module, index)
        gathered[module_name] = index
        key = param_name(module_name, "weight")
        if key in masks:
            masks[key] = masks[key][:, index]
    return gathered


def make_plan(reference: nn.Module, example: torch.Tensor, name: str | None, options: Mapping[str, Any] | None,
              history: list[list], gathered: dict[str, list[int]], kept: dict[str, dict[str, list[int]]]) -> dict:
    """What :func:`~.files.load_compact` needs to rebuild the compact model from ``build_model``."""
    with torch.no_grad():
        out_ref = reference(example)
        num_classes = int(out_ref.shape[-1]) if out_ref.dim() >= 2 else None
    return {
        "format": PLAN_FORMAT,
        "model": name,
        "model_options": dict(options or {}),
        "num_classes": num_classes,
        "input_shape": [int(d) for d in example.shape[1:]],
        "history": history,
        "kept": kept,
        "gathered": gathered,
    }


def verify(reference: nn.Module, small: nn.Module, example: torch.Tensor, tolerance: float,
           seed: int) -> tuple[float, float]:
    """(max |difference|, max |reference output|) on the probes; raises if beyond the tolerance."""
    diff, scale = _equivalence(reference, small, example, seed)
    if not diff <= tolerance * max(1.0, scale):
        raise PrunelabError(f"compact model differs from the masked model by {diff:.3g} on the probe batch "
                            f"(outputs up to {scale:.3g}; tolerance {tolerance:g} x max(1, that))")
    return diff, scale


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


# --- bookkeeping --------------------------------------------------------------------------------------------

def _chosen(flags: list[bool]) -> list[int]:
    return [r for r, on in enumerate(flags) if on]


def _removed_positions(groups: list[ChannelGroup],
                       removed: Flags) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Per module, the positions removed from its output and from its input dimension."""
    removed_out: dict[str, set[int]] = {}
    removed_in: dict[str, set[int]] = {}
    for g, group in enumerate(groups):
        channels = _chosen(removed[g])
        for s in group.producers:
            removed_out.setdefault(s.module, set()).update(i for r in channels for i in s.index[r])
        for s in group.consumers:
            removed_in.setdefault(s.module, set()).update(i for r in channels for i in s.index[r])
    return removed_out, removed_in


def _kept_positions(shapes_before: Mapping[str, tuple[int, ...]], removed_out: Mapping[str, set[int]],
                    removed_in: Mapping[str, set[int]]) -> dict[str, dict[str, list[int]]]:
    """The plan's ``kept``: per layer that lost channels, the surviving output ("out") / input ("in") indices."""
    kept_index = {}
    for module_name in sorted(set(removed_out) | set(removed_in)):
        before = shapes_before.get(param_name(module_name, "weight"))
        if before is None:
            continue
        entry = {}
        if removed_out.get(module_name):
            entry["out"] = [i for i in range(before[0]) if i not in removed_out[module_name]]
        if len(before) >= 2 and removed_in.get(module_name):
            entry["in"] = [i for i in range(before[1]) if i not in removed_in[module_name]]
        if entry:
            kept_index[module_name] = entry
    return kept_index


def _attach(small: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(small.named_parameters())
    for pname, mask in masks.items():
        if tuple(mask.shape) != tuple(params[pname].shape):
            raise PrunelabError(f"internal error: mask of {pname} re-indexed to {tuple(mask.shape)}, "
                                f"the compact parameter is {tuple(params[pname].shape)}")
    if masks:
        masking.attach(small, masks)


def _summary(groups: list[ChannelGroup], removed: Flags) -> list[dict[str, Any]]:
    return [{"root": group.root, "channels": group.size, "removed": len(_chosen(removed[g])),
             "safe": group.safe, "output": group.is_output} for g, group in enumerate(groups)]
