"""On-disk cache of decoded datasets, so a new process skips gunzip, unpickling and resizing.

An entry is one safetensors file holding a dataset's decoded uint8 images and int64 labels, train and
test, before the validation split and after any resize. Normalising is not cached: it is elementwise,
so doing it after loading gives the same bytes, and float32 entries would be 4x larger and take longer
to read and verify than normalising takes.

    <dir>/<dataset>-<folder hash>-<key hash>.safetensors
    metadata: {"key": the JSON key, "sha256": digest of the tensors (names, dtypes, shapes, bytes)}

The key names the cache format, the data folder and each source file's size, mtime, ctime and
accepted MD5s (plus what the caller adds: dataset, resize, torch version), so a changed file or
transform never finds an old entry. An entry is used only when its key and digest match; one that
fails either (corrupt, truncated, foreign) is deleted and rebuilt. Writes are atomic.

<dir> is $PRUNELAB_CACHE when set, else `.decoded/` inside the dataset's folder, falling back to
$XDG_CACHE_HOME/prunelab/decoded (default ~/.cache/prunelab/decoded) when that folder is read-only
(by its mode, even for root). A cache that cannot be written never fails a load; the data are then
decoded every time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..checkpoint import atomic_write
from ..errors import PrunelabError

FORMAT = 1  # bump when the entry layout or the meaning of its tensors changes


def cache_dirs(folder: Path, writing: bool = False) -> list[Path]:
    """Where entries for the dataset in `folder` are looked for (or, `writing`, may be written), in order."""
    env = os.environ.get("PRUNELAB_CACHE")
    if env:
        return [Path(env).expanduser()]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "prunelab" / "decoded"
    return [folder / ".decoded", user] if not writing or _may_write(folder) else [user]


def _may_write(folder: Path) -> bool:
    """Whether to put entries in the data folder: writable to us, and not marked read-only for all.

    Root may write anywhere, but a folder whose mode denies writing to everyone (a shared data root)
    is meant to be left alone.
    """
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def source_stamp(folder: Path, files: list[str]) -> tuple:
    """(file, size, mtime_ns, ctime_ns) of each source file: changes whenever a file's content may have.

    ctime too because it cannot be set back by hand, so a rewrite that restores the mtime still shows.
    """
    stats = [(rel, (folder / rel).stat()) for rel in files]
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for rel, st in stats)


def entry_key(folder: Path, stamp: tuple, **extra) -> str:
    """The JSON key an entry must carry: format, folder, source stamp and the caller's `extra` facts."""
    return json.dumps({"format": FORMAT, "folder": str(folder), "files": stamp, **extra}, sort_keys=True)


def entry_path(directory: Path, name: str, folder: Path, key: str) -> Path:
    """File of the entry for `key`; the folder hash groups one data folder's entries for pruning."""
    return directory / f"{name}-{_short(str(folder))}-{_short(key)}.safetensors"


def load(name: str, folder: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The verified tensors of the entry for `key`, or None; a bad entry found on the way is deleted."""
    for directory in cache_dirs(folder):
        path = entry_path(directory, name, folder, key)
        if not path.is_file():
            continue
        tensors = _read_verified(path, key)
        if tensors is not None:
            return tensors
        _remove(path)
    return None


def store(name: str, folder: Path, key: str, tensors: dict[str, torch.Tensor]) -> Path | None:
    """Write an entry to the first cache folder that accepts it; None if none does (no error)."""
    data = save(tensors, metadata={"key": key, "sha256": digest(tensors)})
    for directory in cache_dirs(folder, writing=True):
        path = entry_path(directory, name, folder, key)
        try:
            atomic_write(path, data)
        except (OSError, PrunelabError):  # read-only, full or missing folder: try the next one
            continue
        # Entries of older keys for this dataset and folder can never be used again.
        for old in directory.glob(f"{name}-{_short(str(folder))}-*.safetensors"):
            if old != path:
                _remove(old)
        return path
    return None


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _read_verified(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The entry's tensors if its key is `key` and its digest matches them, else None."""
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                return None
            # Copied out of the file's memory map before hashing: what was verified is then what is
            # used, even if the file is changed in place later.
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    except Exception:  # a damaged file can fail to parse in many ways; each means "rebuild"
        return None
    return tensors if digest(tensors) == meta.get("sha256") else None


def _short(text: str) -> str:
    """16 hex digits of SHA-256: short enough for a file name; the full key is checked on read."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    """Delete a file if we may; a read-only cache folder just keeps it (it is never trusted anyway)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
