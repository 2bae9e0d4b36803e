"""A study folder's runs gathered into groups (model, dataset, label, target) with mean, std and n.

A run's numbers come from its result.json (study.json's copy when the folder has none), its effective
sparsity from study.json (computed from the masks when the run finished). Test errors are in percent;
std is the sample standard deviation (n - 1), 0 for a single seed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import read_json

METRICS = ("error", "sparsity", "effective", "compression", "flops")


@dataclass
class Group:
    model: str
    dataset: str
    label: str
    method: str
    variant: str
    kind: str | None
    target: float | None
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    seeds: list[int] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)  # runs without a result: seed, status, error

    @property
    def n(self) -> int:
        return len(self.values["error"])

    def mean(self, metric: str) -> float | None:
        values = self.values[metric]
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float:
        values = self.values[metric]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(folder: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """study.json's runs, each with ``result`` (its result.json, or None)."""
    runs = []
    for entry in data["runs"]:
        path = folder / entry["folder"] / "result.json"
        result = read_json(path, dict) if entry["status"] == "done" and path.exists() else None
        runs.append({**entry, "result": result})
    return runs


def numbers(run: dict[str, Any]) -> dict[str, float | None] | None:
    """A finished run's error (%), sparsity, effective sparsity, compression ratio and FLOP reduction."""
    result, summary = run.get("result"), run.get("summary")
    if result is not None:
        values = {"error": 100 * result["error"]["test"], "sparsity": result["sparsity"],
                  "compression": result["compression_ratio"], "flops": result["flops"]["reduction"]}
    elif summary is not None:
        values = {"error": 100 * summary["test_error"], "sparsity": summary["sparsity"],
                  "compression": summary["compression_ratio"], "flops": summary["flops_reduction"]}
    else:
        return None
    effective = run.get("effective") or {}
    values["effective"] = effective.get("sparsity")
    return values


def groups(runs: list[dict[str, Any]]) -> list[Group]:
    """One group per (model, dataset, label, kind, target), in the order of study.json's runs."""
    found: dict[tuple, Group] = {}
    for run in runs:
        key = (run["model"], run["dataset"], run["label"], run["kind"], run["target"])
        group = found.setdefault(key, Group(run["model"], run["dataset"], run["label"], run["method"],
                                            run["variant"], run["kind"], run["target"]))
        values = numbers(run) if run["status"] == "done" else None
        if values is None:
            group.missing.append({"seed": run["seed"], "status": run["status"], "error": run.get("error"),
                                  "folder": run["folder"]})
            continue
        group.seeds.append(run["seed"])
        for metric in METRICS:
            if values[metric] is not None:
                group.values[metric].append(values[metric])
    return list(found.values())


def parameter_counts(runs: list[dict[str, Any]], model: str, dataset: str) -> tuple[int, int] | None:
    """(all parameters, prunable weights) of a model, from any of its results."""
    for run in runs:
        if run["model"] == model and run["dataset"] == dataset and run.get("result"):
            params = run["result"]["params"]
            return params["total"], params["prunable"]
    return None
