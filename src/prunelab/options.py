"""Method options: one typed dataclass per method, checked by one shared rule.

A method declares its options once, with their defaults, help and allowed values::

    @dataclass(frozen=True)
    class SnipOptions(Options):
        batches: int = option(1, "scoring batches", low=1)
        bn_mode: str = option("eval", "normalisation statistics while scoring", choices=("eval", "train"))

``SnipOptions.parse("snip", {"batches": 2})`` refuses an unknown key, a value of the wrong type (an int
may stand for a float) or out of range in one line naming the method and the option; ``check`` adds the
rules that tie options together. The CLI's flags and help are generated from the same fields, and
``flag=True`` also makes an option a top-level flag (``--lambda``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

from .errors import PrunelabError


def option(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, open_low: bool = False, open_high: bool = False, flag: bool = False,
           factory: Any = None):
    """A field of an options (or config) dataclass: its default (``factory`` for a list), a help line and
    the allowed values."""
    metadata = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
                "open_high": open_high, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Options:
    """Base of every method's options. Subclasses add fields made with :func:`option`."""

    method: ClassVar[str] = ""

    def check(self) -> None:
        """Rules between options (override); raise PrunelabError naming the problem."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def flags(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("flag"))

    @classmethod
    def help(cls, name: str) -> str:
        spec = next(f for f in fields(cls) if f.name == name)
        allowed = spec.metadata.get("choices")
        extra = f"; one of {', '.join(map(str, allowed))}" if allowed else ""
        return f"{spec.metadata.get('help', '')} (default {spec.default!r}{extra})"

    @classmethod
    def parse(cls, method: str, values: Mapping[str, Any] | None = None) -> "Options":
        """The options of ``values`` over the defaults, every value checked."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PrunelabError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
                                f"allowed: {', '.join(known) or 'none'}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            _check_value(method, name, value, hints[name], known[name].metadata)
        parsed = cls(**values)
        parsed.check()
        return parsed

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


def _check_value(method: str, name: str, value: Any, hint, meta: Mapping[str, Any]) -> None:
    allowed = _allowed_types(hint)
    if value is None:
        if type(None) not in allowed and object not in allowed:
            raise PrunelabError(f"method {method!r} option {name} cannot be None")
        return
    if object not in allowed and not any(_is_instance(value, kind) for kind in allowed):
        names = " or ".join(k.__name__ for k in allowed if k is not type(None))
        raise PrunelabError(f"method {method!r} option {name} must be {names}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise PrunelabError(f"method {method!r} option {name} must be one of: {', '.join(map(str, choices))}; "
                            f"got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta.get("low"), meta.get("high")
        if math.isnan(value) or (low is not None and (value < low or (meta.get("open_low") and value == low))) \
                or (high is not None and (value > high or (meta.get("open_high") and value == high))):
            positive_int = int in allowed and float not in allowed and low == 1 and meta.get("high") is None
            wanted = "a positive integer" if positive_int else f"in {_interval(meta)}"
            raise PrunelabError(f"method {method!r} option {name} must be {wanted}, got {value!r}")


def _allowed_types(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
    if hint is Any:
        return (object,)
    return (typing.get_origin(hint) or hint,)


def _is_instance(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def _interval(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("low"), meta.get("high")
    left = "-inf" if low is None else f"{low}"
    right = "inf" if high is None else f"{high}"
    return f"{'(' if meta.get('open_low') or low is None else '['}{left}, {right}" \
           f"{')' if meta.get('open_high') or high is None else ']'}"
