import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets: $PRUNELAB_DATA (CI sets ../shared/datasets), else the shared folder beside the repo."""
    root = Path(os.environ.get("PRUNELAB_DATA", SHARED))
    if not (root / "mnist").is_dir():
        pytest.skip(f"real datasets not found under {root} (set PRUNELAB_DATA)")
    return root


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
