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


@pytest.fixture(scope="session", autouse=True)
def _decoded_cache(tmp_path_factory):
    """Decoded datasets are cached in a folder of this session, never in the user's cache (subprocesses
    started by tests inherit it)."""
    previous = os.environ.get("PRUNELAB_CACHE")
    os.environ["PRUNELAB_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    yield
    if previous is None:
        os.environ.pop("PRUNELAB_CACHE", None)
    else:
        os.environ["PRUNELAB_CACHE"] = previous


@pytest.fixture(autouse=True)
def _threads():
    # two threads on the 2-core CI machine; OMP_NUM_THREADS=1 when other jobs share it (oversubscribed
    # OpenMP threads spin and slow everything 10x)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def deep_narrow_mlp(seed=0):
    """A deep MLP with a 16-wide bottleneck: the layer-collapse test case of SNIP/SynFlow tests."""
    from torch import nn
    from prunelab.models import initialize
    torch.manual_seed(seed)
    widths = [64, 256, 16, 16, 16, 16, 256, 10]
    layers = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return initialize(nn.Sequential(*layers[:-1]), "vs", generator=torch.Generator().manual_seed(seed))
