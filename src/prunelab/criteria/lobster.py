"""Registers LOBSTER (``prunelab.lobster``), a method that prunes while it trains."""

from ..lobster import DEFAULTS, LobsterSchedule
from ..methods import Method, register


def _schedule(model, options, **_):
    return LobsterSchedule(model, options)  # finds its own sparsity; needs no training data handle


register(Method(
    "lobster", "loss-based sensitivity regularisation + threshold pruning on plateaus (Tartaglione et al. 2020)",
    criterion=None, when="during", options=dict(DEFAULTS), schedule=_schedule, own_sparsity=True,
    flags=("lambda", "pwe", "twt"), paper="Tartaglione et al. 2020, eq. 6-7, section 4.1"))
