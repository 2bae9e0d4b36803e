"""One run of the lab: data, model, a plan of stages (train / prune / rewind), checkpoints, result.

A run is a list of stages executed in order. After every training epoch and every pruning step the
run folder gets a checkpoint (weights, masks, optimizer state) and ``state.json`` saying how far the run
got; a run started again on the same folder with the same config continues from there and ends with
the same result as an uninterrupted run, because every epoch's randomness derives from (seed, stage,
epoch) and the learning rate is a pure function of the step.

Run folder: ``config.toml``, ``state.json``, ``ckpt-*.safetensors`` (the latest only), ``rewind.safetensors``
(weights rewound to), ``model.safetensors`` (final weights and masks), ``model.sparse.safetensors`` (the
pruned model's kept values and bitmasks: ``prunelab.sparse``; sizes in ``result.json``'s ``file_bytes``),
``log.txt``, ``result.json``, and
while a process runs it, ``LOCK`` (a second process on the same folder is refused; see lock.py).

Under ``torchrun`` a run is data-parallel (docs/distributed.md): every rank builds the same model and data
and runs the same stages; rank 0 alone writes the folder (``distributed.on_main``) and its pruning
decisions are broadcast to the others, whose masks are checked after every pruning step and epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, checkpoint, distributed, masking, metrics, pruning, schedules
from ..data import dataset_info, load_dataset, load_factory_dataset
from ..data.feed import as_feed, example_input, to_model
from ..data.registry import dataset_factory
from ..errors import PrunelabError, TrainingDiverged
from ..methods import check_layers
from ..models import build_model, model_info
from ..models.registry import check_factory_options, import_factory, is_factory
from ..models.init import resolve_scheme
from ..training import Trainer, derive_seed, evaluate
from . import lock
from . import state as run_state
from .config import REWIND, SCOPES, SPLITS, UNHASHED, WHEN, RunConfig, to_toml

RESULT_SCHEMA = "prunelab.result/1"
KEEP_PREFIX = "keep::"  # checkpoint tensors: keep_best's weights of the stage's best epoch so far


@dataclass(frozen=True)
class Stage:
    kind: str                 # "train" | "prune" | "rewind"
    name: str                 # "train", "pretrain", "finetune", "retrain", "prune-1", ...
    finetune: bool = False    # train stages: use the fine-tuning budget and learning rate

    @property
    def round(self) -> int:
        """A prune stage's round (1-based): the schedule's round targets decide its amount."""
        return int(self.name.rpartition("-")[2]) if "-" in self.name else 1


def resolve(config: RunConfig) -> RunConfig:
    """Fill defaults that depend on other settings and check every value before any work starts.

    ``model`` and ``dataset`` may name a user's factories, ``"module.path:callable"``: they are imported
    here (a name that does not resolve is refused in one line) and called when the run starts."""
    model_name, dataset = _resolve_names(config)
    method = pruning.get_method(config.method)
    options = method.parse_options(config.method_options)
    implied = method.when_from(options) if method.when_from else None
    if config.when and implied and config.when != implied:
        raise PrunelabError(f"when = {config.when!r} contradicts the options of method {method.name!r}, "
                            f"which prune {implied!r}")
    when = config.when or implied or method.when
    scope = config.scope or method.scope
    for key, value, allowed in (("when", when, WHEN), ("scope", scope, SCOPES), ("rewind", config.rewind, REWIND)):
        if value not in allowed:
            raise PrunelabError(f"invalid {key} {value!r}; choose from: {', '.join(allowed)}")
    if when == "during" and method.schedule == "iterative":
        raise PrunelabError(f"method {method.name!r} prunes in rounds between trainings: when = 'trained' "
                            "with rounds")
    if when != "during" and method.schedule == "lobster":
        raise PrunelabError(f"method {method.name!r} prunes while training: when = 'during'")
    if method.name == "none":
        if config.targets():
            raise PrunelabError("method 'none' trains the dense model; give --method to prune "
                                f"({', '.join(f'{k} {v}' for k, v in config.targets().items())} requested)")
    else:
        pruning.check_target(method, **config.targets())
    if when != "during" and (config.prune_every is not None or config.prune_end is not None):
        raise PrunelabError("prune_every and prune_end apply to gradual pruning while training (when = 'during')")
    if config.keep_best and (when == "during" or config.val_fraction <= 0):
        raise PrunelabError("keep_best chooses epochs on validation data: it needs val_fraction > 0 and a "
                            "schedule that does not prune while training")
    if when == "during" and config.val_fraction <= 0:
        raise PrunelabError(f"method {method.name!r} decides on validation data: val_fraction must be > 0")
    if config.rounds < 1:
        raise PrunelabError(f"rounds must be >= 1, got {config.rounds}")
    for key in ("prune_every", "prune_end"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise PrunelabError(f"{key} must be >= 1, got {getattr(config, key)}")
    if when == "init" and (config.rounds > 1 or config.rewind != "none"):
        raise PrunelabError("rounds and rewind apply to pruning a trained model (when = 'trained')")
    if config.rewind == "early" and config.rewind_iteration < 1:
        raise PrunelabError("rewind = 'early' needs rewind_iteration >= 1, the pre-training step rewound to")
    if config.rewind != "early" and config.rewind_iteration:
        raise PrunelabError(f"rewind_iteration applies to rewind = 'early', not {config.rewind!r}")
    if when != "trained" and (config.finetune_epochs is not None or config.finetune_lr is not None
                              or config.finetune_milestones is not None):
        raise PrunelabError(f"finetune_epochs, finetune_lr and finetune_milestones apply to pruning a trained "
                            f"model (when = 'trained'), not when = {when!r}")
    prune_data = config.prune_data or method.data_split
    if prune_data not in SPLITS:
        raise PrunelabError(f"invalid prune_data {prune_data!r}; choose from: {', '.join(SPLITS)}")
    if prune_data == "val" and config.val_fraction <= 0 and method.needs_data:
        raise PrunelabError(f"method {method.name!r} scores on the validation split (prune_data = 'val'): "
                            "val_fraction must be > 0")
    if config.pretrained_run is not None and (when != "trained" or config.rewind == "early"):
        raise PrunelabError("pretrained_run stands in for the pre-training of a run that prunes a trained model "
                            "(when = 'trained'), without rewind = 'early' (which keeps a step from inside it)")
    if config.reinit and when != "init":
        raise PrunelabError("reinit applies to pruning at initialisation (when = 'init')")
    if config.reinit_init is not None:
        if not config.reinit:
            raise PrunelabError("reinit_init names the initialisation of reinit's fresh draw: set reinit = true")
        resolve_scheme(config.reinit_init)
    device = _resolve_device(config.device)
    if isinstance(config.seed, bool) or not 0 <= config.seed < 2**63:
        raise PrunelabError(f"seed must be an integer in [0, 2**63), got {config.seed}")
    for name, value in asdict(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise PrunelabError(f"{name} must be a finite number, got {value}")
    budget = config.iterations if config.iterations is not None else config.epochs
    if budget == 0 and when != "init":
        raise PrunelabError("a training budget of 0 trains nothing; give epochs or iterations >= 1 (a budget of "
                            "0 is meaningful only with when = 'init': prune at initialisation and evaluate)")
    if config.threads is not None and config.threads < 1:
        raise PrunelabError(f"threads must be >= 1, got {config.threads}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise PrunelabError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    finetune_epochs = config.finetune_epochs
    if when == "trained" and not method.retrain and finetune_epochs is None and config.rewind == "none":
        finetune_epochs = 0  # applied to a trained model as it is: no fine-tuning unless asked for
    # a step budget overrides epochs: drop them, so that one experiment has one digest however it is given
    epochs = None if config.iterations is not None else config.epochs
    resolved = replace(config, model=model_name, dataset=dataset, when=when, scope=scope,
                       finetune_epochs=finetune_epochs, epochs=epochs, device=device, prune_data=prune_data)
    resolved.train_config()  # validates the optimizer and schedule settings
    return resolved


def _resolve_names(config: RunConfig) -> tuple[str, str]:
    """The model's and the dataset's names: zoo names made canonical, factory names checked (imported,
    callable, the model options in the factory's signature). A factory model needs a dataset."""
    if is_factory(config.model):
        model_name = config.model.strip()
        check_factory_options(model_name, import_factory(model_name, "model"),
                              {k: v for k, v in config.model_options.items() if k not in ("init_std", "init_bias")})
        if not config.dataset:
            raise PrunelabError(f"model {model_name!r} is a factory: give the dataset it trains on (dataset = "
                                "a zoo dataset, or a factory 'module.path:callable' of (train, val, test))")
        info = None
    else:
        info = model_info(config.model)
        model_name = info.name
    dataset = config.dataset or info.default_dataset
    if is_factory(dataset):
        dataset = dataset.strip()
        dataset_factory(dataset)
        return model_name, dataset
    data = dataset_info(dataset)
    if info is not None and tuple(data.input_shape) != tuple(info.input_shape):
        raise PrunelabError(f"model {info.name} expects inputs of shape {tuple(info.input_shape)}, "
                            f"dataset {data.name} gives {tuple(data.input_shape)}")
    return model_name, data.name


def _label(name: str) -> str:
    """A model or dataset name as part of a folder name: a factory's colon becomes a dot."""
    return name.replace(":", ".")


def _resolve_device(name: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU (resolved here, so the run's digest and
    config name the device it really ran on); any other name is checked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    _check_device(name)
    return name


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise PrunelabError(f"invalid device {name!r}; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunelabError(f"device {name!r}: this torch sees no CUDA GPU; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PrunelabError(f"device {name!r} is not supported; use cpu or cuda")


# what only a pruning run has: the dense run of a config keeps the rest, its model, data, seed and training
PRUNING_KEYS = {"sparsity": 0.0, "channels": 0.0, "parameters": 0.0, "scope": None, "when": None, "rounds": 1,
                "rewind": "none", "rewind_iteration": 0, "include_bias": False, "reinit": False,
                "reinit_init": None, "prune_every": None, "prune_end": None, "method_options": {},
                "prune_data": None, "finetune_epochs": None, "finetune_lr": None, "finetune_milestones": None,
                "pretrained_run": None}


def dense_twin(config: RunConfig) -> RunConfig:
    """The dense run (method none) whose training is ``config``'s pre-training, resolved: with the same
    model, initialisation, data, seed and training settings its stage 0 trains the same weights (every
    epoch's randomness derives from the seed, the stage and the epoch)."""
    return resolve(replace(config, method="none", **PRUNING_KEYS))


def plan(config: RunConfig) -> list[Stage]:
    """The stages of a resolved config."""
    if config.method == "none":
        return [Stage("train", "train")]
    if config.when == "during":
        return [Stage("train", config.method)]  # the method's schedule prunes inside this stage
    if config.when == "init":
        reinit = [Stage("rewind", "reinit")] if config.reinit else []
        return [Stage("prune", "prune"), *reinit, Stage("train", "train")]
    stages = [Stage("train", "pretrain")]
    for r in range(1, config.rounds + 1):
        stages.append(Stage("prune", f"prune-{r}"))
        if config.rewind != "none":
            # retrain after rewinding: the full training budget (LTH), or the fine-tuning one when given
            stages += [Stage("rewind", f"rewind-{r}"),
                       Stage("train", f"retrain-{r}", finetune=config.finetune_epochs is not None)]
        else:
            if config.finetune_epochs != 0:  # 0: applied without retraining (iSparse's sparsify-with)
                stages.append(Stage("train", f"finetune-{r}", finetune=True))
    return stages


def default_out(config: RunConfig) -> Path:
    folder = Path("runs") / f"{_label(config.model)}_{_label(config.dataset)}_{config.method}_{config.digest()}"
    legacy = folder.with_name(folder.name.rpartition("_")[0] + "_" + config.digest(legacy=True))
    return legacy if legacy.is_dir() and not folder.exists() else folder  # resume a folder named before


class Run:
    def __init__(self, config: RunConfig, progress: bool | None = None,
                 echo: Callable[[str], None] | None = print):
        self.config = resolve(config)
        self.out = Path(self.config.out) if self.config.out else default_out(self.config)
        self.device = distributed.setup(self.config.device)  # joins torchrun's process group, if any
        self.main = distributed.is_main()  # rank 0 (or the only process): writes the folder and prints
        self.progress, self.echo = (progress, echo) if self.main else (False, None)
        self.stages = plan(self.config)

    # -- logging -------------------------------------------------------------------------------------
    def log(self, message: str, echo: bool = True) -> None:
        if not self.main:
            return
        with open(self.out / "log.txt", "a") as handle:
            handle.write(message + "\n")
        if self.echo and echo:
            self.echo(message)

    # -- state ---------------------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        path = self.out / "state.json"
        if not path.exists():
            return None
        state = run_state.check(checkpoint.read_json(path, dict), self.out, len(self.stages))
        if state.get("config_digest") not in (self.config.digest(), self.config.digest(legacy=True)):
            raise PrunelabError(f"run folder {self.out} holds a run with a different config"
                                f"{self._differences()}; choose another --out or delete that folder")
        return state

    def _differences(self) -> str:
        """' (lr 0.5 there, 0.1 here; ...)': what the folder's config.toml says against this config."""
        try:
            with open(self.out / "config.toml", "rb") as handle:
                there = tomllib.load(handle)
        except (OSError, ValueError):
            return ""
        here = asdict(self.config)
        changed = [f"{key} {there.get(key)!r} there, {value!r} here" for key, value in here.items()
                   if key not in UNHASHED and there.get(key) != value]
        return f" ({'; '.join(changed)})" if changed else ""

    def _claim_folder(self, ours: bool) -> None:
        """Create the run folder; refuse a path that is a file, or a non-empty folder that holds no run
        (``ours``: it holds this config's state.json), so that no file of the user's is overwritten."""
        if self.out.exists() and not self.out.is_dir():
            raise PrunelabError(f"run folder {self.out} is a file; choose another --out")
        if not ours and self.out.is_dir() and any(p.name != lock.NAME for p in self.out.iterdir()):
            raise PrunelabError(f"{self.out} is not empty and holds no prunelab run (no state.json); choose "
                                "another --out, so that its files are not overwritten")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PrunelabError(f"cannot create the run folder {self.out}: {error.strerror or error}") from None

    def _save(self, state: dict, optimizer=None, extra: dict | None = None) -> None:
        if not self.main:
            return
        name = f"ckpt-{state['stage']:03d}-{state['epoch']:04d}.safetensors"
        tensors = {**checkpoint.model_tensors(self.model), **(extra or {})}
        rest = {}
        if optimizer is not None:
            optim_tensors, rest = checkpoint.optimizer_tensors(optimizer)
            tensors.update(optim_tensors)
        checkpoint.save_tensors(self.out / name, tensors, {"optimizer": rest})
        previous = state.get("checkpoint")
        state["checkpoint"] = name
        if previous and previous != name:
            state["digests"].pop(previous, None)
        run_state.record(state, self.out, name)
        checkpoint.write_json(self.out / "state.json", state)  # the commit point of the checkpoint
        if previous and previous != name:
            (self.out / previous).unlink(missing_ok=True)

    # -- the run -------------------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.config
        self.started = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # refuses a folder holding another config before any work (rank 0 reads it; every rank stops)
        state = distributed.on_main(self._load_state)
        # model, then data: bad input fails here (cheapest check first), before the run folder is touched;
        # a factory's data comes first, as the model is built for its class count
        if is_factory(cfg.dataset):
            self._load_data()
        else:
            self.num_classes = dataset_info(cfg.dataset).num_classes
        self.model = build_model(cfg.model, num_classes=self.num_classes,
                                 init=cfg.init, seed=cfg.seed, **cfg.model_options).to(self.device)
        masking.require_prunable(self.model)
        method = pruning.get_method(cfg.method)
        params = masking.prunable_parameters(self.model, include_bias=cfg.include_bias)
        check_layers(method, self.model, params)
        if cfg.sparsity:
            pruning.check_keeps_some(params, cfg.sparsity)
        if not is_factory(cfg.dataset):
            self._load_data()
        else:
            self._check_factory_data()
        if method.check_structure is not None:
            method.check_structure(self.model, params, self.test, method.parse_options(cfg.method_options))
        if cfg.rewind == "early":
            steps = cfg.train_config().total_steps(max(as_feed(self.train).num_batches(cfg.batch_size,
                                                                                       drop_last=False), 1))
            if cfg.rewind_iteration > steps:
                raise PrunelabError(f"rewind_iteration {cfg.rewind_iteration} is past the end of pre-training "
                                    f"({steps} steps)")
        with contextlib.ExitStack() as held:
            def open_folder() -> tuple[dict, dict | None]:  # rank 0 only: the folder's files are its own
                self._claim_folder(ours=state is not None)
                held.enter_context(lock.hold(self.out))
                # read again under the lock: a process that held the folder may have moved the run on
                return self._open(self._load_state())

            state, finished = distributed.on_main(open_folder)  # every rank gets rank 0's state
            if finished is not None:
                return finished
            return self._continue(state)

    def _load_data(self) -> None:
        """The train, validation and test sets: a zoo dataset's (val_fraction, normalize_inputs, data_root
        apply), or what a factory returns (its own split; called with seed= when it takes it)."""
        cfg = self.config
        if is_factory(cfg.dataset):
            self.train, self.val, self.test, self.num_classes = load_factory_dataset(cfg.dataset, seed=cfg.seed)
        else:
            self.train, self.val, self.test = load_dataset(cfg.dataset, root=cfg.data_root,
                                                           val_fraction=cfg.val_fraction, seed=cfg.seed,
                                                           normalize_inputs=cfg.normalize_inputs)

    def _check_factory_data(self) -> None:
        """A factory's data against the model and the schedule: a zoo model's input shape, validation
        data where the schedule decides on it."""
        cfg = self.config
        if not is_factory(cfg.model):
            expected = tuple(model_info(cfg.model).input_shape)
            try:
                given = as_feed(self.train).input_shape()
            except PrunelabError:
                given = None
            if given != expected:
                raise PrunelabError(f"model {cfg.model} expects inputs of shape {expected}, dataset {cfg.dataset} "
                                    f"gives {given}")
        if len(self.val) == 0 and (cfg.keep_best or cfg.when == "during"):
            raise PrunelabError(f"dataset {cfg.dataset} gives no validation data, which "
                                f"{'keep_best' if cfg.keep_best else 'pruning while training'} decides on")

    def _open(self, state: dict | None) -> tuple[dict, dict | None]:
        """Make the folder ready to start or resume from `state` (None: from the beginning): the state to
        go on from, or the stored result of a finished run. Rank 0 alone runs this."""
        cfg = self.config
        if state is not None and state.get("checkpoint") is None:
            state = None  # stopped before its first checkpoint: start again
        if state is not None and state["stage"] == len(self.stages) and (self.out / "result.json").exists():
            return state, self._finished(state)
        if state is None:
            state = run_state.fresh(self.config.digest())
            checkpoint.write_json(self.out / "state.json", state)  # the folder is a run folder from now on
        self._clean_leftovers(state)
        checkpoint.atomic_write(self.out / "config.toml", to_toml(cfg))  # (re)written: the folder's record
        processes = f" on {distributed.world_size()} processes" if distributed.active() else ""
        if state["checkpoint"] is None:
            checkpoint.save_model(self.out / "rewind.safetensors", self.model)  # theta_0
            run_state.record(state, self.out, "rewind.safetensors")
            amount = ", ".join(f"{k} {v}" for k, v in cfg.targets().items()) or "the amount it decides"
            target = "" if cfg.method == "none" else f" to {amount} ({cfg.scope}, {cfg.when})"
            self.log(f"prunelab {__version__}: {cfg.model} on {cfg.dataset}, method {cfg.method}{target}, "
                     f"seed {cfg.seed}{processes} -> {self.out}")
        else:
            self.log(f"resuming {self.out} at stage {state['stage'] + 1}/{len(self.stages)}, "
                     f"epoch {state['epoch']}{processes}")
        return state, None

    def _continue(self, state: dict) -> dict:
        """Resume the run from `state` (on every rank) and finish it."""
        optimizer_state = None
        if state["checkpoint"] is not None:  # rank 0 reads it and hands it on: only its machine needs the folder
            tensors, meta = distributed.on_main(
                lambda: checkpoint.load_tensors(run_state.verify(state, self.out, state["checkpoint"])))
            checkpoint.restore_model(self.model, tensors)
            optimizer_state = (tensors, meta.get("optimizer") or None)
        while state["stage"] < len(self.stages):
            stage = self.stages[state["stage"]]
            if stage.kind == "train":
                self._train(stage, state, optimizer_state)
                optimizer_state = None
            elif stage.kind == "prune":
                self._prune(stage, state)
            else:
                self._rewind(stage, state)
            state["stage"], state["epoch"] = state["stage"] + 1, 0
            self._save(state)
        return distributed.on_main(lambda: self._finish(state))

    def _train(self, stage: Stage, state: dict, optimizer_state) -> None:
        cfg = self.config
        if stage.name == "pretrain" and cfg.pretrained_run is not None and state["epoch"] == 0:
            self._adopt_pretraining(stage, state)
            return
        trainer = Trainer(self.model, self.train, cfg.train_config(stage.finetune), seed=cfg.seed,
                          stage=state["stage"], device=self.device, progress=self.progress)
        if optimizer_state and optimizer_state[1]:
            checkpoint.restore_optimizer(trainer.optimizer, *optimizer_state)
        if stage.name == "pretrain" and cfg.rewind == "early":
            trainer.step_hooks.append(self._snapshot_at(cfg.rewind_iteration, state))
        schedule = (self._during_schedule(trainer, state, optimizer_state)
                    if cfg.when == "during" and cfg.method != "none" else None)
        best = None  # keep_best: the weights of this stage's epoch with the lowest validation error
        if cfg.keep_best and state.get("stage_best") and optimizer_state:
            best = {k[len(KEEP_PREFIX):]: v for k, v in optimizer_state[0].items() if k.startswith(KEEP_PREFIX)}
        for epoch in range(state["epoch"], trainer.epochs):
            try:
                stats = trainer.run_epoch(epoch)
            except TrainingDiverged as error:  # the caller reports it; the run's log keeps it too
                self.log(f"{stage.name:>12} epoch {epoch + 1:>3}/{trainer.epochs}  {error}", echo=False)
                raise
            stats["stage_name"] = stage.name
            distributed.check_masks(self.model, f"{stage.name} epoch {epoch + 1}")
            stats.update({f"val_{k}": v for k, v in self._evaluate(self.model, self.val).items()
                          if k in ("error", "loss")})
            state["seconds"]["train"] += stats["seconds"]
            state["history"].append(stats)
            state["epoch"] = epoch + 1
            val = "" if stats["val_error"] is None else f"  val error {stats['val_error']:.2%}"
            self.log(f"{stage.name:>12} epoch {epoch + 1:>3}/{trainer.epochs}  loss {stats['train_loss']:.4f}"
                     f"  train error {stats['train_error']:.2%}{val}  lr {stats['lr']:.3g}  {stats['seconds']:.1f}s")
            extra = None
            if schedule is not None:
                started = time.perf_counter()
                schedule.epoch_end(stats["val_loss"], epoch=epoch + 1)
                state["seconds"]["prune"] += time.perf_counter() - started
                for event in schedule.events[len(state["prune_events"]):]:  # this epoch's (steps and its end)
                    event.update(self._errors_now(event))
                    state["prune_events"].append({"stage": stage.name, **event})
                    self.log(f"{stage.name:>12} pruning at epoch {epoch + 1}: {schedule.describe(event)}")
                state["during"], extra = schedule.state()
            if cfg.keep_best and stats["val_error"] is not None and (
                    best is None or stats["val_error"] < state["stage_best"]["val_error"]):
                best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                state["stage_best"] = {"epoch": epoch + 1, "val_error": stats["val_error"]}
            if best is not None:
                extra = {**(extra or {}), **{KEEP_PREFIX + k: v for k, v in best.items()}}
            self._save(state, trainer.optimizer, extra)
            if schedule is not None and schedule.done:
                self.log(f"{stage.name:>12} stopped: {schedule.stop_reason()}")
                break
        if best is not None:
            chosen = state.pop("stage_best")
            if chosen["epoch"] != state["epoch"]:
                self.model.load_state_dict(best)
            self.log(f"{stage.name:>12} keeps epoch {chosen['epoch']} (lowest validation error "
                     f"{chosen['val_error']:.2%})")
            state.setdefault("kept_epochs", []).append({"stage": stage.name, **chosen})
        self._stage_result(stage, state, chosen["val_error"] if best is not None else None)

    def _adopt_pretraining(self, stage: Stage, state: dict) -> None:
        """The pretrain stage read from ``pretrained_run``, a finished run of :func:`dense_twin`: its weights,
        epochs, kept epoch and stage result, as training here would have produced them."""
        source = Path(self.config.pretrained_run)
        expected, found = dense_twin(self.config).digest(), run_state.finished_digest(source)
        if found is None:
            raise PrunelabError(f"pretrained_run {source} is not a finished run folder (no state.json and "
                                "result.json): run it first")
        if found != expected:
            raise PrunelabError(f"pretrained_run {source} trained other settings (digest {found}) than this run's "
                                f"pre-training (digest {expected}: method none with this run's model, data, seed "
                                "and training keys)")
        source_state = checkpoint.read_json(source / "state.json", dict)
        result = checkpoint.read_json(run_state.verify(source_state, source, "result.json"), dict)
        tensors, _ = checkpoint.load_tensors(run_state.verify(source_state, source, "model.safetensors"))
        checkpoint.restore_model(self.model, tensors)
        renamed = [{**entry, "stage": stage.name} for entry in result.get("stage_results", [])]
        state["history"] += [{**epoch, "stage_name": stage.name} for epoch in result["history"]]
        state.setdefault("kept_epochs", []).extend({**e, "stage": stage.name} for e in result.get("kept_epochs", []))
        state.setdefault("stage_results", []).extend(renamed)
        state["pretrained"] = {"run": str(source), "digest": expected, "train_s": result["time_s"]["train"]}
        self.log(f"{stage.name:>12} adopted from {source} ({len(result['history'])} epochs, "
                 f"{result['time_s']['train']:.0f} s of training there): test error {renamed[-1]['test_error']:.2%}")

    def _stage_result(self, stage: Stage, state: dict, val_error: float | None = None) -> None:
        """Where a training stage left the model (reported, never used to choose anything)."""
        cfg = self.config
        test = self._evaluate(self.model, self.test)
        summary = metrics.sparsity_summary(self.model)
        if val_error is None and state["history"]:
            val_error = state["history"][-1]["val_error"]
        record = {"stage": stage.name, "test_error": test["error"], "val_error": val_error,
                  "sparsity": summary["sparsity"], "compression_ratio": summary["compression_ratio"],
                  "units": metrics.alive_units(self.model)}
        state.setdefault("stage_results", []).append(record)
        self.log(f"{stage.name:>12} done: test error {test['error']:.2%}, sparsity {summary['sparsity']:.4f}, "
                 f"compression {summary['compression_ratio']:.2f}x")

    def _during_schedule(self, trainer: Trainer, state: dict, optimizer_state) -> schedules.Schedule:
        """The schedule that prunes while training, driven by this stage's steps and epochs."""
        cfg = self.config
        method = pruning.get_method(cfg.method)
        common = dict(seed=cfg.seed, scope=cfg.scope, include_bias=cfg.include_bias)
        if method.schedule == "lobster":
            schedule = schedules.Lobster(self.model, self.val, options=dict(cfg.method_options),
                                         eval_batch_size=cfg.eval_batch_size)
        elif method.schedule == "periodic":
            options = method.parse_options(cfg.method_options)
            schedule = schedules.Periodic(self.model, method.name, sparsity=cfg.sparsity, data=self._prune_data(),
                                          **common, **options)
        else:
            every = cfg.prune_every or trainer.steps_per_epoch
            end = cfg.prune_end or max(every, (3 * trainer.total_steps) // 4)
            schedule = schedules.Gradual(self.model, method.name, sparsity=cfg.sparsity, data=self._prune_data(),
                                         end=end, every=every, **common, **dict(cfg.method_options))
        if state.get("during") is not None:
            schedule.load(state["during"], optimizer_state[0] if optimizer_state else {})
        if distributed.active():  # rank 0's decisions bind every rank (see prunelab.distributed)
            schedule = distributed.Synced(schedule)
        schedule.attach(trainer.optimizer)
        trainer.step_hooks.append(lambda _step: schedule.step())
        return schedule

    def _evaluate(self, model: torch.nn.Module, data) -> dict:
        return evaluate(model, data, batch_size=self.config.eval_batch_size, device=self.device)

    def _errors_now(self, event: dict) -> dict:
        """Validation and test error right after a pruning event (reported, never used to decide)."""
        cfg = self.config
        val = self._evaluate(self.model, self.val)["error"] if len(self.val) else None
        return {"val_error": val, "test_error": self._evaluate(self.model, self.test)["error"]}

    def _snapshot_at(self, step: int, state: dict):
        def hook(current: int) -> None:
            if current == step and self.main:
                checkpoint.save_model(self.out / "rewind.safetensors", self.model)
                run_state.record(state, self.out, "rewind.safetensors")  # binding at this epoch's checkpoint
        return hook

    def _clean_leftovers(self, state: dict) -> None:
        """Remove what a killed process left: temporary files of interrupted writes, and checkpoints that
        state.json no longer names (one was written, the process died before the older one was removed)."""
        stale = checkpoint.leftover_temporaries(self.out)
        stale += [p for p in self.out.glob("ckpt-*.safetensors") if p.name != state.get("checkpoint")]
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            self.log(f"removed {len(stale)} file(s) left by an interrupted process: "
                     f"{', '.join(sorted(p.name for p in stale))}", echo=False)

    def _finished(self, state: dict) -> dict:
        """A finished run is not finished again: its verified result is returned as it is."""
        run_state.verify(state, self.out, "model.safetensors")
        result = checkpoint.read_json(run_state.verify(state, self.out, "result.json"), dict)
        self.log(f"{self.out} is finished; its result stands (delete result.json to finish it again)")
        for line in format_result(result).splitlines():
            self.log(line)
        return result

    def _prune_data(self):
        """The split the method scores on (``prune_data``)."""
        return self.val if self.config.prune_data == "val" else self.train

    def _rounds(self) -> schedules.Iterative:
        """The rounds of pruning between trainings (one round at initialisation)."""
        cfg = self.config
        return schedules.Iterative(self.model, cfg.method, rounds=cfg.rounds, data=self._prune_data(), seed=cfg.seed,
                                   scope=cfg.scope, include_bias=cfg.include_bias, **cfg.targets(),
                                   **cfg.method_options)

    def _prune(self, stage: Stage, state: dict) -> None:
        cfg = self.config
        event = self._rounds().prune_round(stage.round)  # every rank, on the same examples
        distributed.sync_model(self.model)  # rank 0's masks and weights bind every rank
        distributed.check_masks(self.model, stage.name)
        state["seconds"]["prune"] += event["seconds"]
        state["prune_events"].append({"stage": stage.name, **{k: v for k, v in event.items() if k != "round"}})
        self.log(f"{stage.name:>12} {cfg.method}: kept {event['kept']:,} of {event['total']:,} prunable weights "
                 f"(sparsity {event['sparsity']:.4f}) in {event['seconds']:.2f}s"
                 + (f"; LAYER COLLAPSE in {', '.join(event['collapsed'])}" if event["collapsed"] else ""))

    def _rewind(self, stage: Stage, state: dict) -> None:
        """Replace the weights, keeping the masks: rewound to ``rewind.safetensors``, or (``reinit``) a
        fresh draw with another seed, of the same initialisation or of ``reinit_init``, its biases at 0
        whatever ``init_bias`` the scored network had (as the SNIP code's `initializer_b_ap = zeros`)."""
        cfg = self.config
        if stage.name == "reinit":
            seed = derive_seed(cfg.seed, "reinit") % 2**31
            init = cfg.reinit_init or cfg.init
            options = {k: v for k, v in cfg.model_options.items() if k != "init_bias"}
            fresh = build_model(cfg.model, num_classes=self.num_classes,
                                init=init, seed=seed, **options).to(self.device)
            tensors, what = fresh.state_dict(), f"re-initialised ({init}, seed {seed})"
        else:  # rank 0 reads the file it wrote; the others get its weights from sync_model
            tensors = checkpoint.load_tensors(run_state.verify(state, self.out, "rewind.safetensors"))[0] \
                if self.main else None
            what = f"rewound ({cfg.rewind})"
        if tensors is not None:
            weights = {k: v.to(self.device) for k, v in tensors.items() if not k.startswith(checkpoint.MASK_PREFIX)}
            schedules.rewind(self.model, weights)
        distributed.sync_model(self.model)
        distributed.check_masks(self.model, stage.name)
        self.log(f"{stage.name:>12} weights {what}, masks kept")

    def _compact(self, model, example) -> dict:
        """Channel masks made physical: the smaller model, its equivalence check, PR, FR and latency."""
        from .. import structure

        cfg = self.config
        probe = as_feed(self.test).rows(torch.arange(min(64, len(self.test)))).inputs
        small, report = structure.compact(model, to_model(model, probe),
                                          name=cfg.model, options=dict(cfg.model_options))
        costs = structure.structured_metrics(model, small, example, latency=cfg.latency)
        structure.save_compact(self.out / "compact.safetensors", small, report.plan)
        summary = {"pr": costs["pr"], "pr_nonzero": costs["pr_nonzero"], "fr": costs["fr"],
                   "params_compact": costs["params"]["small"], "compact_max_abs_diff": report.max_abs_diff,
                   "kept_constant_channels": len(report.kept_constant)}
        if cfg.latency:
            summary["latency_ms"] = costs["latency_ms"]
            if torch.is_tensor(example) and example.dim() == 4:  # oneDNN is often faster channels-last: the fair layout for both models
                summary["latency_ms_channels_last"] = structure.compare_latency(model, small, example,
                                                                                channels_last=True)
        return summary

    def _save_models(self, model) -> dict[str, str]:
        """The final model as dense weights and masks, and (pruned) as the sparse file: {kind: file name},
        with the compact model written by ``_compact`` when there is one."""
        from .. import sparse

        cfg = self.config
        metadata = {"model": cfg.model, "config": asdict(cfg)}
        checkpoint.save_model(self.out / "model.safetensors", model, metadata)
        files = {"dense": "model.safetensors"}
        if masking.is_masked(model):
            sparse.save_sparse(self.out / "model.sparse.safetensors", model, metadata=metadata)
            files["sparse"] = "model.sparse.safetensors"
        if (self.out / "compact.safetensors").exists() and pruning.get_method(cfg.method).structured:
            files["compact"] = "compact.safetensors"
        return files

    def _finish(self, state: dict) -> dict:
        cfg = self.config
        model = self.model
        test = self._evaluate(model, self.test)
        val = self._evaluate(model, self.val)
        example = example_input(model, self.test)  # the first test example, on the model's device
        flops, per_module = metrics.flop_summary(model, example)
        result = {
            "schema": RESULT_SCHEMA,
            "prunelab_version": __version__,
            "model": cfg.model, "dataset": cfg.dataset, "method": cfg.method,
            "target": cfg.targets(), "scope": cfg.scope, "when": cfg.when, "seed": cfg.seed,
            **metrics.sparsity_summary(model),
            "flops": flops,
            "error": {"test": test["error"], "test_top5": test["top5_error"], "val": val["error"],
                      "test_loss": test["loss"]},
            "time_s": {"prune": state["seconds"]["prune"], "train": state["seconds"]["train"],
                       "wall_this_session": time.perf_counter() - self.started},
            "latency_ms": None,
            "layers": metrics.layer_table(model, per_module),
            "prune_events": state["prune_events"],
            "stage_results": state.get("stage_results", []),
            "kept_epochs": state.get("kept_epochs", []),
            "pretrained": state.get("pretrained"),
            "history": state["history"],
            "config": asdict(cfg),
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads(), "device": cfg.device,
                            "processes": distributed.world_size(), "cpu_count": os.cpu_count()},
        }
        if cfg.latency:
            result["latency_ms"] = {"batch": 1, "threads": 1,
                                    "dense_kernels": metrics.latency_ms(model, example, threads=1)}
        if pruning.get_method(cfg.method).structured:
            result["structured"] = self._compact(model, example)
        files = self._save_models(model)
        result["file_bytes"] = {kind: (self.out / name).stat().st_size for kind, name in files.items()}
        checkpoint.write_json(self.out / "result.json", result)
        for name in (*files.values(), "result.json"):
            run_state.record(state, self.out, name)
        checkpoint.write_json(self.out / "state.json", state)  # the commit point of the result
        for line in format_result(result).splitlines():
            self.log(line)
        return result


def format_result(result: dict) -> str:
    """The result table printed at the end of a run."""
    lines = [f"{'layer':<28}{'shape':>16}{'params':>12}{'nonzero':>12}{'sparsity':>10}"]
    for row in result["layers"]:
        shape = "x".join(str(d) for d in row["shape"])
        lines.append(f"{row['name']:<28}{shape:>16}{row['params']:>12,}{row['nonzero']:>12,}{row['sparsity']:>10.4f}")
    params = result["params"]
    lines.append(f"{'prunable weights':<28}{'':>16}{params['prunable']:>12,}{params['prunable_kept']:>12,}"
                 f"{result['sparsity']:>10.4f}")
    lines.append(f"parameters: {params['total']:,} total, {params['nonzero']:,} non-zero, "
                 f"compression ratio {result['compression_ratio']:.2f}x")
    flops = result["flops"]
    lines.append(f"FLOPs per example: dense {flops['dense']:,}, effective {flops['effective']:,} "
                 f"({flops['reduction']:.2f}x fewer)")
    err = result["error"]
    val = "n/a" if err["val"] is None else f"{err['val']:.2%}"
    lines.append(f"test error {err['test']:.2%} (top-5 {err['test_top5']:.2%}), validation error {val}")
    if result.get("structured"):
        st = result["structured"]
        lines.append(f"physically smaller model: {st['params_compact']:,} parameters (PR {st['pr']:.2%}, "
                     f"FLOP reduction {st['fr']:.2%}), outputs equal to the masked model within "
                     f"{st['compact_max_abs_diff']:.1e}")
        if st.get("latency_ms"):
            lat = st["latency_ms"]
            line = f"latency dense {lat['dense']:.3f} ms -> compact {lat['small']:.3f} ms ({lat['speedup']:.2f}x)"
            if st.get("latency_ms_channels_last"):
                cl = st["latency_ms_channels_last"]
                line += f"; channels-last {cl['dense']:.3f} -> {cl['small']:.3f} ms ({cl['speedup']:.2f}x)"
            lines.append(line + f" (batch {lat['batch']}, threads {lat['threads']})")
    sizes = result.get("file_bytes", {})
    if "sparse" in sizes:
        lines.append(f"files: dense {sizes['dense']:,} bytes, sparse {sizes['sparse']:,} bytes "
                     f"({sizes['dense'] / sizes['sparse']:.1f}x smaller)"
                     + (f", compact {sizes['compact']:,} bytes" if "compact" in sizes else ""))
    timing = f"time: pruning {result['time_s']['prune']:.2f} s, training {result['time_s']['train']:.1f} s"
    if result.get("latency_ms"):
        timing += f"; latency {result['latency_ms']['dense_kernels']:.3f} ms (batch 1, 1 thread, dense kernels)"
    lines.append(timing)
    return "\n".join(lines)


def run(config: RunConfig, progress: bool | None = None, echo: Callable[[str], None] | None = print) -> dict:
    """Execute (or resume) a run and return its result dictionary (also written to result.json)."""
    runner = Run(config, progress=progress, echo=echo)
    try:
        return runner.execute()
    except OSError as error:  # a full disk, a name too long, a folder not writable: one line, nothing lost
        where = f" ({error.filename})" if error.filename else ""
        raise PrunelabError(f"run folder {runner.out}: {error.strerror or error}{where}") from None
