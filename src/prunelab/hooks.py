"""One forward pass with temporary hooks: how criteria and the channel graph look inside a model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .data import feed


def run_with_hooks(model: nn.Module, inputs, handles: Iterable, *, batch_size: int | None = None,
                   eval_mode: bool = True) -> None:
    """Feed ``inputs`` (a tensor or a dict of keyword tensors, in chunks of ``batch_size``) through ``model``
    without gradients, then remove the
    hook ``handles``. ``eval_mode``: dropout off and BatchNorm on its running statistics for the pass;
    every module's own mode is restored afterwards."""
    handles = list(handles)
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            for chunk in feed.chunks(inputs, batch_size):
                feed.call(model, feed.to_model(model, chunk))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.train(mode)
