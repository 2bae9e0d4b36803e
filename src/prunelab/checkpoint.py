"""Pickle-free, atomic persistence: tensors in safetensors, everything else in JSON.

Every write goes to a temporary file in the target folder, is flushed to disk, then renamed over the
target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_bytes
from safetensors.torch import save as _save_bytes
from torch import nn

from . import masking
from .errors import PrunelabError

MASK_PREFIX = "mask::"
OPTIM_PREFIX = "optim::"


def output_file(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """``path`` checked as a file to write (its folder is created), with a clear error when it cannot be:
    a folder, a parent that is a file, or (``suffix``, e.g. ".png") a name in another format."""
    path = Path(path)
    if suffix and path.suffix.lower() != suffix:
        raise PrunelabError(f"{path}: this writes a {suffix[1:].upper()} file; give a name ending in {suffix}")
    if path.is_dir():
        raise PrunelabError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PrunelabError(f"cannot create the folder of {path}: {error.strerror or error}") from None
    return path


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (flushed, then renamed over
    it). The file gets the mode an ordinary new file would (the umask's), not mkstemp's 0600."""
    path = output_file(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def leftover_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files that an interrupted :func:`atomic_write` left in ``folder`` (``.NAME.XXXX.tmp``)."""
    return [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex): recorded when a file is committed, checked before it is trusted."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, kind: type | None = None) -> Any:
    """The JSON value in ``path``; ``kind`` (e.g. dict) also checks its type."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PrunelabError(f"cannot read {path}: {error}") from None
    if kind is not None and not isinstance(value, kind):
        raise PrunelabError(f"{path} is corrupt: expected a JSON {'object' if kind is dict else kind.__name__}, "
                            f"found {type(value).__name__}")
    return value


def read_toml(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """The TOML table in ``path``; one line naming the ``what`` (config file, study file) when it cannot be."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise PrunelabError(f"{what} {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PrunelabError(f"{what} {path} is not valid TOML: {error}") from None
    except OSError as error:
        raise PrunelabError(f"cannot read {what} {path}: {error.strerror or error}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Write tensors (made contiguous, on the CPU) and JSON metadata to one safetensors file."""
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {})}
    atomic_write(path, _save_bytes(plain, metadata=meta))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: the tensors and the metadata."""
    try:
        raw = Path(path).read_bytes()
        tensors = _load_bytes(raw)
        header_size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_size])
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except (OSError, SafetensorError, ValueError) as error:
        raise PrunelabError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(meta, dict):
        raise PrunelabError(f"cannot read checkpoint {path}: its metadata is not a JSON object")
    return tensors, meta


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus every mask under ``mask::<parameter name>``."""
    tensors = dict(model.state_dict())
    tensors.update({MASK_PREFIX + name: mask for name, mask in masking.masks(model).items()})
    return tensors


def restore_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a state dict and its masks written by :func:`model_tensors` into ``model``."""
    state = {k: v for k, v in tensors.items() if "::" not in k}  # namespaced extras are not weights
    saved_masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise PrunelabError(f"checkpoint does not fit this model: {first}") from None
    masking.remove(model)
    if saved_masks:
        masking.attach(model, saved_masks)


def save_model(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Save weights and masks (no pickle): loadable with :func:`load_model` into the same architecture."""
    save_tensors(path, model_tensors(model), metadata)


def load_model(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load weights and masks saved by :func:`save_model` into ``model``; returns the metadata."""
    tensors, meta = load_tensors(path)
    restore_model(model, tensors)
    return meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            index, _, name = key[len(OPTIM_PREFIX):].partition(".")
            state.setdefault(int(index), {})[name] = value
    for index, entry in rest.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
