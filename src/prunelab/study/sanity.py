"""Sanity checks of pruning at initialisation (Frankle, Dziugaite, Roy & Carbin, ICLR 2021).

Two variants of a method's run, trained with the same recipe:

* ``shuffle``: the method's masks with each layer's kept weights moved to random positions of that
  layer (same per-layer counts). A method whose accuracy survives this chose *how much* to keep per
  layer, not *which* weights. It is a registered method, ``<method>+shuffle``, so that the lab runs it
  as any other (registered on demand by :func:`ensure`, in every process that runs one);
* ``reinit``: the method's masks over a fresh draw of the initialisation: the lab's ``reinit = true``.

``random`` is not checked: shuffling or re-drawing under random masks gives random masks again.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..methods import METHODS, Method, get_method, register

SUFFIX = "+shuffle"


def shuffled_name(method: str) -> str:
    return method + SUFFIX


def ensure(name: str) -> None:
    """Register ``name`` if it is a shuffle variant not yet known in this process (no-op otherwise)."""
    get_method("none")  # imports the built-in methods first
    if name.endswith(SUFFIX) and name not in METHODS:
        register(_shuffled(get_method(name[: -len(SUFFIX)])))


def _shuffled(base: Method) -> Method:
    def pruner(model, params, *, sparsity, scope, alive, data, generator, **options):
        masks = base.masks(model, params, sparsity=sparsity, scope=scope, alive=alive, data=data,
                           generator=generator, **options)
        return {name: shuffle_mask(mask, alive.get(name), generator) for name, mask in masks.items()}

    return replace(base, name=shuffled_name(base.name), pruner=pruner, when="init",
                   description=f"{base.name}'s masks shuffled within each layer (Frankle et al. 2021 sanity "
                               "check: same per-layer counts, random positions)",
                   paper="Frankle, Dziugaite, Roy & Carbin, ICLR 2021 (layer-wise shuffle)")


def shuffle_mask(mask: torch.Tensor, alive: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The same number of kept entries at uniformly random positions among those still alive."""
    flat = mask.flatten().bool().cpu()
    candidates = torch.arange(flat.numel()) if alive is None else alive.flatten().bool().cpu().nonzero().flatten()
    kept = int(flat[candidates].sum())
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:kept]]
    result = torch.zeros_like(flat)
    result[chosen] = True
    return result.view(mask.shape).to(mask.device)
