"""One forward pass with temporary hooks: how criteria and the channel graph look inside a model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from .data import feed


def run_with_hooks(model: nn.Module, inputs, handles: Iterable, *, batch_size: int | None = None,
                   eval_mode: bool = True, channels_last: bool = False) -> None:
    """Feed ``inputs`` (a tensor or a dict of keyword tensors, in chunks of ``batch_size``) through ``model``
    without gradients, then remove the hook ``handles``. ``eval_mode``: dropout off and BatchNorm on its
    running statistics for the pass; every module's own mode is restored afterwards. ``channels_last``:
    image batches in the channels-last layout (see :func:`takes_channels_last`)."""
    handles = list(handles)
    try:
        with _modes_kept(model, eval_mode), torch.no_grad():
            for chunk in feed.chunks(inputs, batch_size):
                chunk = feed.to_model(model, chunk)
                feed.call(model, feed.channels_last(chunk) if channels_last else chunk)
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _modes_kept(model: nn.Module, eval_mode: bool = True):
    """Every module's training flag restored on exit (and the model in eval mode inside, by default)."""
    modes = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def takes_channels_last(model: nn.Module, inputs) -> bool:
    """Whether a pass over ``inputs`` may use the channels-last layout: an image batch into a model with
    2-d convolutions (on CPUs they run about 30% faster in it) that accepts the layout, tried on a
    pair of examples (a forward that calls ``.view`` on its input refuses it). Call it before registering
    hooks."""
    image_batch = torch.is_tensor(inputs) and inputs.ndim == 4 and inputs.is_floating_point()
    if not image_batch or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    try:
        with _modes_kept(model), torch.no_grad():
            feed.call(model, feed.channels_last(feed.to_model(model, inputs[:2])))
        return True
    except RuntimeError:
        return False
