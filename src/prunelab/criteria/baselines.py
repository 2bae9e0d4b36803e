"""Baseline criteria: random and magnitude scores (methods.md section 6).

- random: i.i.d. uniform scores from a seeded generator; top-k of them is a uniformly random mask, global
  or per layer depending on the selection scope.
- magnitude: |w| (Han et al. 2015 with a top-k rule; global magnitude when selected globally).
"""

from __future__ import annotations

import torch


def random_scores(model, params, *, generator: torch.Generator, **_):
    """Uniform random scores, drawn in parameter order from ``generator`` (reproducible by seed)."""
    return {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}


def magnitude_scores(model, params, **_):
    """|w| of the current weights."""
    return {name: p.detach().abs().cpu() for name, p in params.items()}
