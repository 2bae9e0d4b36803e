"""The supported datasets, where their files live, and load_dataset().

Layout under a data root (a mirror given by PRUNELAB_DATA_URL uses the same layout):
    mnist/*.gz, fashion-mnist/*.gz                      IDX files, downloaded one by one
    cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}
    cifar100/cifar-100-python/{train,test}              extracted from the published archive
    <dataset folder>/.decoded/*.safetensors             decoded-data cache (see cache.py)
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from ..errors import PrunelabError, unknown
from . import cache, cifar, idx
from .arrays import ArrayDataset, Augment
from .download import check_md5, extract_members, fetch_first
from .transforms import PadCropFlip, normalize

_NORMALIZE_CHUNK_BYTES = 1 << 20  # float32 per normalising step: stays in the CPU cache


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int  # the full published training set, before the validation split
    test_size: int
    description: str


class DatasetSplits(NamedTuple):
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, train y, test x, test y


@dataclass(frozen=True)
class _Spec:
    info: DatasetInfo
    folder: str  # sub-folder of the data root
    classes: tuple[str, ...]
    mirrors: tuple[str, ...]
    files: dict[str, str | None]  # path under folder -> canonical md5 (None: content is checked instead)
    read: Callable[[Path], Raw]
    archive: tuple[str, str] | None = None  # (file name, md5) whose members are the `files`
    also_accept: dict[str, frozenset[str]] = field(default_factory=dict)
    per_class: tuple[int, int] | None = None  # exact (train, test) images per class, if balanced
    augment: Augment | None = None
    resize: int | None = None  # images are resized (bilinear) to resize x resize after decoding
    raw_shape: tuple[int, int, int] | None = None  # the files' image shape when it differs from info


_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _read_idx_dataset(folder: Path) -> Raw:
    """MNIST-layout IDX files in `folder` as (N, 1, 28, 28) images and labels."""
    tx, ty = idx.read_images_labels(folder / _IDX_FILES[0], folder / _IDX_FILES[1], 10)
    sx, sy = idx.read_images_labels(folder / _IDX_FILES[2], folder / _IDX_FILES[3], 10)
    return tx[:, None], ty, sx[:, None], sy  # add the channel dimension


def _cifar_reader(sub: str, train: list[str], test: list[str], label_key: str, num_classes: int):
    """A reader for CIFAR batch files `train` and `test` in folder/`sub`."""
    def read(folder: Path) -> Raw:
        """Train and test images (N, 3, 32, 32) and labels."""
        tx, ty = cifar.read_batches([folder / sub / f for f in train], label_key, num_classes)
        sx, sy = cifar.read_batches([folder / sub / f for f in test], label_key, num_classes)
        return tx, ty, sx, sy
    return read


_CIFAR10_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]

# The CIFAR-10 batches in the shared data folder were rebuilt from genuine pixels and labels, but
# their `filenames` entries are placeholders, so their MD5s differ from the published ones. They
# are accepted when found on disk; a download must still match the canonical MD5.
KNOWN_REBUILT_MD5 = {
    "cifar-10-batches-py/data_batch_1": "1cce77bf8467de2515852f3007c2ddf4",
    "cifar-10-batches-py/data_batch_2": "041b17ba514d5a71b67cf74b6fe54b28",
    "cifar-10-batches-py/data_batch_3": "7e8fb82010106cd45474b66d1c8a158d",
    "cifar-10-batches-py/data_batch_4": "5d964b0967a46aeb56aa1fad65f1f6fd",
    "cifar-10-batches-py/data_batch_5": "d5f74bdc982f4c997a2ac25d4fbc0e3e",
    "cifar-10-batches-py/test_batch": "cbaba4428cf3c012049c40275f7e9abe",
}

_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray
road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm
""".split())

_SPECS = {
    "mnist": _Spec(
        info=DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), 60000, 10000,
                         "MNIST handwritten digits, 28x28 grayscale"),
        folder="mnist",
        classes=tuple(str(d) for d in range(10)),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=dict(zip(_IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                    "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
        read=_read_idx_dataset,
    ),
    "fashion-mnist": _Spec(
        info=DatasetInfo("fashion-mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), 60000, 10000,
                         "Fashion-MNIST clothing images (Zalando), 28x28 grayscale"),
        folder="fashion-mnist",
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=dict(zip(_IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                    "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
        read=_read_idx_dataset,
    ),
    "cifar10": _Spec(
        info=DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                         50000, 10000, "CIFAR-10 natural images, 32x32 colour, 10 classes"),
        folder="cifar10",
        classes=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files={
            "cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
            "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
            "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
        },
        read=_cifar_reader("cifar-10-batches-py", _CIFAR10_BATCHES, ["test_batch"], "labels", 10),
        archive=("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        also_accept={k: frozenset([v]) for k, v in KNOWN_REBUILT_MD5.items()},
        per_class=(5000, 1000),
        augment=PadCropFlip(padding=4),
    ),
    "cifar100": _Spec(
        info=DatasetInfo("cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         50000, 10000, "CIFAR-100 natural images, 32x32 colour, 100 fine classes"),
        folder="cifar100",
        classes=_CIFAR100_CLASSES,
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        # Per-file MD5s are not recorded here: the archive is checked on download, and the
        # decoded content (shapes, label range, exact per-class counts) on every load.
        files={"cifar-100-python/train": None, "cifar-100-python/test": None},
        read=_cifar_reader("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
        archive=("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
        per_class=(500, 100),
        augment=PadCropFlip(padding=4),
    ),
}

# PFP's LeNet-5 reads MNIST resized to 32x32 with pad-4 random crops (docs/methods/pfp.md).
_SPECS["mnist32"] = replace(
    _SPECS["mnist"],
    info=DatasetInfo("mnist32", (1, 32, 32), 10, (0.1307,), (0.3081,), 60000, 10000,
                     "MNIST resized to 32x32 (bilinear), the input of PFP's LeNet-5"),
    augment=PadCropFlip(padding=4, flip_p=0.0), resize=32, raw_shape=(1, 28, 28))


def _resized(images: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) images to side x side, rounded back to uint8."""
    out = F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)



def _spec(name) -> _Spec:
    """The spec of a dataset name (any case), or an error listing the known names."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _SPECS:
        raise unknown("dataset", str(name), _SPECS)
    return _SPECS[key]


def dataset_info(name: str) -> DatasetInfo:
    """Static facts about a dataset; reads no files."""
    return _spec(name).info


def list_datasets() -> list[DatasetInfo]:
    """Static facts about every supported dataset."""
    return [spec.info for spec in _SPECS.values()]


def default_root() -> Path:
    """Data root used when none is given: $PRUNELAB_DATA, else the user cache folder."""
    env = os.environ.get("PRUNELAB_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "prunelab" / "datasets"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) row indices of a training set of n rows, each sorted; disjoint and covering.

    A randperm from torch.Generator().manual_seed(seed) picks round(n * val_fraction) rows.
    """
    _check_fraction(val_fraction)
    n_val = min(round(n * val_fraction), max(n - 1, 0))  # never leave the training split empty
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    base_url: str | None = None,
    normalize_inputs: bool = True,
) -> DatasetSplits:
    """Load a dataset as normalised float32 tensors split into train / val / test.

    ``normalize_inputs=False`` gives pixels scaled to [0, 1] only (torchvision's ToTensor), as NNrelief
    trains on MNIST: the background is then exactly 0, which its activity scores depend on.

    The validation split is drawn from the training set only (seeded); the test set is the
    published one. Missing files are downloaded (from `base_url`, else $PRUNELAB_DATA_URL laid
    out like the data root, else the canonical mirrors) when `download` is true.

    Decoded images are cached on disk ($PRUNELAB_CACHE if set, else `.decoded/` in the dataset's
    folder, else ~/.cache/prunelab/decoded; see cache.py), so later processes skip decoding.
    """
    spec = _spec(name)
    _check_fraction(val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PrunelabError(f"seed must be an integer, got {seed!r}")
    folder = (Path(root).expanduser() if root is not None else default_root()) / spec.folder
    stamp = _ensure_files(spec, folder, download, base_url)
    tx, ty, sx, sy = _decoded(spec.info.name, str(folder.resolve()), stamp)

    train_idx, val_idx = split_indices(len(tx), val_fraction, seed)
    mean, std = spec.info.mean, spec.info.std
    if not normalize_inputs:
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    return DatasetSplits(
        ArrayDataset(_normalized(tx, train_idx, mean, std), ty[train_idx], spec.classes, spec.augment),
        ArrayDataset(_normalized(tx, val_idx, mean, std), ty[val_idx], spec.classes, None),
        ArrayDataset(_normalized(sx, None, mean, std), sy.clone(), spec.classes, None),
    )


class FactoryDataset(NamedTuple):
    """A user's data, as its factory returned it, and the class count the model is built for."""
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


def is_factory(name) -> bool:
    """True for a factory name, ``"module.path:callable"`` (the datasets above have no colon)."""
    from ..models.registry import is_factory as named_factory
    return named_factory(name)


def dataset_factory(name: str) -> Callable:
    """The callable a dataset factory name names; a name that does not resolve is refused in one line."""
    from ..models.registry import import_factory
    return import_factory(name, "dataset")


def load_factory_dataset(name: str, seed: int = 0) -> FactoryDataset:
    """Call a user's dataset factory ``"module.path:callable"``: with ``seed=`` when it takes that keyword,
    else with no argument. It returns ``(train, val, test)`` map-style torch Datasets (``val`` may be None:
    no validation data), or a dict with those keys and optionally ``num_classes``. Without num_classes,
    the class count is inferred from the training targets: their largest value + 1 (-100 is ignored)."""
    from ..models.registry import accepts
    from .feed import IGNORE_INDEX, _is_map_style, as_feed

    factory = dataset_factory(name)
    result = factory(seed=seed) if accepts(factory, "seed") else factory()
    num_classes = None
    if isinstance(result, dict):
        missing = [k for k in ("train", "val", "test") if k not in result]
        extra = sorted(set(result) - {"train", "val", "test", "num_classes"})
        if missing or extra:
            raise PrunelabError(f"dataset factory {name!r} returned a dict "
                                + (f"without {', '.join(map(repr, missing))}" if missing else
                                   f"with unknown key {extra[0]!r}")
                                + "; expected keys train, val, test and optionally num_classes")
        num_classes = result.get("num_classes")
        splits = [result["train"], result["val"], result["test"]]
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        splits = list(result)
    else:
        what = f"a {type(result).__name__} of {len(result)} items" if isinstance(result, (tuple, list)) \
            else f"a {type(result).__name__}"
        raise PrunelabError(f"dataset factory {name!r} returned {what}, not (train, val, test) Datasets")
    if splits[1] is None:
        splits[1] = TensorDataset(torch.empty(0))  # no validation data
    for split, data in zip(("train", "val", "test"), splits):
        if not _is_map_style(data):
            raise PrunelabError(f"dataset factory {name!r}: its {split} split is a {type(data).__name__}, not a "
                                "map-style torch Dataset (__len__ and __getitem__)")
    for split, data in (("train", splits[0]), ("test", splits[2])):
        if len(data) == 0:
            raise PrunelabError(f"dataset factory {name!r}: its {split} split holds no examples")
    if num_classes is None:
        try:
            targets = as_feed(splits[0]).targets()
        except PrunelabError as error:
            raise PrunelabError(f"dataset factory {name!r}: {error}") from None
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise PrunelabError(f"dataset factory {name!r}: the training targets are {targets.dtype}, not integer "
                                "class labels; return a dict with num_classes to say how many classes")
        labels = targets[targets != IGNORE_INDEX]
        if labels.numel() == 0 or labels.min() < 0:
            raise PrunelabError(f"dataset factory {name!r}: the training targets are not class labels 0..C-1")
        num_classes = int(labels.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise PrunelabError(f"dataset factory {name!r}: num_classes must be an integer >= 2, got {num_classes!r}")
    return FactoryDataset(*splits, num_classes)


def _normalized(images: torch.Tensor, rows: torch.Tensor | None, mean, std) -> torch.Tensor:
    """normalize(images[rows]) (all rows if None), computed a slice at a time into one output.

    The same elementwise arithmetic, so the same bytes; but each slice stays in the CPU cache, so
    the large float tensor is written once instead of being swept four times.
    """
    n = len(images) if rows is None else len(rows)
    out = torch.empty((n, *images.shape[1:]), dtype=torch.float32)
    step = max(1, _NORMALIZE_CHUNK_BYTES // (4 * max(1, math.prod(images.shape[1:]))))
    for start in range(0, n, step):
        part = images[start:start + step] if rows is None else images.index_select(0, rows[start:start + step])
        out[start:start + step] = normalize(part, mean, std)
    return out


def _check_fraction(val_fraction) -> None:
    """Refuse a validation fraction outside [0, 1)."""
    ok = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not ok or not 0 <= val_fraction < 1:
        raise PrunelabError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")


def _ensure_files(spec: _Spec, folder: Path, download: bool, base_url: str | None) -> tuple:
    """Fetch missing files; return a (file, size, mtime, ctime) stamp of them all for the caches.

    Files already on disk are MD5-checked only when they are decoded (_check_md5s): a cached
    decoding of the same stamp was made from files that passed, and hashing ~180 MB of CIFAR
    would cost more than loading the cache does.
    """
    missing = []
    for rel in spec.files:
        path = folder / rel
        if path.is_file():
            continue
        if path.exists():
            raise PrunelabError(f"{path} exists but is not a regular file")
        missing.append(rel)
    if missing:
        bases = _base_urls(spec, base_url)
        if not download:
            raise PrunelabError(
                f"{spec.info.name} file {folder / missing[0]} is missing ({len(missing)} of "
                f"{len(spec.files)} files missing) and download is disabled; allow downloading "
                f"(from {bases[0]}) or put the files in {folder} (data root: root= or $PRUNELAB_DATA)"
            )
        fresh = not folder.exists()
        try:
            _download(spec, folder, missing, bases)
        except PrunelabError as error:  # say where the files were looked for, not only what was tried
            if fresh and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # leave no empty folder behind
            raise PrunelabError(f"{spec.info.name} file {folder / missing[0]} is missing ({len(missing)} of "
                                f"{len(spec.files)} missing) and {error}; put the files in {folder} or point "
                                "the data root (root= or $PRUNELAB_DATA) at a folder holding them") from None
    return cache.source_stamp(folder, list(spec.files))


def _check_md5s(spec: _Spec, folder: Path) -> None:
    """Refuse files on disk whose MD5 is not the published one (or an accepted rebuild)."""
    for rel, md5 in spec.files.items():
        if md5 is not None:
            check_md5(folder / rel, md5, spec.also_accept.get(rel, ()))


def _base_urls(spec: _Spec, base_url: str | None) -> list[str]:
    """Where to download from: `base_url`, else $PRUNELAB_DATA_URL, else the canonical mirrors."""
    if base_url:
        return [base_url]
    env = os.environ.get("PRUNELAB_DATA_URL")
    if env:
        return [_join(env, spec.folder)]
    return list(spec.mirrors)


def _join(base: str, name: str) -> str:
    """URL of `name` under `base`."""
    return base.rstrip("/") + "/" + name


def _download(spec: _Spec, folder: Path, missing: list[str], bases: list[str]) -> None:
    """Fetch the missing files (or the archive holding them, then extract them)."""
    if spec.archive is None:
        for rel in missing:
            fetch_first([_join(b, rel) for b in bases], folder / rel, spec.files[rel])
        return
    # The archive is kept after extraction, so a later missing file needs no new download.
    archive_name, archive_md5 = spec.archive
    archive = folder / archive_name
    if archive.is_file():
        check_md5(archive, archive_md5)
    else:
        fetch_first([_join(b, archive_name) for b in bases], archive, archive_md5)
    # Only the missing members: files already present passed their check and are left alone.
    extract_members(archive, {rel: folder / rel for rel in missing})


_CACHED = ("train_x", "train_y", "test_x", "test_y")


@functools.lru_cache(maxsize=4)
def _decoded(name: str, folder: str, stamp: tuple) -> tuple[torch.Tensor, ...]:
    """uint8 images (resized if the dataset asks) and int64 labels, train and test; callers must not modify.

    Kept once per process (keyed by the files' stamp) and on disk (cache.py) across processes; only
    when neither has them are the files MD5-checked and decoded.
    """
    spec = _SPECS[name]
    path = Path(folder)
    # The accepted MD5s and torch's resize are in the key so that changing either rebuilds the entry.
    md5s = [[spec.files[rel], *sorted(spec.also_accept.get(rel, ()))] for rel in spec.files]
    key = cache.entry_key(path, stamp, dataset=name, resize=spec.resize, md5=md5s, torch=torch.__version__)
    hit = cache.load(name, path, key)
    if hit is not None:
        tensors = tuple(hit[k] for k in _CACHED)
        # Cheap, and it keeps a change to the expected content (a spec edit) from hiding behind the cache.
        _check_content(spec, folder, *(t.numpy() for t in tensors), shape=spec.info.input_shape)
        return tensors
    _check_md5s(spec, path)
    tx, ty, sx, sy = spec.read(path)
    _check_content(spec, folder, tx, ty, sx, sy, shape=spec.raw_shape or spec.info.input_shape)
    tensors = (torch.from_numpy(np.ascontiguousarray(tx)), torch.from_numpy(ty.astype(np.int64)),
               torch.from_numpy(np.ascontiguousarray(sx)), torch.from_numpy(sy.astype(np.int64)))
    if spec.resize:
        tensors = (_resized(tensors[0], spec.resize), tensors[1], _resized(tensors[2], spec.resize), tensors[3])
    cache.store(name, path, key, dict(zip(_CACHED, tensors)))
    return tensors


def _check_content(spec: _Spec, folder: str, tx, ty, sx, sy, shape: tuple[int, ...]) -> None:
    """Refuse decoded arrays whose sizes, image `shape` or per-class counts are not the published ones."""
    info = spec.info
    for split, x, y, size in (("train", tx, ty, info.train_size), ("test", sx, sy, info.test_size)):
        expected = (size, *shape)
        if x.shape != expected:
            raise PrunelabError(f"{info.name} {split} data in {folder} has shape {x.shape}, expected {expected}")
        if spec.per_class is not None:
            want = spec.per_class[0 if split == "train" else 1]
            counts = np.bincount(y, minlength=info.num_classes)
            if len(counts) != info.num_classes or (counts != want).any():
                raise PrunelabError(
                    f"{info.name} {split} labels in {folder} are not {want} per class; the files are corrupt"
                )
