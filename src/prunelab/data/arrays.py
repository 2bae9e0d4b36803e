"""An in-memory dataset held as two tensors, with a fast batch iterator.

Small vision datasets fit in memory, so batching is just indexing the big tensors with a slice
of a permutation: no per-sample __getitem__, no collate, no DataLoader worker processes.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

Augment = Callable[[Tensor, torch.Generator], Tensor]


class ArrayDataset(torch.utils.data.Dataset):
    """Inputs float32 (N, C, H, W), already normalised; targets int64 (N,).

    `augment`, if set, maps a batch to an augmented batch using a torch.Generator; it is applied
    by batches() only (indexing with [i] always gives the un-augmented sample).
    """

    def __init__(self, inputs: Tensor, targets: Tensor, classes: Sequence[str], augment: Augment | None = None):
        if inputs.ndim != 4:
            raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
        if targets.shape != (inputs.shape[0],):
            raise ValueError(f"targets must have shape ({inputs.shape[0]},), got {tuple(targets.shape)}")
        self.inputs = inputs
        self.targets = targets
        self.classes = tuple(classes)
        self.augment = augment

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.targets[i]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(n={len(self)}, input_shape={tuple(self.inputs.shape[1:])}, "
            f"classes={len(self.classes)}, augment={self.augment!r})"
        )

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        _check_batch_size(batch_size)
        return len(self) // batch_size if drop_last else math.ceil(len(self) / batch_size)

    def subset(self, indices) -> "ArrayDataset":
        """A new dataset of the given rows (copied), sharing `classes` and `augment`.

        `indices` are row numbers (tensor or sequence) or a boolean mask of length len(self).
        """
        idx = torch.as_tensor(indices)
        idx = idx.nonzero().squeeze(1) if idx.dtype == torch.bool else idx.long()
        return ArrayDataset(self.inputs[idx], self.targets[idx], self.classes, self.augment)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        augment: bool | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (inputs, targets) batches covering each sample at most once.

        shuffle=True needs a seed: the permutation and any augmentation both come from
        torch.Generator().manual_seed(seed), so the same seed gives the same batches.
        augment=None means "augment iff self.augment is set and shuffle is True" (i.e. training).
        Un-augmented, unshuffled batches are views of the stored tensors: do not modify them in place.
        """
        # Checked here, not inside the generator, so mistakes raise at the call site.
        _check_batch_size(batch_size)
        if augment is None:
            augment = self.augment is not None and shuffle
        if augment and self.augment is None:
            raise ValueError("augment=True but this dataset has no augmentation")
        if (shuffle or augment) and seed is None:
            raise ValueError("shuffle/augment need a seed so batches are reproducible; pass seed=")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return self._iterate(batch_size, shuffle, drop_last, self.augment if augment else None, generator)

    def _iterate(self, batch_size, shuffle, drop_last, augment, generator) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                x, y = self.inputs[start:end], self.targets[start:end]
            else:
                idx = order[start:end]
                x, y = self.inputs[idx], self.targets[idx]
            if augment is not None:
                x = augment(x, generator)
            yield x, y


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
