"""Which channels :func:`~.compaction.compact` can remove exactly, and folding the constants they carry.

A channel goes only when that is exact for the masked model: either every layer that reads it has a
zero input slice (its value does not matter), or every layer that writes it has a zero weight row, so
the channel carries a constant (act(bias), or the BatchNorm shift act(beta - gamma * mean / sqrt(var +
eps)) with the running statistics in eval mode, carried through residual adds) that can be folded
exactly into the bias of each reader: a Linear, or a conv without padding (with zero padding the
constant's contribution is not uniform at the borders). A constant channel that cannot be folded (a
padded conv reading it, a reader without bias, a shortcut) is kept and reported.

A depthwise conv on the way writes a constant only when its own filter is zero (its output is then its
bias); with a non-zero filter a constant input is not uniform at zero-padded borders. In an attention
heads group the value rows decide: a head whose value rows are zero outputs its value bias at every
position (the attention weights sum to 1), whatever its query and key rows; the unit removed is a
whole head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..data.feed import take
from ..hooks import run_with_hooks
from .graph import ChannelGraph, ChannelGroup, Slice, shortcut_destination, channel_graph

Flags = list[list[bool]]  # [group][channel]


@dataclass
class Traced:
    """The copy being compacted, traced: its channel groups, its modules, what its readers receive."""

    graph: ChannelGraph
    modules: dict[str, nn.Module]
    inputs: dict[str, torch.Tensor]               # first input of each reader (Conv2d/Linear/shortcut)
    source_of: dict[tuple[str, int], tuple[int, int]]  # (shortcut, input channel) -> (group, channel) it reads
    target_of: dict[tuple[str, int], tuple[int, int]]  # (shortcut, output position) -> (group, channel)

    @property
    def groups(self) -> list[ChannelGroup]:
        return self.graph.groups


def trace(small: nn.Module, example) -> Traced:
    """The channel graph of ``small``, its readers' inputs on two examples, and the shortcut links."""
    graph = channel_graph(small, example)
    readers = [s.module for g in graph.groups for s in g.consumers if s.kind in ("conv", "linear", "shortcut")]
    return Traced(graph, dict(small.named_modules()), _capture_inputs(small, readers, take(example, slice(0, 2))),
                  _shortcut_links(graph.groups, "consumers"), _shortcut_links(graph.groups, "producers"))


def _shortcut_links(groups: list[ChannelGroup], side: str) -> dict[tuple[str, int], tuple[int, int]]:
    return {(s.module, i): (g, r) for g, group in enumerate(groups) for s in getattr(group, side)
            if s.kind == "shortcut" for r, ix in enumerate(s.index) for i in ix}


def _capture_inputs(model: nn.Module, modules: Iterable[str], example) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in set(modules):
        def hook(_module, inputs, name=name):
            seen.setdefault(name, inputs[0].detach())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    run_with_hooks(model, example, hooks, eval_mode=False)
    return seen


def constant_channels(traced: Traced) -> Flags:
    """Value-dead channels: every weight row that writes them is zero, so they carry a data-independent
    constant (through shortcuts: every channel the shortcut copies in is constant)."""
    groups = traced.groups
    constant = [[False] * g.size for g in groups]
    for _ in range(len(groups) + 1):  # to a fixed point: shortcuts pass constancy on from group to group
        changed = False
        for g, group in enumerate(groups):
            if group.has_other:
                continue
            for r in range(group.size):
                if not constant[g][r] and all(_writes_constant(traced, constant, s, r, group)
                                              for s in group.producers):
                    constant[g][r] = changed = True
        if not changed:
            break
    return constant


def _writes_constant(traced: Traced, constant: Flags, s: Slice, r: int, group: ChannelGroup | None = None) -> bool:
    if group is not None and group.heads is not None and s.kind == "linear":
        if s.module != f"{group.heads}.value".lstrip("."):
            return True  # query/key rows only weigh the positions; the value rows decide what is written
        return _all_zero(traced.modules[s.module].weight[list(s.index[r])])
    if s.kind in ("conv", "linear", "depthwise"):
        return _all_zero(traced.modules[s.module].weight[list(s.index[r])])
    if s.kind == "shortcut":
        sc = traced.modules[s.module]
        sources = [traced.source_of.get((s.module, i)) for i in range(sc.in_channels)
                   if shortcut_destination(sc, i) in s.index[r]]
        return all(constant[src[0]][src[1]] for src in sources if src is not None)
    return True  # BatchNorm: constant in, constant out (eval mode)


def removable_channels(traced: Traced, constant: Flags) -> tuple[Flags, list[dict[str, Any]]]:
    """The channels to remove, and a report of the constant channels that stay (with the reason).

    A group that would lose every channel keeps its channel 0 (a layer of width 0 cannot be built), and
    the search runs again, since other channels' removability depends on it."""
    groups = traced.groups
    pinned: set[tuple[int, int]] = set()
    while True:
        removed, reasons = _removal_pass(traced, constant, pinned)
        collapsed = [g for g, group in enumerate(groups) if group.size and all(removed[g])]
        if not collapsed:
            break
        pinned.update((g, 0) for g in collapsed)
    kept = [{"group": group.root, "channel": r,
             "reason": reasons.get((g, r), "kept to avoid removing every channel" if (g, r) in pinned
                                   else "not removable")}
            for g, group in enumerate(groups) for r in range(group.size)
            if constant[g][r] and not removed[g][r] and not group.is_output]
    return removed, kept


def _removal_pass(traced: Traced, constant: Flags, pinned: set[tuple[int, int]]):
    removed = [[False] * g.size for g in traced.groups]
    reasons: dict[tuple[int, int], str] = {}
    for _ in range(len(traced.groups) + 1):  # to a fixed point: a removed channel unblocks a shortcut's input
        changed = False
        for g, group in enumerate(traced.groups):
            if group.is_output or group.has_other:
                continue
            for r in range(group.size):
                if removed[g][r] or (g, r) in pinned:
                    continue
                verdicts = [_read(traced, constant[g][r], removed, s, r) for s in group.consumers]
                why = [w for _, _, w in verdicts if w]
                if why:
                    reasons[(g, r)] = why[-1]
                unread = not any(reads for reads, _, _ in verdicts)
                if unread or (constant[g][r] and all(folds for _, folds, _ in verdicts)):
                    removed[g][r] = changed = True
        if not changed:
            break
    return removed, reasons


def _read(traced: Traced, is_constant: bool, removed: Flags, s: Slice, r: int) -> tuple[bool, bool, str | None]:
    """How consumer ``s`` reads channel ``r``: (reads it, can absorb it when constant, why not)."""
    idx = list(s.index[r])
    module = traced.modules[s.module]
    value = None
    if s.kind in ("conv", "linear"):
        if _all_zero(module.weight[:, idx]):
            return False, True, None
        if not is_constant:
            return True, False, None
        if s.module in traced.inputs:
            value = _constant(traced.inputs[s.module], idx)
        if value is None:
            return True, False, f"{s.module}: input not constant on the probe"
        ok, why = _foldable(module, s.kind, idx, value)
        return True, ok, None if ok else f"{s.module}: {why} (constant {value:.6g})"
    # a shortcut: removing its input zeroes the output position it feeds
    targets = [traced.target_of.get((s.module, shortcut_destination(module, i))) for i in idx]
    if all(t is not None and removed[t[0]][t[1]] for t in targets):
        return False, True, None
    if is_constant and s.module in traced.inputs:
        value = _constant(traced.inputs[s.module], idx)
    if value == 0.0:
        return True, True, None
    return True, False, f"{s.module}: shortcut carries the constant {value}" if is_constant else None


def fold_constants(traced: Traced, constant: Flags, removed: Flags) -> None:
    """Add the contribution of each removed constant channel to the bias of every layer reading it."""
    for g, group in enumerate(traced.groups):
        for r in range(group.size):
            if not (removed[g][r] and constant[g][r]):
                continue
            for s in group.consumers:
                if s.kind in ("conv", "linear") and s.module in traced.inputs:
                    idx = list(s.index[r])
                    module = traced.modules[s.module]
                    if _all_zero(module.weight[:, idx]):
                        continue
                    _fold(module, s.kind, idx, _constant(traced.inputs[s.module], idx))


# --- constant values --------------------------------------------------------------------------------------

def _all_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all())


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
