"""Typed run configuration: one dataclass whose fields are both the TOML keys and the CLI flags.

A config file is the reproducible record of a run: ``prunelab run CONFIG.toml`` reads one (flat keys,
plus the ``[model_options]`` and ``[method_options]`` tables), flags given beside it override it, and
every run folder stores the complete config it ran with as ``config.toml``.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..errors import PrunelabError
from ..options import option
from ..training import TrainConfig

WHEN = ("init", "trained", "during")
SCOPES = ("global", "layer")
SPLITS = ("train", "val")
REWIND = ("none", "init", "early")


@dataclass
class RunConfig(TrainConfig):
    """Every setting of a run: TrainConfig's training settings and the keys below. Each field's help is
    its CLI flag's help."""

    # what to prune
    model: str = option("", "architecture (prunelab list models)")
    dataset: str | None = option(None, "dataset (prunelab list datasets); default: the model's own")
    method: str = option("none", "pruning method (prunelab list methods); 'none' trains the dense reference")
    sparsity: float = option(0.0, "target fraction of the prunable weights removed, in [0, 1)")
    channels: float = option(0.0, "target fraction of each eligible layer's channels removed (pfec, softnet, "
                                  "nisp), in [0, 1)")
    parameters: float = option(0.0, "target fraction of all parameters removed (pfp's PR), in [0, 1)")
    scope: str | None = option(None, "selection scope: global | layer (default: the method's)")
    when: str | None = option(None, "init (prune, then train) | trained (train, prune, fine-tune) | during "
                                    "(prune while training: lobster, isparse --mode train-with, or any "
                                    "score-based method gradually); default: the method's")
    rounds: int = option(1, "iterative pruning rounds, each keeping the same fraction of the survivors")
    rewind: str = option("none", "after each round: none (fine-tune) | init | early (lottery-ticket rewinding)")
    rewind_iteration: int = option(0, "pre-training step rewound to when rewind = early")
    include_bias: bool = option(False, "prune biases too")
    reinit: bool = option(False, "when = init: train a fresh draw of the initialisation under the masks "
                                 "(SNIP's official code), not the scored weights")
    reinit_init: str | None = option(None, "with reinit: the fresh draw's initialisation (default: init)")
    prune_every: int | None = option(None, "when = during, for a score-based method: steps between gradual "
                                           "pruning steps (default: one epoch)")
    prune_end: int | None = option(None, "when = during: the step at which the cubic schedule reaches the "
                                         "target (default: 3/4 of the budget)")
    method_options: dict[str, Any] = option(None, "method option KEY=VALUE (repeatable)", factory=dict)
    prune_data: str | None = option(None, "the split a data-driven method scores on: train | val (default: the "
                                          "method's: val for PFP's sample S, train for the others)")
    # model and data
    init: str = option("default", "initialisation: default | vs-h | vs-x | vs | normal | truncated-normal")
    model_options: dict[str, Any] = option(None, "model option KEY=VALUE, e.g. relu=true (repeatable)",
                                           factory=dict)
    data_root: str | None = option(None, "data folder (default: $PRUNELAB_DATA, else the user cache)")
    val_fraction: float = option(0.1, "fraction of the training set held out for validation, in [0, 1)")
    normalize_inputs: bool = option(True, "standardise inputs with the dataset mean/std (false: pixels in "
                                          "[0, 1], as NNrelief)")
    # training after pruning (the training settings themselves are TrainConfig's)
    finetune_epochs: int | None = option(None, "training epochs after each pruning step of a trained model "
                                               "(fine-tuning, or retraining after a rewind; 0: none); default: "
                                               "the training budget")
    finetune_lr: float | None = option(None, "fine-tuning learning rate (default: lr)")
    finetune_milestones: list[int] | None = option(None, "fine-tuning multistep decay points, in its epochs "
                                                         "(default: milestones)")
    keep_best: bool = option(False, "end each training stage with the weights of its epoch with the lowest "
                                    "validation error (the test set is never used)")
    pretrained_run: str | None = option(None, "when = trained: a finished dense run (method none) of this run's "
                                              "model, data, seed and training settings, whose weights stand in "
                                              "for the pre-training (the same weights: checked by digest)")
    # run
    seed: int = option(0, "seed of every random choice (initialisation, split, batches, random methods)")
    out: str | None = option(None, "run folder (default: runs/<model>_<dataset>_<method>_<hash>); an "
                                   "existing one resumes")
    device: str = option("cpu", "torch device, e.g. cpu, cuda, or auto (cuda when torch sees a GPU, else cpu)")
    threads: int | None = option(None, "CPU threads for torch")
    latency: bool = option(True, "measure CPU inference latency at the end")

    def __post_init__(self):
        pass  # the training settings are checked by resolve (train_config), with the rest of the run

    def targets(self) -> dict[str, float]:
        """The pruning targets given (non-zero): ``{"sparsity": 0.9}`` and the like."""
        return {k: getattr(self, k) for k in ("sparsity", "channels", "parameters") if getattr(self, k)}

    def train_config(self, finetune: bool = False) -> TrainConfig:
        keys = {f.name for f in fields(TrainConfig)}
        values = {k: v for k, v in asdict(self).items() if k in keys}
        if finetune:
            if self.finetune_epochs is not None:
                values.update(epochs=self.finetune_epochs, iterations=None)
            if self.finetune_lr is not None:
                values["lr"] = self.finetune_lr
            if self.finetune_milestones is not None:
                values["milestones"] = list(self.finetune_milestones)
            values["warmup"] = 0
        return TrainConfig(**values)

    def digest(self, legacy: bool = False) -> str:
        """Hash of the settings that change the result (not where it is written, nor which folder the
        checksummed data is read from). ``legacy``: the hash before data_root left it, which older run
        folders hold."""
        ignored = set(UNHASHED) - {"data_root"} if legacy else UNHASHED
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        for key, default in LATER_KEYS.items():  # keys added later count only when changed, so that
            if relevant.get(key) == default:      # run folders started before them still resume
                relevant.pop(key)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]


# where a run is written, how fast, which folder its checksummed data comes from, and where its identical
# pre-training is read from: never its result
UNHASHED = ("out", "threads", "latency", "data_root", "pretrained_run")
LATER_KEYS = {"normalize_inputs": True, "keep_best": False, "reinit_init": None, "channels": 0.0, "parameters": 0.0,
              "prune_every": None, "prune_end": None, "eval_batch_size": 1000, "amp": False,
              "channels_last": False, "prune_data": "train", "finetune_milestones": None}
_TRAINING = {f.name for f in fields(TrainConfig)}
# the run's own keys first (what to prune, model and data), then the training settings
FIELDS = {f.name: f for f in sorted(fields(RunConfig), key=lambda f: f.name in _TRAINING)}


def field_kind(name: str) -> type:
    """The plain type of a config key: int, float, str, bool, list or dict."""
    hint = typing.get_type_hints(RunConfig)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def coerce(name: str, value: Any) -> Any:
    """Check and convert one config value; a clear error names the key and the expected type."""
    if name not in FIELDS:
        raise PrunelabError(f"invalid config key {name!r}; valid keys: {', '.join(FIELDS)}")
    kind = field_kind(name)
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or any(
                    isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in items):
                raise TypeError
            return [int(v) for v in items if str(v).strip() != ""]
        if kind is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        return str(value)
    except (TypeError, ValueError):
        expected = {list: "a list of integers", dict: "a table"}.get(kind, kind.__name__)
        raise PrunelabError(f"invalid value for {name}: {value!r} (expected {expected})") from None


def make_config(values: dict[str, Any]) -> RunConfig:
    return RunConfig(**{k: coerce(k, v) for k, v in values.items()})


CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # shipped with the package


def list_configs() -> list[str]:
    """The names of the configs shipped with prunelab (``prunelab run NAME`` runs one)."""
    return sorted(p.stem for p in CONFIGS.glob("*.toml"))


def find_config(name: str | Path) -> Path:
    """A config file: the path given, or the shipped config of that name (``quickstart``)."""
    path = Path(name)
    if path.exists() or path.suffix == ".toml" or path.parent != Path("."):
        return path
    shipped = CONFIGS / f"{name}.toml"
    if shipped.exists():
        return shipped
    raise PrunelabError(f"config {name!r} is neither a file nor a shipped config; shipped: "
                        f"{', '.join(list_configs())}")


def read_toml(path: str | Path) -> dict[str, Any]:
    return fold_method_flags(checkpoint.read_toml(find_config(path), "config file"))


def fold_method_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Move method flags given as top-level keys (``lambda = 1e-4``) into ``method_options``, then check
    every key and type before anything runs."""
    from ..methods import method_flags

    flags = method_flags()
    values = dict(values)
    options = values.get("method_options") or {}
    if not isinstance(options, dict):
        raise PrunelabError(f"invalid value for method_options: {options!r} (expected a table)")
    options = dict(options)
    for key in [k for k in values if k in flags and k not in FIELDS]:
        if key in options and options[key] != values[key]:
            raise PrunelabError(f"method option {key} given twice: {values[key]!r} as a key of its own and "
                                f"{options[key]!r} in method_options")
        options[key] = values.pop(key)
    if options:
        values["method_options"] = options
    for key in values:
        if key not in FIELDS:
            raise PrunelabError(f"invalid config key {key!r}; valid keys: {', '.join([*FIELDS, *flags])}")
        coerce(key, values[key])
    return values


def to_toml(config: RunConfig) -> str:
    """Render a config as TOML (flat keys, then the two option tables); None values are omitted."""
    plain, tables = [], []
    values = asdict(config)
    for name, value in ((name, values[name]) for name in FIELDS):
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append(f"\n[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in value.items()))
        else:
            plain.append(f"{name} = {_toml_value(value)}\n")
    return "".join(plain) + "".join(tables)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def option_value(text: str) -> Any:
    """Parse a KEY=VALUE option's value from the command line: bool, int, float, else string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def defaults() -> dict[str, Any]:
    return {f.name: (f.default if f.default is not MISSING else f.default_factory()) for f in fields(RunConfig)}


HELP = {name: f.metadata["help"] for name, f in FIELDS.items()}
