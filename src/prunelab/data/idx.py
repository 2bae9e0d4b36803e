"""Decoding gzip-compressed IDX files (the MNIST / Fashion-MNIST format).

IDX layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
big-endian int32 per dimension, then the data. The whole file is decompressed once and viewed
with numpy, which is far faster than any per-sample parsing.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import PrunelabError

_UINT8 = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Return the uint8 array stored in a .gz IDX file, checking magic, dims and size."""
    try:
        raw = gzip.decompress(Path(path).read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise PrunelabError(f"corrupt or truncated gzip file {path}: {exc}") from None
    return parse_idx(raw, ndim, path)


def parse_idx(raw: bytes, ndim: int, path: Path | str = "<bytes>") -> np.ndarray:
    """Decode decompressed IDX bytes; `path` is only used in error messages."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise PrunelabError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != _UINT8:
        raise PrunelabError(f"{path}: IDX type code {raw[2]:#04x} is not uint8 (0x08)")
    if raw[3] != ndim:
        raise PrunelabError(f"{path}: expected {ndim} IDX dimensions, found {raw[3]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PrunelabError(f"{path}: IDX header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise PrunelabError(
            f"{path}: IDX dims {dims} need {expected} bytes, file has {len(raw)} (truncated or corrupt)"
        )
    # Copy so the array is writable: torch.from_numpy warns on read-only buffers.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_images_labels(images: Path, labels: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) uint8 and labels (N,) uint8, checked against each other."""
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if len(x) != len(y):
        raise PrunelabError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    if len(y) and int(y.max()) >= num_classes:
        raise PrunelabError(f"{labels}: label {int(y.max())} is out of range 0..{num_classes - 1}")
    return x, y
