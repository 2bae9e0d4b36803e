"""Finished lab runs from elsewhere (a benchmark's runs/ folder, another study) taken into a study, so that
what was trained once is never trained again.

A run folder is adopted when its state.json names the digest of one of the study's runs and its result.json
is there: the lab's digest covers every setting that changes a result, so the folder holds that very run.
It is copied (the source stays as it was) under a temporary name and renamed into place, so an interrupted
adoption leaves nothing half-copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable

from ..errors import PrunelabError
from ..lab.state import finished_digest
from .expand import PlannedRun

SKIP = ("LOCK", ".*.tmp", "*.tmp")  # a lock or a half-written file of the source is never copied


def adopt(study_folder: Path, planned: list[PlannedRun], sources: Iterable[str | Path],
          say: Callable[[str], None] = print) -> int:
    """Copy every finished run under ``sources`` that the study plans and has not finished into its run
    folder; return how many were adopted. A missing source is one PrunelabError line."""
    wanted = {run.id: run for run in planned}
    adopted = 0
    for source in map(Path, sources):
        if not source.is_dir():
            raise PrunelabError(f"--adopt {source}: no such folder")
        for state in sorted(source.rglob("state.json")):
            run = wanted.get(finished_digest(state.parent) or "")
            target = study_folder / run.folder if run else None
            if run is None or state.parent.resolve() == target.resolve() or finished_digest(target) == run.id:
                continue
            partial = target.with_name(f".{target.name}.adopt.tmp")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(state.parent, partial, ignore=shutil.ignore_patterns(*SKIP))
            if target.exists():  # an unfinished attempt: the finished run replaces it
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial.rename(target)
            say(f"adopted {state.parent} as {run.describe()}")
            adopted += 1
    return adopted


__all__ = ["adopt", "finished_digest"]
