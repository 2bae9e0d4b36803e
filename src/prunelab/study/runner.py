"""``prunelab study``: check the whole grid, then run what is missing on an engine, recording every
outcome in study.json as it comes.

The study folder (default: the study file's path without ``.toml``) holds ``study.json`` and
``runs/<label>_<digest>/``, ordinary lab run folders. One driver at a time holds the folder (its
``LOCK``, as a run folder's); a second is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import PrunelabError
from ..lab import lock
from .adopt import adopt
from .engines import make_engine
from .expand import expand, shared_pretraining
from .progress import Progress
from .record import FINAL, StudyRecord
from .spec import load_spec


def default_folder(study_file: str | Path) -> Path:
    path = Path(study_file)
    return path.with_suffix("") if path.suffix == ".toml" else path.with_name(path.name + ".study")


def plan_study(study_file: str | Path, out: str | Path | None = None):
    """(spec, planned runs, study folder): everything checked, nothing written."""
    spec = load_spec(study_file)
    planned = expand(spec)
    folder = Path(out) if out else default_folder(study_file)
    if folder.exists() and not folder.is_dir():
        raise PrunelabError(f"study folder {folder} is a file; choose another --out")
    return spec, planned, folder


def run_study(study_file: str | Path, out: str | Path | None = None, *, engine: str = "local", workers: int = 1,
              threads: int | None = None, address: str | None = None, retry_failed: bool = False,
              adopt_from: tuple[str | Path, ...] = (), progress: bool = True,
              notice: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the study's missing runs; return study.json's content. Finished runs found under ``adopt_from``
    (folders searched recursively) are copied in instead of being run. Bad input raises PrunelabError
    before any run starts; an interrupt leaves study.json saying what finished, and propagates."""
    spec, planned, folder = plan_study(study_file, out)
    runner = make_engine(engine, workers=workers, threads=threads, address=address)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PrunelabError(f"cannot create the study folder {folder}: {error.strerror or error}") from None
    configs = {run.id: run for run in planned}
    with lock.hold(folder):
        adopt(folder, planned, adopt_from, say=notice or print)
        record = StudyRecord(folder, spec, planned, retry_failed=retry_failed)
        record.write(runner.describe())
        pending = record.pending()
        counts = record.counts()
        bar = Progress(len(planned), len(planned) - len(pending), counts["diverged"] + counts["failed"],
                       runner.slots, spec.name, enabled=progress)
        say = notice or bar.say

        def done(run_id: str, outcome: dict[str, Any]) -> None:
            record.finish(run_id, outcome)
            record.write()
            bar.slots = runner.slots
            bar.done(failed=outcome["status"] != "done")
            if outcome["status"] != "done":
                say(f"{configs[run_id].describe()}: {outcome['status']}: {outcome.get('error')}")

        sources = shared_pretraining(planned)  # run id -> the control whose weights it starts from

        def task(run_id: str) -> tuple[str, dict[str, Any]]:
            values = {**configs[run_id].config, "out": str((folder / configs[run_id].folder).resolve())}
            source = sources.get(run_id)
            if source is not None and record.runs[source]["status"] == "done":  # else it trains its own
                values["pretrained_run"] = str((folder / configs[source].folder).resolve())
            return run_id, values

        # the dense controls first, with every run that does not start from their weights beside them (no
        # worker waits idle for the last control); then the runs pruning a control's trained weights
        first = sorted((run_id for run_id in pending if run_id not in sources),
                       key=lambda run_id: configs[run_id].method != "none")
        try:
            runner.run([task(run_id) for run_id in first], done, say)
            runner.run([task(run_id) for run_id in pending if run_id in sources], done, say)
        finally:
            bar.close()
            record.write()  # interrupted runs stay pending: their folders resume next time
        data = {**record.data, "counts": record.counts(), "runs": list(record.runs.values())}
    return data


def summary_line(data: dict[str, Any], folder: Path) -> str:
    counts = data["counts"]
    reused = sum(1 for run in data["runs"] if run.get("reused") and run["status"] == "done")
    line = (f"study {data['name']}: {len(data['runs'])} runs, {counts['done']} done ({reused} reused), "
            f"{counts['diverged']} diverged, {counts['failed']} failed")
    if counts.get("pending"):
        line += f", {counts['pending']} pending"
    return line + f" -> {folder / 'study.json'}"


__all__ = ["FINAL", "default_folder", "plan_study", "run_study", "summary_line"]
