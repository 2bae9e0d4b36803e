"""One run of a study, as an engine's worker executes it: a plain function of plain values, so that a
spawned process or a Ray task can import and call it.

Whatever happens to the run comes back as an outcome, never as an exception: ``done`` (with the numbers
the study records), ``diverged`` (TrainingDiverged), ``failed`` (any other PrunelabError, or an
unexpected error, whose traceback goes to the run folder's ``error.txt``). An interrupt is not an
outcome: it propagates, and the run folder resumes next time.
"""

from __future__ import annotations

import socket
import time
import traceback
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write
from ..errors import PrunelabError, TrainingDiverged
from ..lab.config import RunConfig
from . import sanity


def execute(config: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) the lab run of ``config`` (its ``out`` set) and return its outcome."""
    from ..lab.run import run

    started = time.perf_counter()
    outcome: dict[str, Any] = {"host": socket.gethostname()}
    try:
        sanity.ensure(config["method"])
        cfg = RunConfig(**{**config, **({"threads": threads} if threads else {})})
        result = run(cfg, progress=False, echo=None)
        outcome.update(status="done", summary=summarise(result))
    except TrainingDiverged as error:
        outcome.update(status="diverged", error=one_line(error))
    except PrunelabError as error:
        outcome.update(status="failed", error=one_line(error))
    except Exception as error:  # a bug or the machine (out of memory): recorded, and the study goes on
        outcome.update(status="failed", error=f"{type(error).__name__}: {one_line(error)}")
        try:
            atomic_write(Path(config["out"]) / "error.txt", traceback.format_exc())
        except (OSError, PrunelabError):
            pass  # the folder itself is the problem; the outcome still says what happened
    if outcome["status"] == "done":
        try:
            outcome["effective"] = effective_of(config["out"])
        except Exception as error:  # the run stands; only this figure is missing, and says why
            outcome["effective"] = {"error": one_line(error)}
    outcome["seconds"] = time.perf_counter() - started
    return outcome


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a result.json the study records beside each run."""
    return {"test_error": result["error"]["test"], "val_error": result["error"]["val"],
            "sparsity": result["sparsity"], "compression_ratio": result["compression_ratio"],
            "flops_reduction": result["flops"]["reduction"]}


def effective_of(run_dir: str | Path) -> dict[str, Any] | None:
    """Effective sparsity from the run's masks, without the per-layer rows (None: not a chain)."""
    from .effective import run_effective_sparsity

    value = run_effective_sparsity(run_dir)
    return None if value is None else {k: v for k, v in value.items() if k != "layers"}


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
