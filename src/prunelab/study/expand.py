"""A study's grid expanded into ordinary lab runs, each checked by the lab's own ``resolve``.

Every grid point is a run config: the defaults, the shared recipe, the method's overrides, then the
point itself (model, dataset, method, target, seed). The run folder is named by the resolved config's
digest (the lab's own), so the same config always lands in the same folder: a finished run is reused
and an interrupted one resumes. The dense control (method ``none``, the recipe's training without any
pruning key) is one run per model, dataset and seed, unless the study says ``control = false``. A run
that prunes a trained model and whose pre-training is exactly the control's training reads the control's
weights instead of training again (:func:`shared_pretraining`; the lab's ``pretrained_run``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import PrunelabError
from ..lab.config import defaults, make_config
from ..lab.run import PRUNING_KEYS, dense_twin, resolve
from . import sanity
from .spec import StudySpec

@dataclass(frozen=True)
class PlannedRun:
    """One run of a study. ``label`` groups it in the report: the method, ``<method>+shuffle`` or
    ``<method>+reinit`` for a sanity variant, ``none`` for the dense control."""

    id: str            # the resolved config's digest
    folder: str        # relative to the study folder
    label: str
    method: str        # the method the variant checks ("none": the dense control)
    variant: str       # "", "shuffle" or "reinit"
    model: str
    dataset: str
    kind: str | None   # "sparsity", "channels", "parameters"; None: dense, or the method decides
    target: float | None
    seed: int
    config: dict[str, Any]  # the run config's values, without out (the study folder decides it)

    def describe(self) -> str:
        target = "dense" if self.method == "none" else \
            (f"{self.kind} {self.target:g}" if self.kind else "its own target")
        return f"{self.label} {self.model}/{self.dataset} {target} seed {self.seed}"


def expand(spec: StudySpec) -> list[PlannedRun]:
    """Every run of the study, seed by seed (so that a partial study has whole seeds), each config checked;
    a problem is one PrunelabError line naming the grid point."""
    runs: dict[str, PlannedRun] = {}
    for seed in spec.seeds:
        for model in spec.models:
            for dataset in spec.datasets:
                base = {**spec.recipe, "model": model, "seed": seed,
                        **({"dataset": dataset} if dataset else {})}
                # the control is the recipe's training alone (the same folder whatever the methods' schedules)
                dense = {k: v for k, v in base.items() if k not in PRUNING_KEYS}
                if spec.control:
                    control = {**dense, **spec.overrides.get("none", {}), "method": "none"}
                    _add(runs, _plan(control, "none", "", None, None))
                for method in spec.methods:
                    kind = spec.kinds[method]
                    for target in spec.targets[method] or (None,):
                        values = {**base, **spec.overrides[method], "method": method,
                                  **({kind: target} if kind else {})}
                        planned = _plan(values, method, "", kind, target)
                        _add(runs, planned)
                        if planned.config["when"] != "init" or method == "random":
                            continue  # Frankle et al.'s checks are for pruning at initialisation
                        for check in spec.sanity:
                            variant = dict(values, reinit=True) if check == "reinit" else \
                                dict(values, method=sanity.shuffled_name(method))
                            _add(runs, _plan(variant, method, check, kind, target))
    return list(runs.values())


def _plan(values: dict[str, Any], method: str, variant: str, kind: str | None, target: float | None) -> PlannedRun:
    sanity.ensure(values["method"])
    where = f"{method}{'+' + variant if variant else ''}" + (f" at {kind} {target:g}" if kind else "") + \
        f", {values['model']}, seed {values['seed']}"
    try:
        config = resolve(make_config({**defaults(), **values}))
    except PrunelabError as error:
        raise PrunelabError(f"{where}: {error}") from None
    label = method + (f"+{variant}" if variant else "")
    digest = config.digest()
    return PlannedRun(id=digest, folder=f"runs/{label}_{digest}", label=label, method=method, variant=variant,
                      model=config.model, dataset=config.dataset, kind=kind, target=target, seed=config.seed,
                      config={k: v for k, v in asdict(config).items() if k != "out"})


def _add(runs: dict[str, PlannedRun], planned: PlannedRun) -> None:
    # the same config twice (a reinit check of a method already trained from a fresh draw): run it once
    runs.setdefault(planned.id, planned)


def shared_pretraining(planned: list[PlannedRun]) -> dict[str, str]:
    """{run id: control id} for every run that prunes a trained model (without early rewinding) and whose
    pre-training is a planned dense control's training: the same model, data, seed and training keys
    (the lab's ``dense_twin``), so that the control's weights are the ones it would train."""
    controls = {run.id for run in planned if run.method == "none"}
    links = {}
    for run in planned:
        if run.method != "none" and run.config["when"] == "trained" and run.config["rewind"] != "early":
            twin = dense_twin(make_config({**defaults(), **run.config})).digest()
            if twin in controls:
                links[run.id] = twin
    return links
