"""The method registry and the public ``prune`` / ``scores`` functions.

A method is a criterion (scores), a selection rule (scores to masks) and a default schedule (when the run
prunes). ``prune`` composes them: score the prunable parameters, select within what is still alive,
attach the masks, and report what was pruned.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import masking, selection
from .errors import PrunelabError
from .methods import METHODS, Method, check_layers, get_method, list_methods, register

__all__ = ["LayerCollapseWarning", "Method", "PruneReport", "get_method", "list_methods", "prune",
           "register", "scores"]


class LayerCollapseWarning(UserWarning):
    """A selection removed every weight of a layer: the network can no longer pass signal through it."""


@dataclass
class PruneReport:
    """What one pruning step did. Sparsities are over the prunable weights the method acted on."""

    method: str
    scope: str
    target_sparsity: float
    sparsity: float
    kept: int
    total: int
    layers: list[dict[str, Any]]
    collapsed: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prepare(model: nn.Module, method: str, data, include_bias: bool, options: dict):
    """Check a call against its method and return (method, prunable parameters, merged options)."""
    spec = get_method(method)
    masking.require_prunable(model)
    if spec.needs_data and data is None:
        raise PrunelabError(f"method {method!r} needs data to score (pass data=...)")
    unknown_options = set(options) - set(spec.options)
    if unknown_options:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise PrunelabError(f"unknown option(s) {', '.join(sorted(unknown_options))} for method "
                            f"{method!r}; allowed: {allowed}")
    params = masking.prunable_parameters(model, include_bias=include_bias)
    check_layers(spec, model, params)
    return spec, params, {**spec.options, **options}


def scores(model: nn.Module, method: str, data=None, *, seed: int = 0, include_bias: bool = False,
           **options) -> dict[str, torch.Tensor]:
    """``{parameter name: score}`` of a score-based method on the model's prunable parameters."""
    spec, params, merged = _prepare(model, method, data, include_bias, options)
    if spec.criterion is None:
        raise PrunelabError(f"method {method!r} has no scores; score-based methods: "
                            f"{', '.join(n for n, m in METHODS.items() if m.criterion)}")
    return spec.criterion(model, params, data=data, generator=torch.Generator().manual_seed(seed), **merged)


def prune(model: nn.Module, method: str, sparsity: float, data=None, *, scope: str | None = None,
          seed: int = 0, include_bias: bool = False, optimizer: torch.optim.Optimizer | None = None,
          **options) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` of its prunable weights and return a report.

    Weights already masked stay pruned: the selection ranks only the surviving weights and the target
    counts all prunable weights, so calling ``prune`` again with a higher sparsity continues an
    iterative schedule. Exactly round((1 - sparsity) m) of the m prunable weights survive.
    """
    sparsity = selection.check_sparsity(sparsity)
    start = time.perf_counter()
    spec, params, merged = _prepare(model, method, data, include_bias, options)
    scope = scope or spec.scope
    alive = masking.masks(model)
    generator = torch.Generator().manual_seed(seed)
    if spec.pruner is not None:
        new_masks = spec.pruner(model, params, sparsity=sparsity, scope=scope, alive=alive, data=data,
                                generator=generator, **merged)
    elif spec.criterion is not None:
        score = spec.criterion(model, params, data=data, generator=generator, **merged)
        new_masks = selection.select(score, sparsity, scope, alive)
    else:
        raise PrunelabError(f"method {method!r} prunes nothing; choose a pruning method: "
                            f"{', '.join(n for n, m in METHODS.items() if m.criterion or m.pruner)}")
    masking.attach(model, new_masks, optimizer)
    # structured methods also mask biases / BatchNorm entries: the report counts the prunable weights
    report = _report(spec.name, scope, sparsity, {n: m for n, m in new_masks.items() if n in params},
                     time.perf_counter() - start)
    if report.collapsed:
        warnings.warn(f"layer collapse: {method} pruned every weight of {', '.join(report.collapsed)}",
                      LayerCollapseWarning, stacklevel=2)
    return report


def _report(method, scope, target, new_masks, seconds) -> PruneReport:
    layers, collapsed, kept_total, total = [], [], 0, 0
    for name, mask in new_masks.items():
        kept = int(mask.sum())
        layers.append({"name": name, "shape": list(mask.shape), "params": mask.numel(), "kept": kept})
        if kept == 0 and not name.endswith("bias"):  # an emptied bias still lets signal through
            collapsed.append(name)
        kept_total += kept
        total += mask.numel()
    return PruneReport(method, scope, target, 1.0 - kept_total / total, kept_total, total,
                       layers, collapsed, seconds)
