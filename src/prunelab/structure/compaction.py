"""Compaction: turn a channel-masked model into a physically smaller dense model computing the same function.

:func:`compact` removes the channels that :mod:`.removable` finds exactly removable (folding the
constants some of them carry into the readers' biases), cuts them out with torch-pruning, and carries
the surviving masks over. Layers left with zero input slices for channels that others still read
become Gathered layers (``gather_inputs``, see :mod:`.layers`). The result is checked against the
masked model on the example batch (and, for a floating-point tensor input, on a seeded normal batch of
its shape), output by output: a tensor, a tuple/list, a dict or a Hugging Face ``ModelOutput``.

The example may be a batch tensor or a dict of keyword tensors (``model(**example)``, Hugging Face
style). Whole attention heads of a Hugging Face style self-attention (BERT) are removed: the query, key
and value rows of the head and the output layer's columns, and the attention module's
``num_attention_heads`` / ``all_head_size`` follow. A removal torch-pruning cannot carry out is refused
in one line (the input model is never modified).

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
from ..data import feed
from ..errors import PrunelabError
from ..masking import param_name
from .graph import ChannelGroup, check_example, set_heads
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


def compact(model: nn.Module, example_input, tolerance: float = 1e-5, *,
            name: str | None = None, options: Mapping[str, Any] | None = None,
            seed: int = 0, gather_inputs: bool = True) -> tuple[nn.Module, CompactReport]:
    """A physically smaller copy of a channel-masked model that computes the same outputs.

    ``example_input``: a batch the model accepts, a tensor or a dict of keyword tensors (traced, and used
    as the probe for the equivalence check; a floating-point tensor is joined by a seeded standard-normal
    batch of its shape; integer inputs such as token ids are probed with the example only). ``name``/``options``: the
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

def _copies(model: nn.Module, example_input) -> tuple[nn.Module, nn.Module, Any]:
    """The masked reference, the copy to cut (masks made permanent, eval mode) and the example on its device."""
    check_example(example_input)
    if any(isinstance(m, tuple(_GATHERED.values())) for m in model.modules()):
        raise PrunelabError("this model is already compact (it has gathered layers); compact the masked model")
    reference = masking.copy_model(model).eval()
    small = masking.copy_model(model)
    masking.make_permanent(small)  # the masked weights are exact zeros from here on
    small.eval()
    return reference, small, feed.to_model(small, example_input)


def remove_channels(traced: Traced, removed: Flags) -> list[list]:
    """Cut the removed channels out with torch-pruning; its pruning history (the plan's replay list).
    Attention modules that lost heads get their head count updated."""
    dg = traced.graph._dg
    for g, group in enumerate(traced.groups):
        channels = _chosen(removed[g])
        if not channels:
            continue
        root = traced.modules[group.root]
        own = next((s for s in group.producers if s.module == group.root), None)
        positions = sorted({i for r in channels for i in own.index[r]}) if own is not None else channels
        try:
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, positions).prune()
        except Exception as error:  # torch-pruning's failures come in every type: one line, naming the layer
            first = (str(error).strip().splitlines() or [""])[0]
            raise PrunelabError(f"compact: torch-pruning cannot remove channels of {group.root!r}: "
                                f"{type(error).__name__}: {first}") from None
        if group.heads is not None:
            set_heads(traced.graph._model, group.heads)
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


def make_plan(reference: nn.Module, example, name: str | None, options: Mapping[str, Any] | None,
              history: list[list], gathered: dict[str, list[int]], kept: dict[str, dict[str, list[int]]]) -> dict:
    """What :func:`~.files.load_compact` needs to rebuild the compact model from ``build_model``.

    ``input_shape`` (one example's shape) and ``input_dtype`` describe a tensor input; a dict of keyword
    inputs is described by ``inputs`` ({name: {"shape", "dtype"}}) instead."""
    with torch.no_grad():
        try:
            out_ref = feed.default_logits(feed.call(reference, example))
        except PrunelabError:
            out_ref = None
        num_classes = int(out_ref.shape[-1]) if out_ref is not None and out_ref.dim() >= 2 else None
    plan = {
        "format": PLAN_FORMAT,
        "model": name,
        "model_options": dict(options or {}),
        "num_classes": num_classes,
        "history": history,
        "kept": kept,
        "gathered": gathered,
    }
    if torch.is_tensor(example):
        plan["input_shape"] = [int(d) for d in example.shape[1:]]
        if example.dtype != torch.float32:
            plan["input_dtype"] = str(example.dtype).removeprefix("torch.")
    else:
        plan["inputs"] = {k: {"shape": [int(d) for d in v.shape[1:]], "dtype": str(v.dtype).removeprefix("torch.")}
                          for k, v in example.items()}
    return plan


def verify(reference: nn.Module, small: nn.Module, example, tolerance: float,
           seed: int) -> tuple[float, float]:
    """(max |difference|, max |reference output|) on the probes; raises if beyond the tolerance."""
    diff, scale = _equivalence(reference, small, example, seed)
    if not diff <= tolerance * max(1.0, scale):
        raise PrunelabError(f"compact model differs from the masked model by {diff:.3g} on the probe batch "
                            f"(outputs up to {scale:.3g}; tolerance {tolerance:g} x max(1, that))")
    return diff, scale


def equivalence(reference: nn.Module, small: nn.Module, example, seed: int = 0) -> float:
    """Largest |reference(x) - small(x)| over every output tensor, on ``example`` (a tensor or a dict of
    keyword tensors) and, for a floating-point tensor example, a seeded normal batch of its shape (eval
    mode, modes restored). inf when the outputs differ in structure or shape."""
    return _equivalence(reference, small, example, seed)[0]


def probes(example, seed: int = 0) -> list:
    """The batches the equivalence check runs: the example, and for a floating-point tensor a seeded
    standard-normal batch of its shape (never for token ids or dicts of inputs: random ids or masks
    are not inputs the model takes)."""
    found = [example]
    if torch.is_tensor(example) and example.is_floating_point():
        generator = torch.Generator().manual_seed(seed)
        found.append(torch.randn(example.shape, generator=generator).to(example.device, example.dtype))
    return found


def output_tensors(output, path: str = "output") -> list[tuple[str, torch.Tensor | None]]:
    """The tensors of a model's output, each with its path: a tensor, a tuple/list, a dict or a
    ``ModelOutput`` (a dict), nested; other leaves (None, numbers) as None."""
    if torch.is_tensor(output):
        return [(path, output)]
    if isinstance(output, Mapping):
        return [item for k, v in output.items() for item in output_tensors(v, f"{path}[{k!r}]")]
    if isinstance(output, (tuple, list)):
        return [item for i, v in enumerate(output) for item in output_tensors(v, f"{path}[{i}]")]
    return [(path, None)]


@torch.no_grad()
def _equivalence(reference: nn.Module, small: nn.Module, example, seed: int) -> tuple[float, float]:
    modes = [(m, m.training) for net in (reference, small) for m in net.modules()]
    reference.eval()
    small.eval()
    worst, scale = 0.0, 0.0
    try:
        for x in probes(example, seed):
            a = output_tensors(feed.call(reference, x))
            try:
                b = output_tensors(feed.call(small, x))
            except Exception as error:  # a cut the model's own code does not follow (a reshape by a fixed size)
                first = (str(error).strip().splitlines() or [""])[0]
                raise PrunelabError(f"compact: the compact {type(small).__name__} fails on the probe batch: "
                                    f"{type(error).__name__}: {first}") from None
            if [p for p, _ in a] != [p for p, _ in b]:
                return float("inf"), scale
            for (_, ta), (_, tb) in zip(a, b):
                if ta is None or tb is None:
                    continue
                if ta.shape != tb.shape or ta.dtype != tb.dtype:
                    return float("inf"), scale
                if not ta.numel():
                    continue
                if not ta.is_floating_point():
                    if not torch.equal(ta, tb):
                        return float("inf"), scale
                    continue
                d = float((ta.double() - tb.double()).abs().max())
                if d != d:  # NaN
                    return float("inf"), scale
                worst = max(worst, d)
                scale = max(scale, float(ta.abs().max()))
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
