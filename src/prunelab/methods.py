"""The method registry: name -> criterion, selection scope and default schedule.

A method module registers itself at import (``register(Method(...))``); every module in
``prunelab.criteria`` is imported by ``prunelab.criteria``, so adding a method is adding one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import PrunelabError, unknown


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``criterion(model, params, *, data, generator, **options) -> {name: score}`` (higher = keep) is
    followed by the selection rule of ``scope``. A method whose selection is not a plain top-k (iterative
    rounds inside one pruning step, per-neuron rules) gives ``pruner(model, params, *, sparsity, scope,
    alive, data, generator, **options) -> {name: bool mask}`` instead; it may still give a criterion
    for ``prunelab.scores``.

    A method that prunes while it trains (``when="during"``) gives ``schedule(model, options, *, sparsity,
    data, seed, scope, include_bias)``, an
    object with ``attach(optimizer)`` (training-step hooks), ``after_epoch(epoch, val_loss, val, test, device) ->
    record | None`` (a pruning phase's record, a JSON-able dict), ``describe(record) -> str`` (its log
    line), ``done() -> bool`` and ``stop_reason() -> str`` (stop rule) and ``state() -> (json, tensors)``
    / ``load(state, tensors)`` (resume). ``flags`` names options that are also top-level config keys and
    CLI flags (``--lambda``).
    """

    name: str
    description: str
    criterion: Callable[..., dict[str, torch.Tensor]] | None  # None with no pruner: prunes nothing
    scope: str = "global"          # default selection scope
    when: str = "trained"          # default schedule: "init", "trained" or "during" (prunes while training)
    needs_data: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword options and their defaults
    pruner: Callable[..., dict[str, torch.Tensor]] | None = None
    schedule: Callable[..., Any] | None = None
    structured: bool = False       # masks whole channels: the lab also builds the physically smaller model
    flags: tuple[str, ...] = ()
    own_sparsity: bool = False
    retrain: bool = True
    when_from: Callable[[dict[str, Any]], str | None] | None = None
    validate: Callable[[dict[str, Any]], Any] | None = None  # checks option values before a run starts
    layers: tuple[type, ...] | None = None  # module types whose weights it can prune; None: any prunable one
    # (model, params, data, options) -> None: refuses a structure the method cannot handle (a residual
    # addition) from the weights and one traced example of data, so the lab can call it before training
    check_structure: Callable[..., None] | None = None
    paper: str = ""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise RuntimeError(f"method {method.name!r} registered twice")  # a programming error
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    from . import criteria  # noqa: F401  (registers every method)

    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def check_layers(method: Method, model: torch.nn.Module, params) -> None:
    """Refuse a model whose prunable parameters sit in layers the method cannot prune (an LSTM for a
    channel method), naming the first one: cheap enough to run before any training."""
    if method.layers is None:
        return
    for name in params:
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        if not isinstance(owner, method.layers):
            kinds = " and ".join(t.__name__ for t in method.layers)
            raise PrunelabError(f"method {method.name!r} prunes {kinds} layers only; {name} belongs to "
                                f"{type(owner).__name__} {owner_name!r}")


def method_flags() -> dict[str, tuple[str, ...]]:
    """``{option: methods}`` for every option a method exposes as a top-level key / flag (``mode`` is
    shared by isparse and pfp; the run's method decides whose it is)."""
    flags: dict[str, tuple[str, ...]] = {}
    for m in list_methods():
        for flag in m.flags:
            flags[flag] = (*flags.get(flag, ()), m.name)
    return flags


def list_methods() -> list[Method]:
    from . import criteria  # noqa: F401

    return [METHODS[n] for n in sorted(METHODS)]
