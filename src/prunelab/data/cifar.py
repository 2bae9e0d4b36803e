"""Reading the CIFAR-10 / CIFAR-100 "python version" batch files.

Each batch is a Python-2 pickle of a dict holding `data` (N x 3072 uint8, R plane then G then B,
row-major 32x32 each) and `labels` (CIFAR-10) or `fine_labels` (CIFAR-100). Unpickling runs
whatever the file asks for, so only the few numpy globals these files need are allowed: a
tampered download then fails with an error instead of executing code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import PrunelabError

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 name, used by the published files
    ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 name
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle; harmless
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    """Unpickle a CIFAR file into a dict with str keys (bytes keys are decoded)."""
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except OSError as exc:
        raise PrunelabError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # pickle raises many types on damaged input (EOFError, KeyError, ...)
        raise PrunelabError(f"corrupt or truncated CIFAR file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise PrunelabError(f"{path} does not hold a CIFAR dict (got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one batch file, validated."""
    batch = load_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise PrunelabError(f"{path} lacks the 'data' or {label_key!r} entry; is it a CIFAR batch?")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise PrunelabError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise PrunelabError(f"{path}: {label_key!r} is not a list of integers") from None
    if labels.shape != (len(data),):
        raise PrunelabError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise PrunelabError(f"{path}: labels must lie in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def read_batches(paths: list[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate several batch files in order."""
    parts = [read_batch(p, label_key, num_classes) for p in paths]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
