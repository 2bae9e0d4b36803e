"""A run folder's ``state.json``: how far the run got, and the checksums of the files it committed.

``state.json`` is the commit point of every checkpoint: a file it names is trusted only if its SHA-256
matches the one recorded when it was committed, and every path it names must be a plain file name inside
the run folder. A state that fails these checks is refused in one line, before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import checkpoint
from ..errors import PrunelabError

CHECKPOINT_NAME = re.compile(r"ckpt-\d{3}-\d{4}\.safetensors")
TRUSTED = ("rewind.safetensors", "model.safetensors", "model.sparse.safetensors", "compact.safetensors",
           "result.json")  # besides the checkpoint
_LISTS = ("history", "prune_events", "stage_results", "kept_epochs")


def finished_digest(folder: Path) -> str | None:
    """The config digest of a finished run folder (result.json beside a state.json naming a digest), None
    for anything else (unfinished, not a run, a corrupt state.json)."""
    if not (folder / "result.json").is_file() or not (folder / "state.json").is_file():
        return None
    try:
        digest = checkpoint.read_json(folder / "state.json", dict).get("config_digest")
    except PrunelabError:
        return None
    return digest if isinstance(digest, str) else None


def fresh(digest: str) -> dict:
    return {"config_digest": digest, "stage": 0, "epoch": 0, "checkpoint": None, "history": [],
            "prune_events": [], "seconds": {"prune": 0.0, "train": 0.0}, "digests": {}}


def check(state: dict, out: Path, stages: int) -> dict:
    """``state`` if it is a well-formed state of a run of ``stages`` stages in ``out``; else one line."""
    def bad(problem: str) -> PrunelabError:
        return PrunelabError(f"run folder {out}: state.json is corrupt ({problem}); delete the folder or choose "
                             "another --out")

    if not isinstance(state.get("config_digest"), str):
        raise bad("no config_digest")
    for key, limit in (("stage", stages), ("epoch", None)):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (limit is not None and value > limit):
            raise bad(f"{key} must be an integer in [0, {limit if limit is not None else 'inf'}], got {value!r}")
    name = state.get("checkpoint")
    if name is not None and (not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name)):
        raise bad(f"checkpoint must be a ckpt-NNN-NNNN.safetensors file of the run folder, got {name!r}")
    for key in ("history", "prune_events"):
        if not isinstance(state.get(key), list):
            raise bad(f"{key} must be a list")
    for key in _LISTS[2:]:
        if key in state and not isinstance(state[key], list):
            raise bad(f"{key} must be a list")
    seconds = state.get("seconds")
    if not isinstance(seconds, dict) or not all(isinstance(seconds.get(k), (int, float)) for k in ("prune", "train")):
        raise bad("seconds must hold the prune and train times")
    digests = state.setdefault("digests", {})  # folders written before checksums: nothing to verify yet
    if not isinstance(digests, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise bad("digests must map file names to checksums")
    for key in digests:
        if key not in TRUSTED and not CHECKPOINT_NAME.fullmatch(key):
            raise bad(f"digests name {key!r}, which is not a file of a run folder")
    return state


def record(state: dict, out: Path, name: str) -> None:
    """Note the checksum of ``out/name``, just written; it becomes binding when state.json is next written."""
    state.setdefault("digests", {})[name] = checkpoint.file_digest(out / name)


def verify(state: dict, out: Path, name: str) -> Path:
    """``out/name``, after checking it against its recorded checksum (refused in one line if it differs or
    is missing); a file of a folder written before checksums existed is taken as it is."""
    path = out / name
    expected = state.get("digests", {}).get(name)
    if expected is None:
        return path
    try:
        actual = checkpoint.file_digest(path)
    except OSError as error:
        raise PrunelabError(f"run folder {out}: {name} is missing or unreadable ({error.strerror}); it was "
                            "committed, so the folder was changed from outside") from None
    if actual != expected:
        raise PrunelabError(f"run folder {out}: {name} does not match the checksum recorded when it was written "
                            "(changed or corrupted); nothing was overwritten. Restore it, or delete the run folder "
                            "to start again")
    return path
