"""Tests for prunelab.data: real-data loading, splits, integrity checks, downloads, batching.

Real data comes from $PRUNELAB_DATA (CI: ../shared/datasets). Downloads are only ever served by a
local HTTP server started here, so no test touches the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import tarfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.data import (
    ArrayDataset,
    DatasetSplits,
    dataset_info,
    default_root,
    list_datasets,
    load_dataset,
    split_indices,
)
from prunelab.data import cache, cifar, download, idx, registry
from prunelab.data.transforms import PadCropFlip, normalize, random_crop, random_hflip
from prunelab.errors import PrunelabError

MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def _private_decoded_cache(tmp_path_factory):
    # No test may write decoded-data cache entries into the shared data or the real user cache.
    # Module scope, so that it is in place before module fixtures (cifar10) load anything.
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PRUNELAB_CACHE", str(tmp_path_factory.mktemp("decoded")))
        yield


@pytest.fixture(autouse=True)
def _no_mirror_env(monkeypatch):
    # A PRUNELAB_DATA_URL in the environment must not redirect any test's downloads.
    monkeypatch.delenv("PRUNELAB_DATA_URL", raising=False)


@pytest.fixture(scope="session")
def data_root() -> Path:
    env = os.environ.get("PRUNELAB_DATA")
    if not env:
        pytest.skip("PRUNELAB_DATA is not set; point it at the shared datasets folder to run real-data tests")
    root = Path(env).expanduser().resolve()
    if not (root / "mnist").is_dir():
        pytest.skip(f"PRUNELAB_DATA={env} has no mnist/ folder; real-data tests need the shared datasets")
    return root


def _need(root: Path, sub: str) -> Path:
    path = root / sub
    if not path.is_dir():
        pytest.skip(f"{path} is not present in PRUNELAB_DATA")
    return path


class _Server:
    """A static file server on 127.0.0.1 that records the paths requested."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(directory: Path) -> _Server:
        servers.append(_Server(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(scope="module")
def cifar10(data_root):
    _need(data_root, "cifar10/cifar-10-batches-py")
    return load_dataset("cifar10", root=data_root, download=False)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")] if folder.exists() else []


@contextlib.contextmanager
def _no_decoding(name: str):
    """Make decoding (and MD5-hashing the sources) fail, so a load that works came from the disk cache."""
    def read(folder):
        raise AssertionError(f"{name} was decoded instead of loaded from the cache")

    def check_md5(*args, **kwargs):
        raise AssertionError("source files were hashed on a cache hit")

    with pytest.MonkeyPatch.context() as m:
        m.setitem(registry._SPECS, name, dataclasses.replace(registry._SPECS[name], read=read))
        m.setattr(registry, "check_md5", check_md5)
        yield


def _same_splits(a: DatasetSplits, b: DatasetSplits) -> bool:
    """Identical bytes (not just equal values: -0.0 vs 0.0 would differ) in every split."""
    return all(x.inputs.dtype == y.inputs.dtype == torch.float32 and x.inputs.shape == y.inputs.shape
               and torch.equal(x.inputs.view(torch.int32), y.inputs.view(torch.int32))
               and torch.equal(x.targets, y.targets) for x, y in zip(a, b))


# --------------------------------------------------------------------------- real data

def test_mnist_loads_normalised_and_second_call_is_cached(data_root):
    registry._decoded.cache_clear()
    splits = load_dataset("mnist", root=data_root, download=False)
    train, val, test = load_dataset("MNIST", root=data_root, download=False)  # case-insensitive

    assert isinstance(splits, DatasetSplits)
    assert registry._decoded.cache_info().hits >= 1  # the second call reused the decoded arrays
    assert train.inputs.shape == (54000, 1, 28, 28)
    assert val.inputs.shape == (6000, 1, 28, 28)
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert (len(train), len(val), len(test)) == (54000, 6000, 10000)
    for ds in (train, val, test):
        assert ds.inputs.dtype == torch.float32 and ds.targets.dtype == torch.int64
        assert ds.classes == tuple("0123456789")
        assert ds.augment is None
    assert abs(train.inputs.mean().item()) < 0.01
    assert abs(train.inputs.std().item() - 1) < 0.01
    # Pixel 0 maps to -mean/std, pixel 255 to (1-mean)/std.
    assert train.inputs.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert train.inputs.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    assert sorted(train.targets.unique().tolist()) == list(range(10))
    # Published test-set class counts of MNIST.
    assert test.targets.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.equal(splits.test.inputs, test.inputs)


def test_fashion_mnist_loads(data_root):
    _need(data_root, "fashion-mnist")
    train, val, test = load_dataset("fashion-mnist", root=data_root, download=False, val_fraction=0.2)
    assert (len(train), len(val), len(test)) == (48000, 12000, 10000)
    assert train.inputs.shape[1:] == (1, 28, 28)
    assert test.targets.bincount().tolist() == [1000] * 10
    assert (train.targets.bincount() + val.targets.bincount()).tolist() == [6000] * 10
    assert abs(train.inputs.mean().item()) < 0.01 and abs(train.inputs.std().item() - 1) < 0.01
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"


def test_cifar10_loads_rebuilt_files(cifar10, data_root):
    folder = data_root / "cifar10" / "cifar-10-batches-py"
    # The shared files are the rebuilt copies: accepted only through the explicit allow-list.
    for rel, rebuilt in registry.KNOWN_REBUILT_MD5.items():
        assert download.cached_md5(data_root / "cifar10" / rel) == rebuilt
    train, val, test = cifar10
    assert (len(train), len(val), len(test)) == (45000, 5000, 10000)
    assert train.inputs.shape == (45000, 3, 32, 32) and test.inputs.shape == (10000, 3, 32, 32)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert test.targets.bincount().tolist() == [1000] * 10
    assert (train.targets.bincount() + val.targets.bincount()).tolist() == [5000] * 10
    # Per-channel normalisation with the published CIFAR-10 statistics.
    channel_means = train.inputs.mean(dim=(0, 2, 3))
    assert channel_means.abs().max().item() < 0.01
    assert isinstance(train.augment, PadCropFlip) and val.augment is None and test.augment is None
    # The hard-coded class names agree with the dataset's own meta file.
    meta = cifar.load_pickle(folder / "batches.meta")
    assert tuple(n.decode() for n in meta["label_names"]) == train.classes


def test_cifar10_batches_augment_train_only(cifar10):
    train, _, test = cifar10
    x_aug, y_aug = next(train.batches(256, shuffle=True, seed=3))
    x_plain, y_plain = next(train.batches(256, shuffle=True, seed=3, augment=False))
    assert torch.equal(y_aug, y_plain)  # same permutation either way
    assert x_aug.shape == x_plain.shape == (256, 3, 32, 32)
    assert not torch.equal(x_aug, x_plain)
    x_again, _ = next(train.batches(256, shuffle=True, seed=3))
    assert torch.equal(x_aug, x_again)
    x_test, _ = next(test.batches(256))
    assert torch.equal(x_test, test.inputs[:256])


# --------------------------------------------------------------------------- decoded-data cache

def _load_as_before(name: str, root: Path, seed: int, val_fraction: float, normalize_inputs: bool) -> DatasetSplits:
    """load_dataset as it was before the disk cache: decode, resize, split, normalise each split."""
    spec = registry._SPECS[name]
    tx, ty, sx, sy = (torch.from_numpy(a.astype(np.int64) if a.ndim == 1 else a)
                      for a in spec.read(root / spec.folder))
    if spec.resize:
        tx, sx = registry._resized(tx, spec.resize), registry._resized(sx, spec.resize)
    train_idx, val_idx = split_indices(len(tx), val_fraction, seed)
    mean, std = spec.info.mean, spec.info.std
    if not normalize_inputs:
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    return DatasetSplits(*(ArrayDataset(normalize(x, mean, std), y, spec.classes) for x, y in
                           ((tx[train_idx], ty[train_idx]), (tx[val_idx], ty[val_idx]), (sx, sy))))


@pytest.mark.parametrize("name", ["mnist", "mnist32"])
def test_disk_cache_hit_gives_identical_tensors_and_splits(name, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    configs = [dict(seed=0, val_fraction=0.1, normalize_inputs=True),
               dict(seed=7, val_fraction=0.25, normalize_inputs=False)]
    registry._decoded.cache_clear()
    decoded = [load_dataset(name, root=data_root, download=False, **c) for c in configs]
    assert len(list((tmp_path / "cache").glob(f"{name}-*.safetensors"))) == 1

    registry._decoded.cache_clear()  # as in a new process: only the disk cache is left
    with _no_decoding(name):
        cached = [load_dataset(name, root=data_root, download=False, **c) for c in configs]
    for a, b in zip(decoded, cached):
        assert _same_splits(a, b)
    # ... and both are byte for byte what loading gave before there was a cache.
    assert _same_splits(cached[0], _load_as_before(name, data_root, **configs[0]))


def test_corrupt_cache_entry_is_detected_and_rebuilt(data_root, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(cache_dir))
    folder = (data_root / "mnist").resolve()
    registry._decoded.cache_clear()
    good = load_dataset("mnist", root=data_root, download=False)
    [entry] = cache_dir.glob("mnist-*.safetensors")
    pristine = entry.read_bytes()
    key = json.loads(pristine[8:8 + int.from_bytes(pristine[:8], "little")])["__metadata__"]["key"]
    assert cache.load("mnist", folder, key) is not None

    def flipped(at: int) -> bytes:
        return pristine[:at] + bytes([pristine[at] ^ 0x01]) + pristine[at + 1:]

    digest_at = pristine.index(b'"sha256":"') + len(b'"sha256":"')
    damaged = {"a pixel byte": flipped(len(pristine) // 2), "the stored digest": flipped(digest_at),
               "the header length": flipped(0), "truncated": pristine[: len(pristine) // 2], "empty": b""}
    for what, data in damaged.items():
        entry.write_bytes(data)
        assert cache.load("mnist", folder, key) is None, what
        assert not entry.exists(), f"the entry with {what} damaged was not deleted"

    # A sound entry under another key's name (a foreign or renamed file) is not used either.
    other_key = key.replace('"resize": null', '"resize": 99')
    assert other_key != key
    other = cache.entry_path(cache_dir, "mnist", folder, other_key)
    other.write_bytes(pristine)
    assert cache.load("mnist", folder, other_key) is None and not other.exists()

    # Through load_dataset (as in a new process): the damaged entry is rebuilt, silently.
    entry.write_bytes(flipped(len(pristine) // 2))
    registry._decoded.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_dataset("mnist", root=data_root, download=False)
    assert _same_splits(good, again)
    assert cache.load("mnist", folder, key) is not None  # the rebuilt entry verifies


def test_unwritable_data_root_falls_back_to_user_cache(data_root, tmp_path, monkeypatch):
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    for f in MNIST_FILES:
        shutil.copy(data_root / "mnist" / f, folder / f)
    monkeypatch.delenv("PRUNELAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    user_cache = tmp_path / "xdg" / "prunelab" / "decoded"

    # A writable data folder holds its own cache, in files with the umask's ordinary mode.
    registry._decoded.cache_clear()
    first = load_dataset("mnist", root=tmp_path / "root", download=False)
    [entry] = (folder / ".decoded").glob("mnist-*.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~umask
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()

    # A read-only data folder (its mode is honoured even by root, whom the OS would let write).
    shutil.rmtree(folder / ".decoded")
    folder.chmod(0o555)
    try:
        registry._decoded.cache_clear()
        second = load_dataset("mnist", root=tmp_path / "root", download=False)
        assert len(list(user_cache.glob("mnist-*.safetensors"))) == 1 and not (folder / ".decoded").exists()
        registry._decoded.cache_clear()
        with _no_decoding("mnist"):
            third = load_dataset("mnist", root=tmp_path / "root", download=False)  # from the user cache
        assert _same_splits(first, second) and _same_splits(first, third)

        # Nowhere to write: the load still works, it just decodes.
        (tmp_path / "file").write_text("not a folder")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
        registry._decoded.cache_clear()
        assert _same_splits(first, load_dataset("mnist", root=tmp_path / "root", download=False))
    finally:
        folder.chmod(0o755)

    # A source file changed since the entry was made (same size, mtime put back) is not served from
    # the cache: it is read again and refused (by its MD5 in a new process; here download.py's
    # in-process MD5 memo, keyed on size and mtime, lets it through to the gzip check).
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    before, data = labels.stat(), labels.read_bytes()
    labels.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    registry._decoded.cache_clear()
    with pytest.raises(PrunelabError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", root=tmp_path / "root", download=False)


# --------------------------------------------------------------------------- splits

def test_split_indices_deterministic_disjoint_and_covering():
    tr, va = split_indices(1000, 0.1, seed=0)
    tr2, va2 = split_indices(1000, 0.1, seed=0)
    _, va3 = split_indices(1000, 0.1, seed=1)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, va3)
    assert len(va) == 100 and len(tr) == 900
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    tr0, va0 = split_indices(1000, 0.0, seed=0)
    assert len(va0) == 0 and torch.equal(tr0, torch.arange(1000))


def test_load_split_uses_seed_and_leaves_test_alone(data_root):
    full, empty, test_a = load_dataset("mnist", root=data_root, download=False, val_fraction=0)
    assert len(full) == 60000 and len(empty) == 0 and empty.inputs.shape == (0, 1, 28, 28)
    train, val, test_b = load_dataset("mnist", root=data_root, download=False, val_fraction=0.1, seed=7)
    tr_idx, va_idx = split_indices(60000, 0.1, seed=7)
    assert torch.equal(val.inputs, full.inputs[va_idx]) and torch.equal(val.targets, full.targets[va_idx])
    assert torch.equal(train.targets, full.targets[tr_idx])
    assert torch.equal(test_a.inputs, test_b.inputs)  # the split never touches the test set
    assert torch.equal(train.inputs, full.inputs[tr_idx]) and len(train) + len(val) == 60000


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.1", None, True, float("nan")])
def test_val_fraction_out_of_range(bad, tmp_path):
    with pytest.raises(PrunelabError, match="val_fraction"):
        load_dataset("mnist", root=tmp_path, val_fraction=bad, download=False)


# --------------------------------------------------------------------------- names and roots

def test_unknown_dataset_lists_names():
    with pytest.raises(PrunelabError) as err:
        load_dataset("imagenet", download=False)
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet"):
        assert name in str(err.value)
    with pytest.raises(PrunelabError):
        dataset_info("fmnist")
    with pytest.raises(PrunelabError):
        dataset_info(["mnist"])


def test_dataset_info_and_list():
    names = [d.name for d in list_datasets()]
    assert names == ["mnist", "fashion-mnist", "cifar10", "cifar100", "mnist32"]
    info = dataset_info("CIFAR100")
    assert info.input_shape == (3, 32, 32) and info.num_classes == 100
    assert info.mean == (0.5071, 0.4865, 0.4409) and info.std == (0.2673, 0.2564, 0.2762)
    assert dataset_info("fashion-mnist").mean == (0.2860,)
    assert dataset_info("mnist").train_size == 60000 and dataset_info("cifar10").test_size == 10000
    assert len(registry._SPECS["cifar100"].classes) == 100


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "d"))
    assert default_root() == tmp_path / "d"
    monkeypatch.delenv("PRUNELAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "prunelab" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".cache" / "prunelab" / "datasets"


def test_missing_file_without_download(tmp_path):
    with pytest.raises(PrunelabError) as err:
        load_dataset("mnist", root=tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in msg and "download" in msg
    assert not (tmp_path / "mnist").exists()


# --------------------------------------------------------------------------- integrity

def test_corrupt_file_on_disk_is_refused_not_replaced(data_root, tmp_path, serve):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for f in MNIST_FILES:
        shutil.copy(data_root / "mnist" / f, folder / f)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    bad_md5 = _md5(target)
    # A good copy is on offer, but a failed check must never trigger a download over the file.
    server = serve(data_root / "mnist")
    with pytest.raises(PrunelabError) as err:
        load_dataset("mnist", root=tmp_path, base_url=server.url, download=True)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and MNIST_MD5[target.name] in msg and bad_md5 in msg
    assert server.requests == []
    assert target.read_bytes() == bytes(raw)


def test_rebuilt_md5_allow_list_is_narrow(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"not cifar")
    with pytest.raises(PrunelabError, match="expected md5 c99cafc152244af753f735de768cd75f"):
        download.check_md5(path, "c99cafc152244af753f735de768cd75f", {"1cce77bf8467de2515852f3007c2ddf4"})
    download.check_md5(path, "0" * 32, {_md5(path)})  # an allow-listed MD5 is accepted
    # The allow-list covers the six CIFAR-10 batches and nothing else.
    assert set(registry.KNOWN_REBUILT_MD5) == set(registry._SPECS["cifar10"].also_accept)
    assert all(not spec.also_accept for n, spec in registry._SPECS.items() if n != "cifar10")


def test_md5_cache_notices_changed_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"one")
    assert download.cached_md5(path) == hashlib.md5(b"one").hexdigest()
    path.write_bytes(b"two!")
    assert download.cached_md5(path) == hashlib.md5(b"two!").hexdigest()
    assert download.md5sum(path) == hashlib.md5(b"two!").hexdigest()


def test_truncated_gz_and_bad_idx(tmp_path, data_root):
    good = (data_root / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    truncated = tmp_path / "t10k-labels-idx1-ubyte.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(PrunelabError, match="t10k-labels-idx1-ubyte.gz"):
        idx.read_idx(truncated, 1)
    # Through load_dataset the truncated copy fails its checksum first; still a clean error.
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    for f in MNIST_FILES:
        shutil.copy(data_root / "mnist" / f, folder / f)
    shutil.copy(truncated, folder / truncated.name)
    with pytest.raises(PrunelabError, match="checksum mismatch"):
        load_dataset("mnist", root=tmp_path / "root", download=False)

    wrong_magic = tmp_path / "magic.gz"
    wrong_magic.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 40))
    with pytest.raises(PrunelabError, match="magic.gz: expected 1 IDX dimensions"):
        idx.read_idx(wrong_magic, 1)
    with pytest.raises(PrunelabError, match="bad magic"):
        idx.parse_idx(b"\x12\x34\x08\x01" + b"\x00" * 8, 1)
    with pytest.raises(PrunelabError, match="not uint8"):
        idx.parse_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4, 1)
    short = b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02"
    with pytest.raises(PrunelabError, match="truncated"):
        idx.parse_idx(short, 1)
    ok = idx.parse_idx(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6)), 2)
    assert ok.shape == (2, 3) and ok.dtype == np.uint8 and ok.tolist() == [[0, 1, 2], [3, 4, 5]]


# --------------------------------------------------------------------------- downloads

def test_download_from_local_server(data_root, tmp_path, serve):
    served = tmp_path / "served"
    shutil.copytree(data_root / "mnist", served)
    server = serve(served)
    root = tmp_path / "root"
    train, val, test = load_dataset("mnist", root=root, base_url=server.url)
    assert sorted(server.requests) == sorted("/" + f for f in MNIST_FILES)
    for f in MNIST_FILES:
        assert _md5(root / "mnist" / f) == MNIST_MD5[f]
    assert _leftovers(root / "mnist") == []
    assert (len(train), len(val), len(test)) == (54000, 6000, 10000)
    load_dataset("mnist", root=root, base_url=server.url)
    assert len(server.requests) == 4  # nothing fetched twice


def test_corrupt_download_is_refused_and_not_kept(data_root, tmp_path, serve):
    served = tmp_path / "served"
    served.mkdir()
    for f in MNIST_FILES[1:]:  # skip the 10 MB image file: the refusal happens per file
        shutil.copy(data_root / "mnist" / f, served / f)
    bad = served / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-10] + b"0123456789")
    server = serve(served)
    dest = tmp_path / "root" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(PrunelabError) as err:
        download.fetch(server.url + bad.name, dest, MNIST_MD5[bad.name])
    msg = str(err.value)
    assert bad.name in msg and MNIST_MD5[bad.name] in msg and _md5(bad) in msg
    assert not dest.exists() and _leftovers(dest.parent) == []

    # Through load_dataset: the first missing file is not served (HTTP 404) -> clean error.
    with pytest.raises(PrunelabError, match="could not download train-images-idx3-ubyte.gz") as err:
        load_dataset("mnist", root=tmp_path / "root", base_url=server.url)
    assert f"put the files in {dest.parent}" in str(err.value)
    assert _leftovers(dest.parent) == []
    with pytest.raises(PrunelabError, match="could not download"):
        load_dataset("fashion-mnist", root=tmp_path / "root", base_url=server.url)
    assert not (tmp_path / "root" / "fashion-mnist").exists()  # no empty folder left behind


def test_fetch_network_errors_are_prunelab_errors(tmp_path):
    with pytest.raises(PrunelabError, match="could not download x.gz"):
        download.fetch_first(["http://127.0.0.1:9/x.gz"], tmp_path / "x.gz", "0" * 32)
    with pytest.raises(PrunelabError, match="scheme"):
        download.fetch("ftp://example.invalid/x.gz", tmp_path / "x.gz", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def _fake_cifar100(folder: Path) -> Path:
    """A tiny archive in the CIFAR-100 python layout: 2 train and 1 test image per class."""
    rng = np.random.default_rng(0)
    inner = {}
    for split, per_class in (("train", 2), ("test", 1)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        inner[split] = pickle.dumps({b"data": data, b"fine_labels": labels, b"coarse_labels": labels}, protocol=2)
    inner["meta"] = pickle.dumps({b"fine_label_names": [c.encode() for c in registry._CIFAR100_CLASSES]})
    archive = folder / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in inner.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def test_cifar100_archive_download_and_extract(tmp_path, serve, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    archive = _fake_cifar100(served)
    spec = registry._SPECS["cifar100"]
    # Same loader, sized for the tiny archive and trusting its MD5 in place of the published one.
    small = dataclasses.replace(
        spec,
        info=dataclasses.replace(spec.info, train_size=200, test_size=100),
        archive=(archive.name, _md5(archive)),
        per_class=(2, 1),
    )
    monkeypatch.setitem(registry._SPECS, "cifar100", small)
    server = serve(served)
    root = tmp_path / "root"
    train, val, test = load_dataset("cifar100", root=root, base_url=server.url, val_fraction=0.25)
    assert server.requests == ["/cifar-100-python.tar.gz"]
    assert (len(train), len(val), len(test)) == (150, 50, 100)
    assert train.inputs.shape == (150, 3, 32, 32) and len(train.classes) == 100
    assert test.targets.tolist() == list(range(100))
    assert isinstance(train.augment, PadCropFlip)
    assert (root / "cifar100" / "cifar-100-python" / "train").is_file()
    assert _leftovers(root / "cifar100") == [] and _leftovers(root / "cifar100" / "cifar-100-python") == []

    # A lost member is re-extracted from the kept archive, with no new download.
    (root / "cifar100" / "cifar-100-python" / "test").unlink()
    load_dataset("cifar100", root=root, base_url=server.url)
    assert len(server.requests) == 1

    # Content that breaks the published per-class counts is refused on load.
    monkeypatch.setitem(registry._SPECS, "cifar100", dataclasses.replace(small, per_class=(3, 1)))
    registry._decoded.cache_clear()  # the content check runs when decoding, which is cached
    with pytest.raises(PrunelabError, match="per class"):
        load_dataset("cifar100", root=root, download=False)


def test_unsafe_tar_members_are_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("cifar-100-python/train", "../escape"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(PrunelabError, match="unsafe member"):
        download.extract_members(archive, {"cifar-100-python/train": tmp_path / "out" / "train"})
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escape").exists()
    truncated = tmp_path / "short.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:20])
    with pytest.raises(PrunelabError, match="short.tar.gz"):
        download.extract_members(truncated, {"a": tmp_path / "a"})


def test_cifar_pickle_is_restricted_and_validated(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil_batch"
    evil.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(PrunelabError, match="evil_batch"):
        cifar.read_batch(evil, "labels", 10)
    assert not (tmp_path / "pwned").exists()

    good = tmp_path / "data_batch"
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    good.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 9]}, protocol=2))
    x, y = cifar.read_batch(good, "labels", 10)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 1, 2, 9]
    assert x[0, 1, 0, 0] == data[0, 1024]  # the G plane starts at byte 1024

    truncated = tmp_path / "truncated_batch"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(PrunelabError, match="truncated_batch"):
        cifar.read_batch(truncated, "labels", 10)
    wrong = tmp_path / "wrong_labels"
    wrong.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 10]}, protocol=2))
    with pytest.raises(PrunelabError, match="0..9"):
        cifar.read_batch(wrong, "labels", 10)


# --------------------------------------------------------------------------- batching and transforms

def _toy(n=103, augment=None) -> ArrayDataset:
    inputs = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 8).clone()
    return ArrayDataset(inputs, torch.arange(n), [str(i) for i in range(n)], augment)


def test_batches_cover_each_sample_once_and_are_deterministic():
    ds = _toy()
    plain = list(ds.batches(10))
    assert [len(y) for _, y in plain] == [10] * 10 + [3]
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(103))
    assert ds.num_batches(10) == 11 and ds.num_batches(10, drop_last=True) == 10

    def epoch(seed, **kw):
        return torch.cat([y for _, y in ds.batches(10, shuffle=True, seed=seed, **kw)])

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(103))
    assert torch.equal(a.sort().values, torch.arange(103))
    dropped = epoch(1, drop_last=True)
    assert len(dropped) == 100 and len(set(dropped.tolist())) == 100
    for x, y in ds.batches(16, shuffle=True, seed=0):
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # inputs and targets stay paired

    with pytest.raises(ValueError, match="seed"):
        ds.batches(10, shuffle=True)
    with pytest.raises(ValueError, match="augment"):
        ds.batches(10, shuffle=True, seed=0, augment=True)
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)


def test_dataset_item_subset_and_augment_default():
    aug = PadCropFlip(padding=2)
    ds = ArrayDataset(torch.randn(40, 3, 8, 8), torch.arange(40), ("a", "b"), aug)
    x, y = ds[5]
    assert torch.equal(x, ds.inputs[5]) and y.item() == 5
    sub = ds.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and sub.augment is aug and sub.classes == ("a", "b")
    assert torch.equal(sub.targets, torch.tensor([3, 1])) and torch.equal(sub.inputs[1], ds.inputs[1])
    assert torch.equal(ds.subset(ds.targets >= 38).targets, torch.tensor([38, 39]))
    assert len(ds.subset([])) == 0
    # Unshuffled iteration (evaluation) is never augmented unless asked for.
    assert torch.equal(next(ds.batches(40))[0], ds.inputs)
    x_aug, y_aug = next(ds.batches(40, shuffle=True, seed=0))
    assert x_aug.shape == (40, 3, 8, 8)
    assert not torch.equal(x_aug, ds.inputs[y_aug])
    with pytest.raises(ValueError):
        ArrayDataset(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long), ())


def test_hflip_and_crop_on_hand_made_tensor():
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_hflip(img, g, p=1.0), img.flip(-1))
    assert torch.equal(random_hflip(img, g, p=1.0)[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(random_hflip(img, g, p=0.0), img)
    assert torch.equal(random_crop(img, 0, g), img)

    batch = img.expand(300, 2, 4, 4).clone()
    batch[:, 1] += 100  # channels must move together
    out = random_crop(batch, 1, g)
    assert out.shape == batch.shape
    padded = torch.nn.functional.pad(batch[0], (1, 1, 1, 1))
    windows = {(dy, dx): padded[:, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)}
    seen = set()
    for crop in out:
        match = [k for k, w in windows.items() if torch.equal(crop, w)]
        assert len(match) == 1, "every crop must be one shifted window of the zero-padded image"
        seen.add(match[0])
    assert len(seen) == 9  # all offsets occur
    assert torch.equal(windows[(1, 1)], batch[0])

    flips = random_hflip(batch, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f, batch[0].flip(-1)) for f in flips]
    assert all(torch.equal(f, batch[0]) or fl for f, fl in zip(flips, flipped))
    assert 100 < sum(flipped) < 200  # p = 0.5


def test_normalize_scales_then_standardises():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 2, 1, 1).expand(1, 2, 1, 1)
    out = normalize(x, (0.5, 0.0), (0.5, 2.0))
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([-1.0, 0.5])


def test_mnist32_is_mnist_resized_for_pfp_lenet5():
    import os
    root = os.environ.get("PRUNELAB_DATA")
    if not root or not os.path.isdir(os.path.join(root, "mnist")):
        pytest.skip("PRUNELAB_DATA does not hold MNIST")
    from prunelab.data import load_dataset
    train, val, test = load_dataset("mnist32", root=root)
    assert train.inputs.shape[1:] == (1, 32, 32) and len(test) == 10000 and len(val) == 6000
    assert train.augment is not None and test.augment is None
    from prunelab.lab.run import resolve
    from prunelab.lab.config import RunConfig
    assert resolve(RunConfig(model="pfp-lenet5", method="pfec", channels=0.5)).dataset == "mnist32"
