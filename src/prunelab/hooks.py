"""One forward pass with temporary hooks: how criteria and the channel graph look inside a model."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def run_with_hooks(model: nn.Module, inputs: torch.Tensor, handles: Iterable, *, batch_size: int | None = None,
                   eval_mode: bool = True) -> None:
    """Feed ``inputs`` (in chunks of ``batch_size``) through ``model`` without gradients, then remove the
    hook ``handles``. ``eval_mode``: dropout off and BatchNorm on its running statistics for the pass;
    every module's own mode is restored afterwards."""
    handles = list(handles)
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    if eval_mode:
        model.eval()
    try:
        with torch.no_grad():
            for chunk in inputs.split(batch_size or len(inputs)):
                model(chunk.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.train(mode)
