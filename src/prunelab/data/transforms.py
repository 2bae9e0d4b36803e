"""Batched tensor transforms: normalisation and the standard CIFAR augmentation.

Augmentations work on a whole (N, C, H, W) batch at once and draw their randomness from an
explicit torch.Generator, so a seeded epoch is reproducible and no per-sample Python loop runs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (N, C, H, W) -> float32 scaled to [0, 1], then (x - mean) / std per channel."""
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    # In-place ops on the fresh float copy keep peak memory at one float tensor.
    return images.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each side by `padding`, then take a random crop of the original size per sample.

    Runs on already normalised inputs, so the zero padding stands for the dataset mean colour
    rather than black; padding after normalisation is common practice.
    """
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    off_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    off_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (off_y[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (off_x[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    # Gather in channels-last layout so one advanced index picks every pixel of every crop.
    out = padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each sample left-right with probability p."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class PadCropFlip:
    """The standard CIFAR training augmentation: pad-`padding` random crop, then random h-flip.

    A small class rather than a closure so it has a readable repr and can be pickled with a dataset.
    """

    def __init__(self, padding: int = 4, flip_p: float = 0.5):
        self.padding = padding
        self.flip_p = flip_p

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_hflip(random_crop(x, self.padding, generator), generator, self.flip_p)

    def __repr__(self) -> str:
        return f"PadCropFlip(padding={self.padding}, flip_p={self.flip_p})"
