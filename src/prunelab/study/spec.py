"""A study file: the grid, the shared recipe and per-method overrides, read and checked in full.

    [study]
    methods = ["snip", "synflow"]          # random and magnitude (the baselines) are added unless
    targets = [0.5, 0.8, 0.9, 0.95, 0.98]  # baselines = false; the dense control unless control = false
    seeds = [0, 1, 2]
    models = ["lenet300-100"]              # datasets = [...]: default, each model's own
    sanity = ["shuffle", "reinit"]         # Frankle et al. 2021 checks of the at-initialisation methods
    control = true                         # false: no dense control (a long study whose control exists)
    references = "references.toml"         # the papers' numbers (relative to this file)

    [recipe]                               # any run config key, shared by every run
    epochs = 2

    [methods.magnitude]                    # one method's overrides; also `targets`, `target` (the kind)
    finetune_epochs = 1

    [methods.none]                         # the dense control's overrides (no targets)
    lr = 0.01

Every problem (an unknown key or method, a target out of range) is one PrunelabError line naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..errors import PrunelabError
from ..lab.config import fold_method_flags
from ..methods import get_method

SANITY = ("shuffle", "reinit")
BASELINES = ("random", "magnitude")
# set by the grid, never by the recipe or a method's table
GRID_KEYS = ("model", "dataset", "method", "seed", "sparsity", "channels", "parameters", "out")
STUDY_KEYS = ("name", "description", "models", "datasets", "methods", "targets", "seeds", "sanity",
              "baselines", "control", "references")
METHOD_KEYS = ("targets", "target")  # besides run config keys


@dataclass(frozen=True)
class StudySpec:
    """What a study file asks for, checked. ``methods`` are the pruning methods in the order given, the
    baselines appended; the dense control (method ``none``) is implied. ``overrides[m]`` holds method
    m's run config keys; ``targets[m]`` and ``kinds[m]`` its target values and kind (None: the method
    decides how much to prune). ``control`` False leaves the dense control out (the report says so)."""

    path: Path
    name: str
    description: str
    models: tuple[str, ...]
    datasets: tuple[str | None, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    sanity: tuple[str, ...]
    recipe: dict[str, Any]
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, tuple[float, ...]] = field(default_factory=dict)
    kinds: dict[str, str | None] = field(default_factory=dict)
    references: Path | None = None
    control: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The spec as study.json records it (paths as given, relative to the study file)."""
        return {"name": self.name, "description": self.description, "models": list(self.models),
                "datasets": list(self.datasets), "methods": list(self.methods), "seeds": list(self.seeds),
                "sanity": list(self.sanity), "recipe": self.recipe, "overrides": self.overrides,
                "targets": {m: list(t) for m, t in self.targets.items()}, "kinds": self.kinds,
                "control": self.control}


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study file; PrunelabError (one line, naming the file) on any problem."""
    path = Path(path)
    raw = checkpoint.read_toml(path, "study file")
    try:
        return parse_spec(raw, path)
    except PrunelabError as error:
        raise PrunelabError(f"{path}: {error}") from None


def parse_spec(raw: dict[str, Any], path: Path) -> StudySpec:
    unknown = sorted(set(raw) - {"study", "recipe", "methods"})
    if unknown:
        raise PrunelabError(f"unknown table or key {unknown[0]!r}; a study file has [study], [recipe] and "
                            "[methods.NAME]")
    study = _table(raw, "study")
    for key in study:
        if key not in STUDY_KEYS:
            raise PrunelabError(f"invalid key {key!r} in [study]; valid keys: {', '.join(STUDY_KEYS)}")
    recipe = _settings(_table(raw, "recipe"), "[recipe]")
    methods = _names(study, "methods", required=True)
    for name in methods:
        get_method(name)  # an unknown method: its error lists the known ones
    methods = [m for m in methods if m != "none"]  # the dense control is always there
    if _bool(study, "baselines", True):
        methods += [m for m in BASELINES if m not in methods]
    if len(set(methods)) != len(methods):
        raise PrunelabError(f"[study] methods lists a method twice: {', '.join(methods)}")
    tables = _table(raw, "methods")
    overrides, targets, kinds = {}, {}, {}
    shared = _fractions(study.get("targets"), "[study] targets") if "targets" in study else None
    for name, table in tables.items():
        if name not in methods and name != "none":
            raise PrunelabError(f"[methods.{name}] configures a method that is not in [study] methods "
                                f"({', '.join(methods)})")
        if not isinstance(table, dict):
            raise PrunelabError(f"methods.{name} must be a table ([methods.{name}])")
    for name in methods:
        table = dict(tables.get(name, {}))
        method = get_method(name)
        kind = table.pop("target", method.targets[0] if method.targets else None)
        if method.targets and kind not in method.targets:
            raise PrunelabError(f"[methods.{name}] target {kind!r}: method {name!r} aims at "
                                f"{' or '.join(method.targets)}")
        if not method.targets and kind is not None:
            raise PrunelabError(f"[methods.{name}] target: method {name!r} decides how much to prune itself")
        values = _fractions(table.pop("targets"), f"[methods.{name}] targets") if "targets" in table else shared
        if kind is not None and not values:
            raise PrunelabError(f"method {name!r} needs targets ({kind} fractions in (0, 1)): give [study] "
                                f"targets or [methods.{name}] targets")
        kinds[name] = kind
        targets[name] = tuple(values) if kind is not None else ()
        overrides[name] = _settings(table, f"[methods.{name}]")
    # [methods.none]: the dense control's own settings (a net that diverges at the methods' learning rate)
    control = dict(tables.get("none", {}))
    if control.keys() & set(METHOD_KEYS):
        raise PrunelabError("[methods.none] sets targets: the dense control prunes nothing")
    if control:
        overrides["none"] = _settings(control, "[methods.none]")
    seeds = study.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
        raise PrunelabError(f"[study] seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise PrunelabError(f"[study] seeds lists a seed twice: {seeds}")
    sanity = _names(study, "sanity")
    for check in sanity:
        if check not in SANITY:
            raise PrunelabError(f"[study] sanity: unknown check {check!r}; choose from: {', '.join(SANITY)}")
    models = _names(study, "models", required=True)
    datasets = _names(study, "datasets") or [None]
    references = study.get("references")
    if references is not None and not isinstance(references, str):
        raise PrunelabError(f"[study] references must be a file name, got {references!r}")
    for key in ("name", "description"):
        if not isinstance(study.get(key, ""), str):
            raise PrunelabError(f"[study] {key} must be a string")
    return StudySpec(path=path, name=study.get("name") or path.stem, description=study.get("description", ""),
                     models=tuple(models), datasets=tuple(datasets), methods=tuple(methods), seeds=tuple(seeds),
                     sanity=tuple(sanity), recipe=recipe, overrides=overrides, targets=targets, kinds=kinds,
                     references=(path.parent / references) if references else None,
                     control=_bool(study, "control", True))


def _table(raw: dict, name: str) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise PrunelabError(f"{name} must be a table ([{name}])")
    return value


def _settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Run config keys (method flags folded into method_options), every key and type checked."""
    for key in values:
        if key in GRID_KEYS:
            raise PrunelabError(f"{where} sets {key!r}, which the grid decides: use [study] "
                                + {"model": "models", "dataset": "datasets", "method": "methods",
                                   "seed": "seeds", "out": "the study folder (--out)"}.get(key, "targets"))
        if key in METHOD_KEYS:
            raise PrunelabError(f"{where} sets {key!r}, which belongs in a [methods.NAME] table")
    try:
        return fold_method_flags(values)
    except PrunelabError as error:
        raise PrunelabError(f"{where}: {error}") from None


def _names(study: dict, key: str, required: bool = False) -> list[str]:
    value = study.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or any(not isinstance(v, str) or not v for v in value):
        raise PrunelabError(f"[study] {key} must be a list of names, got {value!r}")
    if required and not value:
        raise PrunelabError(f"[study] {key} is missing or empty")
    return list(value)


def _bool(study: dict, key: str, default: bool) -> bool:
    value = study.get(key, default)
    if not isinstance(value, bool):
        raise PrunelabError(f"[study] {key} must be true or false, got {value!r}")
    return value


def _fractions(values: Any, where: str) -> list[float]:
    if not isinstance(values, list) or not values:
        raise PrunelabError(f"{where} must be a non-empty list of fractions in (0, 1), got {values!r}")
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or not 0.0 < value < 1.0:
            raise PrunelabError(f"{where}: {value!r} is out of range; a target is a fraction in (0, 1)")
        checked.append(float(value))
    if len(set(checked)) != len(checked):
        raise PrunelabError(f"{where} lists a target twice: {values}")
    return checked


__all__ = ["BASELINES", "SANITY", "StudySpec", "load_spec", "parse_spec"]
