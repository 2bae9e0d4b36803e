"""The method registry: a method is a criterion (scores), a selection rule and a default schedule.

A method module registers itself at import (``register(Method(...))``); every module in
``prunelab.criteria`` is imported by ``prunelab.criteria``, so adding a method is adding one file (or
calling ``register`` from your own code: see ``docs/adding-a-method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import selection
from .errors import PrunelabError, unknown
from .options import NoOptions, Options

WHEN = ("init", "trained", "during")
TARGETS = ("sparsity", "channels", "parameters")
SCHEDULES = ("lobster", "periodic", "iterative")


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``criterion(model, params, *, data, generator, **options) -> {name: score}`` (higher = keep) is
    followed by the selection rule of ``scope`` (``prunelab.selection``). A method whose selection is not
    a plain top-k (per-neuron rules, allocation across layers) gives ``pruner(model, params, *, sparsity,
    scope, alive, data, generator, **options) -> {name: bool mask}`` instead, and may still give a
    criterion for ``prunelab.scores``. ``data`` reaches both as a ``prunelab.data.feed.Feed``.

    ``options``: the method's options dataclass (``prunelab.options``). ``targets``: the amounts it can be
    asked for, passed to the pruner as ``sparsity``: ``"sparsity"`` (fraction of prunable weights),
    ``"channels"`` (fraction of each eligible layer's channels) or ``"parameters"`` (fraction of all
    parameters); none when it decides how much to prune itself. ``target_options``: option values a
    target implies (PFP counts all parameters with ``target="all"``). ``schedule``: the schedule of
    ``prunelab.schedules`` it prunes with while training (``"lobster"``, ``"periodic"``) or in rounds
    (``"iterative"``), if it has its own.
    """

    name: str
    description: str
    criterion: Callable[..., dict[str, torch.Tensor]] | None  # None with no pruner: prunes nothing
    scope: str = "global"          # default selection scope
    when: str = "trained"          # default schedule: "init", "trained" or "during" (prunes while training)
    needs_data: bool = False
    options: type[Options] = NoOptions
    pruner: Callable[..., dict[str, torch.Tensor]] | None = None
    schedule: str | None = None
    structured: bool = False       # masks whole channels: the lab also builds the physically smaller model
    targets: tuple[str, ...] = ("sparsity",)
    target_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # option values per target
    retrain: bool = True           # False: applied to a trained model as it is (no fine-tuning by default)
    when_from: Callable[[Mapping[str, Any]], str | None] | None = None  # the schedule its options imply
    layers: tuple[type, ...] | None = None  # module types whose weights it can prune; None: any prunable one
    data_split: str = "train"      # the lab's split it scores on (PFP's sample S: the validation split)
    # (model, params, data, options) -> None: refuses a structure the method cannot handle (a residual
    # addition) from the weights and one traced example of data, so the lab can call it before training
    check_structure: Callable[..., None] | None = None
    paper: str = ""

    @property
    def prunes(self) -> bool:
        return self.criterion is not None or self.pruner is not None or self.schedule == "lobster"

    def masks(self, model, params, *, sparsity, scope, alive, data, generator,
              **options) -> dict[str, torch.Tensor]:
        """The new masks: the method's own pruner, else its criterion's scores selected by ``scope``."""
        if self.pruner is not None:
            return self.pruner(model, params, sparsity=sparsity, scope=scope, alive=alive, data=data,
                               generator=generator, **options)
        scores = self.criterion(model, params, data=data, generator=generator, **options)
        return selection.select(scores, sparsity, scope, alive)

    def parse_options(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The method's options over their defaults, every value checked (one line naming a bad one)."""
        return self.options.parse(self.name, values).as_dict()


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in METHODS:
        raise PrunelabError(f"method {method.name!r} is already registered")
    bad = set(method.targets) - set(TARGETS)
    if bad or method.when not in WHEN or (method.schedule is not None and method.schedule not in SCHEDULES):
        raise PrunelabError(f"method {method.name!r}: targets must be among {TARGETS}, when among {WHEN}, "
                            f"schedule among {SCHEDULES}")
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
        for flag in m.options.flags():
            flags[flag] = (*flags.get(flag, ()), m.name)
    return flags


def list_methods() -> list[Method]:
    from . import criteria  # noqa: F401

    return [METHODS[n] for n in sorted(METHODS)]
