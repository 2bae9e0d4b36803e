"""Datasets as in-memory tensors: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100.

    train, val, test = load_dataset("mnist", val_fraction=0.1, seed=0)
    for x, y in train.batches(128, shuffle=True, seed=epoch): ...

Files live under a data root (root=, else $PRUNELAB_DATA, else the user cache folder); missing
ones are downloaded. Files are checked against their published MD5s (CIFAR-100: the archive on
download, the decoded content on load).
"""

from .arrays import ArrayDataset
from .registry import (
    DatasetInfo,
    DatasetSplits,
    FactoryDataset,
    dataset_info,
    default_root,
    list_datasets,
    load_dataset,
    load_factory_dataset,
    split_indices,
)

__all__ = [
    "ArrayDataset",
    "DatasetInfo",
    "DatasetSplits",
    "FactoryDataset",
    "dataset_info",
    "default_root",
    "list_datasets",
    "load_dataset",
    "load_factory_dataset",
    "split_indices",
]
