"""Baseline criteria: random and magnitude scores (docs/methods/baselines.md).

- random: i.i.d. uniform scores from a seeded generator; top-k of them is a uniformly random mask, global
  or per layer depending on the selection scope.
- magnitude: |w| (Han et al. 2015 with a top-k rule; global magnitude when selected globally).
"""

from __future__ import annotations

import torch

from ..methods import Method, register


def random_scores(model, params, *, generator: torch.Generator, **_):
    """Uniform random scores, drawn in parameter order from ``generator`` (reproducible by seed)."""
    return {name: torch.rand(p.shape, generator=generator) for name, p in params.items()}


def magnitude_scores(model, params, **_):
    """|w| of the current weights."""
    return {name: p.detach().abs().cpu() for name, p in params.items()}


register(Method("none", "no pruning: trains the dense reference", None))
register(Method("random", "uniformly random weights (global or per layer)", random_scores, when="init"))
register(Method("magnitude", "smallest |w| first (Han et al. 2015; global or per layer)", magnitude_scores,
                paper="Han et al., NeurIPS 2015"))
