"""A compact, pickle-free file for unstructured (masked) models: kept values plus a bitmask or CSR indices.

A dense checkpoint (:func:`prunelab.save_model`) stores every weight, zeros included, and each mask as
one byte per weight. This format stores, for each masked tensor, only the weights its mask keeps (a 1-D
tensor, in the parameter's dtype or float16 when asked), plus where they are, in whichever of two
encodings is smaller for that tensor:

* ``bitmask``: the mask packed 8 positions per byte (``numpy.packbits`` order: the first position is the
  most significant bit of the first byte), ``ceil(numel / 8)`` bytes;
* ``csr``: the tensor seen as a matrix ``(shape[0], numel / shape[0])`` (1-D: one row), column indices
  of the kept weights (uint8 / int16 / int32: the smallest that holds the column count) and row
  pointers (int16 / int32 / int64: the smallest that holds the count of kept weights).

Unmasked parameters and buffers are stored dense; a parameter held under two names (tied weights) is
stored once. The safetensors header metadata (JSON) names the format and its version and, per tensor,
the encoding, shape, dtype and count of kept weights; see docs/sparse.md.

Loading gives back bitwise the kept weights and the masks; pruned positions load as +0.0 (a masked
multiply may have left -0.0 there in the saved model: equal as numbers, the same in every forward pass).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save as _save_bytes
from torch import nn

from . import masking
from .checkpoint import MASK_PREFIX, atomic_write, load_tensors, output_file, restore_model
from .errors import PrunelabError

FORMAT = "prunelab-sparse"
VERSION = 1
ENCODINGS = ("dense", "bitmask", "csr", "alias")
_VALUE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _index_dtype(limit: int, choices: tuple[torch.dtype, ...]) -> torch.dtype:
    """The first of ``choices`` that holds every value in ``[0, limit]``."""
    for dtype in choices:
        if limit <= torch.iinfo(dtype).max:
            return dtype
    return choices[-1]


def _as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)


def _stored(value: torch.Tensor, values_dtype: torch.dtype | None, name: str) -> torch.Tensor:
    """``value`` cast to ``values_dtype`` when asked and it is floating point (an overflow is an error)."""
    if values_dtype is None or not value.is_floating_point() or value.dtype == values_dtype:
        return value
    cast = value.to(values_dtype)
    if bool((torch.isfinite(value) & ~torch.isfinite(cast)).any()):
        raise PrunelabError(f"{name} has values beyond the range of {_dtype_name(values_dtype)}; "
                            "save it without values_dtype")
    return cast


def encode(name: str, tensor: torch.Tensor, mask: torch.Tensor,
           values_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One masked tensor as stored: ``({file key: tensor}, its metadata entry)``; the smaller encoding."""
    tensor = tensor.detach().to("cpu").contiguous()
    flat_mask = mask.detach().to("cpu", torch.bool).reshape(-1)
    shape = tuple(tensor.shape)
    values = tensor.reshape(-1)[flat_mask]
    nnz = int(values.numel())
    rows, cols = _as_rows(shape)
    col_dtype = _index_dtype(max(cols - 1, 0), (torch.uint8, torch.int16, torch.int32, torch.int64))
    ptr_dtype = _index_dtype(nnz, (torch.int16, torch.int32, torch.int64))
    bitmask_bytes = (flat_mask.numel() + 7) // 8
    csr_bytes = nnz * col_dtype.itemsize + (rows + 1) * ptr_dtype.itemsize
    entry: dict[str, Any] = {"shape": list(shape), "dtype": _dtype_name(tensor.dtype), "nnz": nnz}
    stored = {f"{name}::values": _stored(values, values_dtype, name)}
    if csr_bytes < bitmask_bytes:
        grid = flat_mask.reshape(rows, cols)
        counts = grid.sum(dim=1)
        pointers = torch.zeros(rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=pointers[1:])
        columns = grid.nonzero()[:, 1]  # row-major order: the order of ``values``
        stored[f"{name}::col"] = columns.to(col_dtype)
        stored[f"{name}::rowptr"] = pointers.to(ptr_dtype)
        entry["encoding"] = "csr"
    else:
        packed = np.packbits(flat_mask.numpy().astype(np.uint8))
        stored[f"{name}::bitmask"] = torch.from_numpy(packed)
        entry["encoding"] = "bitmask"
    return stored, entry


def sparse_tensors(model: nn.Module, values_dtype: torch.dtype | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The file's tensors and metadata for ``model`` (its state dict and masks)."""
    if values_dtype is not None and values_dtype not in _VALUE_DTYPES:
        raise PrunelabError(f"values_dtype must be torch.float16 or torch.bfloat16 (or None: the "
                            f"parameters' own dtypes), got {values_dtype!r}")
    state = model.state_dict(keep_vars=False)
    masks = masking.masks(model)
    names = set(state)
    for name in masks:
        if name not in names:
            raise PrunelabError(f"mask for {name!r}, which is not in the model's state dict")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    seen: dict[tuple, str] = {}
    for name, value in state.items():
        if not torch.is_tensor(value) or value.layout != torch.strided:
            raise PrunelabError(f"state dict entry {name!r} is not a dense tensor; the sparse format "
                                "stores dense and masked tensors only")
        key = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()), value.device)
        if value.numel() and key in seen and name not in masks:
            entries[name] = {"encoding": "alias", "of": seen[key]}
            continue
        seen.setdefault(key, name)
        if name in masks:
            stored, entry = encode(name, value, masks[name], values_dtype)
        else:
            stored = {name: _stored(value.detach().to("cpu").contiguous(), values_dtype, name)}
            entry = {"encoding": "dense", "shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
        tensors.update(stored)
        entries[name] = entry
    meta = {"format": FORMAT, "version": VERSION,
            "values_dtype": _VALUE_DTYPES.get(values_dtype) if values_dtype is not None else None,
            "tensors": entries}
    return tensors, meta


def save_sparse(path: str | os.PathLike, model: nn.Module, *, values_dtype: torch.dtype | None = None,
                metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (weights and masks) as a sparse safetensors file, atomically, and read its header
    back to check it. ``values_dtype=torch.float16`` stores floating-point values in half precision
    (lossy, about half the size). ``metadata`` (JSON-serialisable) is kept under ``"user"``.
    Returns a summary: bytes written and the encoding of each tensor."""
    path = output_file(path)
    tensors, meta = sparse_tensors(model, values_dtype)
    if metadata is not None:
        meta["user"] = dict(metadata)
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as error:
        raise PrunelabError(f"metadata is not JSON-serialisable: {error}") from None
    payload = _save_bytes(tensors, metadata={"json": text})
    atomic_write(path, payload)
    header = _read_header(path)
    if json.loads(header.get("__metadata__", {}).get("json", "null")) != meta or \
            set(header) - {"__metadata__"} != set(tensors):
        raise PrunelabError(f"{path}: the file read back does not match what was written")
    return {"path": str(path), "bytes": len(payload),
            "encodings": {name: entry["encoding"] for name, entry in meta["tensors"].items()}}


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise ValueError("bad header length")
            return json.loads(handle.read(size))
    except (OSError, ValueError) as error:
        raise PrunelabError(f"cannot read back {path}: {error}") from None


def load_sparse_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense state dict and the masks (bool) stored in a sparse file, on the CPU."""
    state, masks, _ = _decode_file(path)
    return state, masks


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The format metadata of a sparse file (encodings, shapes, dtypes; ``"user"``: what was passed)."""
    return _decode_file(path)[2]


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (a fresh instance of the same class):
    weights loaded, masks attached. Returns ``model``."""
    state, masks, _ = _decode_file(path)
    tensors = dict(state)
    tensors.update({MASK_PREFIX + name: mask for name, mask in masks.items()})
    restore_model(model, tensors)
    return model


def _decode_file(path: str | os.PathLike):
    try:
        tensors, meta = load_tensors(path)
    except PrunelabError as error:
        raise PrunelabError(str(error).replace("cannot read checkpoint", "cannot read sparse file", 1)) from None
    if meta.get("format") != FORMAT:
        raise PrunelabError(f"{path} is not a prunelab sparse file (no '{FORMAT}' format in its metadata; "
                            "a dense checkpoint loads with load_model)")
    if meta.get("version") != VERSION:
        raise PrunelabError(f"{path}: sparse format version {meta.get('version')!r} is not supported "
                            f"(this prunelab reads version {VERSION})")
    try:
        state, masks = _decode(tensors, meta["tensors"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, SafetensorError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PrunelabError(f"{path} is corrupt: {first}") from None
    return state, masks, meta


def _decode(tensors: dict[str, torch.Tensor], entries: dict[str, Any]):
    if not isinstance(entries, dict):
        raise ValueError("its tensor table is not a JSON object")
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    aliases = {}
    for name, entry in entries.items():
        encoding = entry.get("encoding")
        if encoding not in ENCODINGS:
            raise ValueError(f"{name}: unknown encoding {encoding!r}")
        if encoding == "alias":
            aliases[name] = entry["of"]
            continue
        shape = tuple(int(s) for s in entry["shape"])
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: unknown dtype {entry['dtype']!r}")
        if encoding == "dense":
            value = tensors[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, metadata says {shape}")
            state[name] = value.to(dtype)
            continue
        values = tensors[f"{name}::values"]
        nnz = int(entry["nnz"])
        numel = math.prod(shape)
        if values.dim() != 1 or values.numel() != nnz or nnz > numel:
            raise ValueError(f"{name}: {values.numel()} values, metadata says {nnz}")
        if encoding == "bitmask":
            packed = tensors[f"{name}::bitmask"]
            if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
                raise ValueError(f"{name}: bitmask of {packed.numel()} bytes for {numel} positions")
            bits = np.unpackbits(packed.numpy(), count=numel)
            flat_mask = torch.from_numpy(bits.astype(np.bool_))
        else:
            rows, cols = _as_rows(shape)
            columns = tensors[f"{name}::col"].to(torch.int64)
            pointers = tensors[f"{name}::rowptr"].to(torch.int64)
            if pointers.numel() != rows + 1 or columns.numel() != nnz or int(pointers[0]) != 0 \
                    or int(pointers[-1]) != nnz or bool((pointers.diff() < 0).any()):
                raise ValueError(f"{name}: row pointers do not fit {rows} rows and {nnz} values")
            if nnz and (int(columns.min()) < 0 or int(columns.max()) >= cols):
                raise ValueError(f"{name}: column index out of range 0..{cols - 1}")
            row_of = torch.repeat_interleave(torch.arange(rows), pointers.diff())
            positions = row_of * cols + columns
            flat_mask = torch.zeros(numel, dtype=torch.bool)
            flat_mask[positions] = True
            if nnz and bool((positions.diff() <= 0).any()):
                raise ValueError(f"{name}: column indices not strictly increasing within rows")
        if int(flat_mask.sum()) != nnz:
            raise ValueError(f"{name}: mask keeps {int(flat_mask.sum())} positions, metadata says {nnz}")
        dense = torch.zeros(numel, dtype=dtype)
        dense[flat_mask] = values.to(dtype)
        state[name] = dense.reshape(shape)
        masks[name] = flat_mask.reshape(shape)
    for name, first in aliases.items():
        if first not in state:
            raise ValueError(f"{name}: alias of unknown tensor {first!r}")
        state[name] = state[first]
    return state, masks
