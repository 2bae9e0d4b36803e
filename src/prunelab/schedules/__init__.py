"""Schedules: when a model is pruned and by how much, driven from any training loop.

* :class:`Iterative`: rounds of pruning and (re)training: one-shot, IMP, lottery tickets with rewinding,
  NNrelief's iterations;
* :class:`Gradual`: Zhu & Gupta's cubic schedule, pruning every few optimizer steps;
* :class:`Periodic`: masks recomputed every few epochs while training (iSparse's train-with);
* :class:`Lobster`: LOBSTER's regulariser and plateau-triggered threshold pruning.

:func:`for_method` builds a method's own schedule. Each is used the same way (see ``base``):
``attach(optimizer)``, ``step()`` after each optimizer step, ``epoch_end(val_loss)`` after each epoch.
"""

from __future__ import annotations

from torch import nn

from .. import pruning
from .base import Schedule
from .gradual import Gradual, cubic_sparsity
from .iterative import Iterative, rewind, round_targets
from .lobster import Lobster
from .periodic import Periodic

__all__ = ["Gradual", "Iterative", "Lobster", "Periodic", "Schedule", "cubic_sparsity", "for_method",
           "rewind", "round_targets"]


def for_method(model: nn.Module, method: str, **kwargs) -> Schedule:
    """The schedule ``method`` prunes with: LOBSTER's (``val_data=`` required), NNrelief's rounds
    (:class:`Iterative`), iSparse's train-with (:class:`Periodic`); any other method prunes gradually
    (:class:`Gradual`, ``end=`` required). ``kwargs``: the schedule's and the method's options."""
    spec = pruning.get_method(method)
    if spec.schedule == "lobster":
        return Lobster(model, **kwargs)
    if spec.schedule == "iterative":
        return Iterative(model, method, **kwargs)
    if spec.schedule == "periodic":
        return Periodic(model, method, **kwargs)
    return Gradual(model, method, **kwargs)
