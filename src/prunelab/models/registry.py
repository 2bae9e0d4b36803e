"""Name -> architecture registry, and `build_model`, the one way the rest of prunelab makes a model.

Each architecture module calls `register(...)` at import time; `prunelab.models` imports them all.
A name with a colon, ``"mypkg.models:build"``, is a user's factory instead: an importable callable
(see `import_factory`), called with ``num_classes=`` when it takes that keyword, and the model options.
"""

from __future__ import annotations

import importlib
import inspect
import math
import operator
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..errors import PrunelabError, unknown
from .init import check_bias, initialize, resolve_scheme, uses_std

# Number of classes of each default dataset; a model may be built for another count.
_DATASET_CLASSES = {"mnist": 10, "mnist32": 10, "cifar10": 10}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one architecture.

    `builder(num_classes, **options)` returns a freshly initialised (PyTorch default) module.
    `options` maps each accepted keyword to a one-line description that ends with its default.
    """

    name: str
    description: str
    default_dataset: str
    input_shape: tuple[int, int, int]
    builder: Callable[..., nn.Module] = field(repr=False)
    options: Mapping[str, str] = field(default_factory=dict)


_REGISTRY: dict[str, ModelInfo] = {}


def canonical_name(name: str) -> str:
    """Case-insensitive, '_' accepted for '-': 'LeNet5_Caffe' -> 'lenet5-caffe'."""
    if not isinstance(name, str):
        raise PrunelabError(f"model name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("_", "-")


def register(name, description, default_dataset, input_shape, builder, options=None) -> ModelInfo:
    """Add an architecture; called by the architecture modules when they are imported."""
    key = canonical_name(name)
    if key in _REGISTRY:
        raise RuntimeError(f"model {key!r} registered twice")  # a programming error, not user input
    if default_dataset not in _DATASET_CLASSES:
        raise RuntimeError(f"model {key!r}: unknown default dataset {default_dataset!r}")
    info = ModelInfo(key, description, default_dataset, tuple(input_shape), builder, dict(options or {}))
    _REGISTRY[key] = info
    return info


def list_models() -> list[ModelInfo]:
    """Every registered architecture, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def model_info(name: str) -> ModelInfo:
    key = canonical_name(name)
    if key not in _REGISTRY:
        raise unknown("model", name, _REGISTRY)
    return _REGISTRY[key]


# --- a user's factory: "module.path:callable" -------------------------------------------------

FACTORY_SEPARATOR = ":"


def is_factory(name: Any) -> bool:
    """True for a factory name, ``"module.path:callable"`` (zoo names have no colon)."""
    return isinstance(name, str) and FACTORY_SEPARATOR in name


def import_factory(name: str, what: str = "model") -> Callable[..., Any]:
    """The callable a factory name ``"module.path:callable"`` names (``callable`` may be dotted:
    ``Class.method``). The module is imported from ``sys.path``, with the current folder last, as
    ``python -m`` would. Every failure is one line naming ``what`` (model, dataset) and the name."""
    module_name, _, attribute = (part.strip() for part in name.partition(FACTORY_SEPARATOR))
    if not module_name or not attribute or FACTORY_SEPARATOR in attribute or not all(
            p.isidentifier() for p in (*module_name.split("."), *attribute.split("."))):
        raise PrunelabError(f"invalid {what} factory {name!r}: expected 'module.path:callable', e.g. "
                            f"'mypkg.models:build'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # a module beside the config, as `python -m` finds it
    try:
        target = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module's own code raised while importing
        detail = f"{type(error).__name__}: {error}" if not isinstance(error, ImportError) else str(error)
        first = (detail.strip().splitlines() or [type(error).__name__])[0]
        raise PrunelabError(f"cannot import module {module_name!r} for {what} {name!r}: {first}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise PrunelabError(f"module {module_name!r} has no attribute {attribute!r} (the {what} factory "
                                f"{name!r})")
        target = getattr(target, part)
    if not callable(target):
        raise PrunelabError(f"{what} factory {name!r} is not callable (it is a {type(target).__name__})")
    return target


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none
        return None


def accepts(fn: Callable, keyword: str) -> bool:
    """Whether ``fn`` has a parameter named ``keyword`` (``**kwargs`` does not count: it may forward it)."""
    signature = _signature(fn)
    parameter = signature.parameters.get(keyword) if signature is not None else None
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)


def check_factory_options(name: str, fn: Callable, options: Mapping[str, Any]) -> None:
    """Refuse, before anything is built, options the factory's signature does not take."""
    signature = _signature(fn)
    if signature is None:
        return
    params = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = [k for k, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)]
    bad = sorted(set(options) - set(named))
    if bad:
        allowed = ", ".join(k for k in named if k != "num_classes") or "none"
        raise PrunelabError(f"unknown option {bad[0]!r} for model factory {name!r}; its options: {allowed}")


def _call_factory(name: str, fn: Callable, num_classes: int | None, options: Mapping[str, Any]) -> nn.Module:
    kwargs = dict(options)
    if num_classes is not None and accepts(fn, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = fn(**kwargs)
    except TypeError as error:  # a signature that does not take the options, seen only when called
        first = (str(error).strip().splitlines() or ["TypeError"])[0]
        raise PrunelabError(f"model factory {name!r} refused its arguments ({', '.join(kwargs) or 'none'}): "
                            f"{first}") from None
    if not isinstance(model, nn.Module):
        raise PrunelabError(f"model factory {name!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def build_model(name: str, num_classes: int | None = None, init: str = "default",
                seed: int | None = None, **options: Any) -> nn.Module:
    """Build a registered architecture, or a user's factory ``"module.path:callable"``, and initialise it.

    num_classes: defaults to the class count of the model's default dataset (10).
    init: an initialisation scheme of `initialize` ("default" keeps PyTorch's own).
    seed: if given, construction and initialisation draw from RNGs seeded with it, so one seed
        always gives bit-identical weights; the caller's global RNG state is left untouched.
    options: the architecture's own keywords (see `model_info(name).options`), plus `init_std`,
        the standard deviation of the "normal" and "truncated-normal" schemes (default 0.1), and
        `init_bias`, "zeros" (default) or "vs" (the SNIP code's variance-scaled biases; see `initialize`).
        A factory takes the keywords of its own signature; it gets ``num_classes`` when it has that
        parameter (and num_classes is given), and must return an ``nn.Module``.
    """
    factory = import_factory(name) if is_factory(name) else None
    info = None if factory is not None else model_info(name)
    # Validate everything before building, so a typo fails fast even for the big models.
    init_std = options.pop("init_std", None)
    init_bias = options.pop("init_bias", "zeros")
    scheme = resolve_scheme(init)
    check_bias(init_bias, scheme)
    if init_std is not None:
        if not uses_std(scheme):
            raise PrunelabError(f"init_std applies only to init 'normal' or 'truncated-normal', not {init!r}")
        init_std = check_float("init_std", init_std, low=0.0, low_open=True)
    if factory is not None:
        check_factory_options(name, factory, options)
    else:
        bad = sorted(set(options) - set(info.options))
        if bad:
            allowed = ", ".join(sorted(info.options)) or "none"
            raise PrunelabError(f"unknown option {bad[0]!r} for model {info.name!r}; allowed options: {allowed}")
        if num_classes is None:
            num_classes = _DATASET_CLASSES[info.default_dataset]
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, low=2)
    if seed is not None:
        seed = check_int("seed", seed, low=0)

    def make() -> nn.Module:
        if factory is not None:
            model = _call_factory(name, factory, num_classes, options)
        else:
            model = info.builder(num_classes, **options)
        if scheme != "default":
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            kwargs = {} if init_std is None else {"std": init_std}
            initialize(model, scheme, generator=gen, bias=init_bias, **kwargs)
        return model

    if seed is None:
        return make()
    # fork_rng restores the global CPU RNG on exit; modules are built on the CPU, so no device RNG is used.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --- option checks shared by the builders -------------------------------------------------------

def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PrunelabError(f"option {name!r} must be true or false, got {value!r}")
    return value


def check_int(name: str, value: Any, low: int | None = None) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True as a size is surely a mistake
        raise PrunelabError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise PrunelabError(f"{name} must be an integer, got {value!r}") from None
    if low is not None and value < low:
        raise PrunelabError(f"{name} must be >= {low}, got {value}")
    return value


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrunelabError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise PrunelabError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise PrunelabError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise PrunelabError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_choice(name: str, value: Any, allowed) -> str:
    """Match `value` case-insensitively ('_' for '-') against `allowed`; return the allowed spelling."""
    norm = {a.lower().replace("_", "-"): a for a in allowed}
    key = value.strip().lower().replace("_", "-") if isinstance(value, str) else None
    if key not in norm:
        raise unknown(name, str(value), allowed)
    return norm[key]
