"""The method registry and the public ``prune`` / ``scores`` functions.

A method is a criterion (scores), a selection rule (scores to masks) and a default schedule (when the run
prunes). ``prune`` composes them: score the prunable parameters, select within what is still alive,
attach the masks, and report what was pruned.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import masking, selection
from .criteria import magnitude_scores, random_scores
from .errors import PrunelabError, unknown


class LayerCollapseWarning(UserWarning):
    """A selection removed every weight of a layer: the network can no longer pass signal through it."""


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    criterion: Callable[..., dict[str, torch.Tensor]] | None  # None: trains dense, prunes nothing
    scope: str = "global"          # default selection scope
    when: str = "trained"          # default schedule: "init" (before training) or "trained"
    needs_data: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options and defaults


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("none", "no pruning: trains the dense reference", None))
register(Method("random", "uniformly random weights (global or per layer)", random_scores, when="init"))
register(Method("magnitude", "smallest |w| first (Han et al. 2015; global or per layer)", magnitude_scores))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def list_methods() -> list[Method]:
    return [METHODS[n] for n in sorted(METHODS)]


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


def scores(model: nn.Module, method: str, data=None, *, seed: int = 0, include_bias: bool = False,
           **options) -> dict[str, torch.Tensor]:
    """``{parameter name: score}`` of a score-based method on the model's prunable parameters."""
    spec = get_method(method)
    if spec.criterion is None:
        raise PrunelabError(f"method {method!r} has no scores; score-based methods: "
                            f"{', '.join(n for n, m in METHODS.items() if m.criterion)}")
    masking.require_prunable(model)
    if spec.needs_data and data is None:
        raise PrunelabError(f"method {method!r} needs data to score (pass data=...)")
    unknown_options = set(options) - set(spec.options)
    if unknown_options:
        allowed = ", ".join(sorted(spec.options)) or "none"
        raise PrunelabError(f"unknown option(s) {', '.join(sorted(unknown_options))} for method "
                            f"{method!r}; allowed: {allowed}")
    params = masking.prunable_parameters(model, include_bias=include_bias)
    generator = torch.Generator().manual_seed(seed)
    merged = {**spec.options, **options}
    return spec.criterion(model, params, data=data, generator=generator, **merged)


def prune(model: nn.Module, method: str, sparsity: float, data=None, *, scope: str | None = None,
          seed: int = 0, include_bias: bool = False, optimizer: torch.optim.Optimizer | None = None,
          **options) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` of its prunable weights and return a report.

    Weights already masked stay pruned: the selection ranks only the surviving weights and the target
    counts all prunable weights, so calling ``prune`` again with a higher sparsity continues an
    iterative schedule. Exactly round((1 - sparsity) m) of the m prunable weights survive.
    """
    sparsity = selection.check_sparsity(sparsity)
    spec = get_method(method)
    scope = scope or spec.scope
    start = time.perf_counter()
    if spec.criterion is None:
        raise PrunelabError("method 'none' prunes nothing; choose a pruning method: "
                            f"{', '.join(n for n in METHODS if n != 'none')}")
    score = scores(model, method, data, seed=seed, include_bias=include_bias, **options)
    alive = masking.masks(model)
    new_masks = selection.select(score, sparsity, scope, alive)
    masking.attach(model, new_masks, optimizer)
    report = _report(spec.name, scope, sparsity, new_masks, time.perf_counter() - start)
    if report.collapsed:
        warnings.warn(f"layer collapse: {method} pruned every weight of {', '.join(report.collapsed)}",
                      LayerCollapseWarning, stacklevel=2)
    return report


def _report(method, scope, target, new_masks, seconds) -> PruneReport:
    layers, collapsed, kept_total, total = [], [], 0, 0
    for name, mask in new_masks.items():
        kept = int(mask.sum())
        layers.append({"name": name, "shape": list(mask.shape), "params": mask.numel(), "kept": kept})
        if kept == 0:
            collapsed.append(name)
        kept_total += kept
        total += mask.numel()
    return PruneReport(method, scope, target, 1.0 - kept_total / total, kept_total, total,
                       layers, collapsed, seconds)
