"""Criteria: functions that score prunable parameters, one module per paper or baseline.

A criterion is ``fn(model, params, *, data, generator, **options) -> {parameter name: score}`` where a
higher score means more important. It knows nothing of selection, schedules or training.
"""

from .baselines import magnitude_scores, random_scores

__all__ = ["magnitude_scores", "random_scores"]
