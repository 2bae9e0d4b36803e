"""The papers' numbers a report sets beside a study's: a TOML file of ``[[point]]`` tables.

    [[point]]
    model = "lenet300-100"
    dataset = "mnist"
    method = "snip"                  # a prunelab method name; "none" for a paper's dense reference
    sparsity = 0.95                  # and/or compression_ratio, flops_reduction: what the paper states
    test_error_pct = 1.6
    source = "Lee, Ajanthan & Torr, ICLR 2019 (SNIP), Table 1"
    note = "SGD 0.9, lr 0.1, batch 100 (the paper's section 5)"   # optional: its recipe, a caveat

Every point names its source; an unknown key or a missing source is one PrunelabError line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..errors import PrunelabError

REQUIRED = {"model": str, "dataset": str, "method": str, "test_error_pct": float, "source": str}
OPTIONAL = {"sparsity": float, "compression_ratio": float, "flops_reduction": float, "note": str}


def load_references(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    raw = checkpoint.read_toml(path, "references file")
    if set(raw) - {"point"} or not isinstance(raw.get("point", []), list):
        raise PrunelabError(f"{path}: a references file holds [[point]] tables only")
    return [_check(point, f"{path}: point {i + 1}") for i, point in enumerate(raw.get("point", []))]


def _check(point: Any, where: str) -> dict[str, Any]:
    if not isinstance(point, dict):
        raise PrunelabError(f"{where} is not a table")
    kinds = {**REQUIRED, **OPTIONAL}
    for key, value in point.items():
        if key not in kinds:
            raise PrunelabError(f"{where}: unknown key {key!r}; keys: {', '.join(kinds)}")
        kind = kinds[key]
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PrunelabError(f"{where}: {key} must be a number, got {value!r}")
        elif not isinstance(value, str) or not value:
            raise PrunelabError(f"{where}: {key} must be a non-empty string, got {value!r}")
    missing = [key for key in REQUIRED if key not in point]
    if missing:
        raise PrunelabError(f"{where}: missing {', '.join(missing)} (every point names its source)")
    if not any(key in point for key in ("sparsity", "compression_ratio", "flops_reduction")):
        raise PrunelabError(f"{where}: give where it sits: sparsity, compression_ratio or flops_reduction")
    return dict(point)
