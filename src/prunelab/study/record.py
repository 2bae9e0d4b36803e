"""study.json: every run of a study, its status and its error line, written atomically by the driver
after every change (schema ``prunelab.study/1``).

Statuses: ``done`` (result.json written), ``diverged`` (TrainingDiverged), ``failed`` (any other
error), ``pending`` (not run yet, or interrupted: its folder resumes). A run found finished in its
folder is ``done`` whoever ran it (``reused``: not run by the latest session); diverged and failed runs
keep their status until ``--retry-failed``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import read_json, write_json
from .expand import PlannedRun
from .spec import StudySpec
from .worker import effective_of, one_line, summarise

SCHEMA = "prunelab.study/1"
FINAL = ("done", "diverged", "failed")
NAME = "study.json"


class StudyRecord:
    def __init__(self, folder: Path, spec: StudySpec, planned: list[PlannedRun], retry_failed: bool = False):
        self.folder = folder
        previous = self._previous()
        self.runs: dict[str, dict[str, Any]] = {}
        for run in planned:
            entry = {k: v for k, v in asdict(run).items() if k != "config"}
            entry.update(status="pending", error=None)
            before = previous.get(run.id, {})
            if self._finished(run):
                entry.update(status="done", reused=True,
                             **{k: before[k] for k in ("seconds", "host", "summary", "effective") if k in before})
                self._fill(entry)
            elif before.get("status") in ("diverged", "failed") and not retry_failed:
                entry.update({k: before[k] for k in ("status", "error", "seconds", "host") if k in before})
            self.runs[run.id] = entry
        self.data = {"schema": SCHEMA, "name": spec.name, "study_file": _relative(spec.path, folder),
                     "references": _relative(spec.references, folder) if spec.references else None,
                     "spec": spec.as_dict(), "prunelab_version": __version__, "environment": machine()}

    def _previous(self) -> dict[str, dict[str, Any]]:
        path = self.folder / NAME
        if not path.exists():
            return {}
        runs = read_json(path, dict).get("runs", [])
        return {run["id"]: run for run in runs if isinstance(run, dict) and "id" in run}

    def _finished(self, run: PlannedRun) -> bool:
        """result.json written by this very config (state.json names its digest)."""
        folder = self.folder / run.folder
        if not (folder / "result.json").exists() or not (folder / "state.json").exists():
            return False
        return read_json(folder / "state.json", dict).get("config_digest") == run.id

    def _fill(self, entry: dict[str, Any]) -> None:
        """The numbers of a finished run this record has not seen finish (run by another study, or the
        record lost): from its result.json, and its masks when model.safetensors is there."""
        folder = self.folder / entry["folder"]
        if "summary" not in entry:
            entry["summary"] = summarise(read_json(folder / "result.json", dict))
        if "effective" not in entry and (folder / "model.safetensors").exists():
            try:
                entry["effective"] = effective_of(folder)
            except Exception as error:  # the run stands; only this figure is missing, and says why
                entry["effective"] = {"error": one_line(error)}

    def pending(self) -> list[str]:
        return [run_id for run_id, entry in self.runs.items() if entry["status"] not in FINAL]

    def finish(self, run_id: str, outcome: dict[str, Any]) -> None:
        entry = self.runs[run_id]
        entry.update(status=outcome["status"], error=outcome.get("error"), reused=False,
                     **{k: outcome[k] for k in ("seconds", "host", "summary", "effective") if k in outcome})

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in (*FINAL, "pending")}
        for entry in self.runs.values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        return counts

    def write(self, engine: dict[str, Any] | None = None) -> None:
        if engine is not None:
            self.data["engine"] = engine
        write_json(self.folder / NAME, {**self.data, "counts": self.counts(), "runs": list(self.runs.values())})


def machine() -> dict[str, Any]:
    """What ran the driver: the report states it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": memory,
            "python": platform.python_version(), "torch": torch.__version__}


def _relative(path: Path, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())
