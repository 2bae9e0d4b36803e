"""``prune`` and ``scores``: a method's criterion and selection applied to a model, and a report.

``prune`` composes a method's parts: resolve the data (any PyTorch form, ``prunelab.data.feed``), check
the options and the target, score the prunable parameters, select within what is still alive, attach the
masks, and report what was pruned (of what was eligible).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import masking, selection
from .data.feed import as_feed
from .errors import PrunelabError
from .methods import METHODS, Method, check_layers, get_method, list_methods, register

__all__ = ["LayerCollapseWarning", "Method", "PruneReport", "check_keeps_some", "check_target", "get_method",
           "list_methods", "prune", "register", "scores"]


class LayerCollapseWarning(UserWarning):
    """A selection removed every weight of a layer: the network can no longer pass signal through it."""


@dataclass
class PruneReport:
    """What one pruning step did.

    ``target``: the amount asked for, ``{kind: value}`` (``sparsity``: fraction of prunable weights;
    ``channels``: fraction of each eligible layer's channels; ``parameters``: fraction of all parameters),
    or None when the method decided. ``sparsity``, ``kept`` and ``total`` count the prunable weights the
    method acted on; ``eligible`` is their share of all the model's parameters, ``sparsity_all`` the share
    of all parameters now masked, ``channels_removed`` the share of the layers' output channels (rows)
    whose weights are all masked, ``layers`` one entry per eligible parameter (``aliases``: the other names
    of a tied one). ``examples``: data examples the method drew (0 when it used none).
    """

    method: str
    scope: str
    target: dict[str, float] | None
    sparsity: float
    kept: int
    total: int
    eligible: float
    sparsity_all: float
    channels_removed: float
    examples: int
    layers: list[dict[str, Any]]
    collapsed: list[str]
    seconds: float

    @property
    def target_sparsity(self) -> float | None:
        return None if self.target is None else self.target.get("sparsity")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_target(method: Method, *, sparsity: float | None = None, channels: float | None = None,
                 parameters: float | None = None) -> tuple[str | None, float | None]:
    """The one target given, as (kind, value), checked against what ``method`` can aim at."""
    given = {k: v for k, v in (("sparsity", sparsity), ("channels", channels), ("parameters", parameters))
             if v is not None}
    if not method.targets:
        if given:
            raise PrunelabError(f"method {method.name!r} decides how much to prune itself (its options "
                                f"decide); drop the target {', '.join(given)}")
        return None, None
    if len(given) > 1:
        raise PrunelabError(f"give one target, not {' and '.join(given)}")
    if not given:
        raise PrunelabError(f"method {method.name!r} needs a target: {' or '.join(method.targets)} in (0, 1)")
    (kind, value), = given.items()
    meaning = {"sparsity": "a fraction of the prunable weights", "channels": "a fraction of each layer's "
               "channels", "parameters": "a fraction of all parameters"}
    if kind not in method.targets:
        raise PrunelabError(f"method {method.name!r} cannot aim at {kind} ({meaning[kind]}); give "
                            + " or ".join(f"{t} ({meaning[t]})" for t in method.targets))
    try:
        return kind, selection.check_sparsity(value)
    except PrunelabError:
        raise PrunelabError(f"{kind} must be in [0, 1) ({meaning[kind]} removed), got {value!r}") from None


def _prepare(model: nn.Module, method: str, data, include_bias: bool, include, exclude, options: dict, loss_fn,
             get_logits):
    """Check a call against its method: (method, prunable parameters, checked options, data as a Feed)."""
    spec = get_method(method)
    if spec.needs_data and data is None:
        raise PrunelabError(f"method {method!r} needs data to score (pass data=...)")
    parsed = spec.parse_options(options)
    params = masking.prunable_parameters(model, include_bias=include_bias, include=include, exclude=exclude)
    masking.require_prunable(model, params)
    check_layers(spec, model, params)
    return spec, params, parsed, as_feed(data, loss_fn=loss_fn, get_logits=get_logits)


def scores(model: nn.Module, method: str, data=None, *, seed: int = 0, include_bias: bool = False,
           include=None, exclude=None, loss_fn: Callable | None = None, get_logits: Callable | None = None,
           **options) -> dict[str, torch.Tensor]:
    """``{parameter name: score}`` of a score-based method on the model's prunable parameters (higher =
    keep). ``data``: any form ``prunelab.data.feed`` takes; ``loss_fn(logits, targets)`` (default
    cross-entropy) and ``get_logits`` (picks the logits from the model's output) for loss-based methods;
    ``include``/``exclude``: which parameters are eligible (``prunelab.masking.prunable_parameters``)."""
    spec, params, parsed, data = _prepare(model, method, data, include_bias, include, exclude, options, loss_fn,
                                          get_logits)
    if spec.criterion is None:
        raise PrunelabError(f"method {method!r} has no scores; score-based methods: "
                            f"{', '.join(n for n, m in METHODS.items() if m.criterion)}")
    return spec.criterion(model, params, data=data, generator=torch.Generator().manual_seed(seed), **parsed)


def prune(model: nn.Module, method: str, sparsity: float | None = None, data=None, *,
          channels: float | None = None, parameters: float | None = None, scope: str | None = None,
          seed: int = 0, include_bias: bool = False, include=None, exclude=None,
          optimizer: torch.optim.Optimizer | None = None, loss_fn: Callable | None = None,
          get_logits: Callable | None = None, **options) -> PruneReport:
    """Prune ``model`` in place and return a report.

    The target is one of ``sparsity`` (fraction of the prunable weights removed: exactly
    round((1 - sparsity) m) of the m prunable weights survive), ``channels`` (fraction of each eligible
    layer's channels, for channel methods) or ``parameters`` (fraction of all parameters, PFP); a method
    that decides how much to prune (``relief``) takes none. Weights already masked stay pruned: the
    selection ranks only the survivors and a sparsity target counts every prunable weight, so calling
    ``prune`` again with a higher target continues an iterative schedule; a lower one is refused.

    ``data``: a Dataset, DataLoader, iterable of batches or (inputs, targets) pair (``prunelab.data.feed``);
    ``loss_fn`` and ``get_logits`` as for ``scores``; ``include``/``exclude``: the eligibility policy (by
    default Linear, Conv, attention and recurrent weights; embeddings opt in: ``include=nn.Embedding``; a
    module type or a name pattern, or a list: ``prunelab.masking.prunable_parameters``); ``optimizer``: its
    state at pruned positions is zeroed now; ``options``: the method's (``prunelab.list_methods()``,
    ``docs/methods/``).
    """
    start = time.perf_counter()
    spec = get_method(method)
    kind, amount = check_target(spec, sparsity=sparsity, channels=channels, parameters=parameters)
    spec, params, parsed, data = _prepare(model, method, data, include_bias, include, exclude, options, loss_fn,
                                          get_logits)
    parsed.update(spec.target_options.get(kind, {}))
    if spec.criterion is None and spec.pruner is None:
        raise PrunelabError(f"method {method!r} does not prune in one call"
                            + (" (it prunes while training: use prunelab.schedules.for_method)" if spec.prunes
                               else "") + "; one-call methods: "
                            + ", ".join(n for n, m in METHODS.items() if m.criterion or m.pruner))
    scope = scope or spec.scope
    alive = masking.masks(model)
    if kind == "sparsity":
        check_keeps_some(params, amount)
        _refuse_lower(params, alive, amount)
    generator = torch.Generator().manual_seed(seed)
    new_masks = spec.masks(model, params, sparsity=amount, scope=scope, alive=alive, data=data,
                           generator=generator, **parsed)
    masking.attach(model, new_masks, optimizer)
    report = _report(model, spec.name, scope, None if kind is None else {kind: amount}, params, data,
                     time.perf_counter() - start)
    if report.collapsed:
        warnings.warn(f"layer collapse: {method} pruned every weight of {', '.join(report.collapsed)}",
                      LayerCollapseWarning, stacklevel=2)
    return report


def check_keeps_some(params, sparsity: float) -> None:
    """Refuse a sparsity that would keep none of the prunable weights (the network could not compute)."""
    total = sum(p.numel() for p in params.values())
    if selection.keep_count(total, sparsity) == 0:
        largest = 1.0 - 0.5 / total  # keep_count rounds: below this, at least one weight survives
        raise PrunelabError(f"sparsity {sparsity} keeps none of the {total:,} prunable weights; give a sparsity "
                            f"below {largest:.10g}")


def _refuse_lower(params, alive, sparsity: float) -> None:
    total = sum(p.numel() for p in params.values())
    kept = sum(int(alive[n].sum()) if n in alive else p.numel() for n, p in params.items())
    if selection.keep_count(total, sparsity) > kept:
        raise PrunelabError(f"target sparsity {sparsity} is below the current sparsity {1 - kept / total:.4f} "
                            "of these weights; pruned weights never come back")


def _report(model, method, scope, target, params, data, seconds) -> PruneReport:
    """The model's masks after a pruning step, counted over the prunable ``params`` (and all parameters)."""
    current = masking.masks(model)
    tied = masking.aliases(model)
    layers, collapsed, kept_total, total, rows_dead, rows = [], [], 0, 0, 0, 0
    for name, param in params.items():
        mask = current.get(name)
        kept = param.numel() if mask is None else int(mask.sum())
        layers.append({"name": name, "shape": list(param.shape), "params": param.numel(), "kept": kept,
                       **({"aliases": tied[name]} if name in tied else {})})
        if kept == 0 and not name.endswith("bias"):  # an emptied bias still lets signal through
            collapsed.append(name)
        kept_total += kept
        total += param.numel()
        if param.dim() >= 2:
            rows += param.shape[0]
            rows_dead += 0 if mask is None else int((~mask.reshape(mask.shape[0], -1).any(1)).sum())
    everything = sum(p.numel() for p in model.parameters())
    masked = sum(int((~m).sum()) for m in current.values())
    return PruneReport(method, scope, target, 1.0 - kept_total / total, kept_total, total, total / everything,
                       masked / everything, rows_dead / rows if rows else 0.0,
                       data.examples_drawn if data is not None else 0, layers, collapsed, seconds)
