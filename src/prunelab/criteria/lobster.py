"""Registers LOBSTER (``prunelab.lobster``), a method that prunes while it trains."""

from ..lobster import DEFAULTS, LobsterSchedule
from ..methods import Method, register

register(Method(
    "lobster", "loss-based sensitivity regularisation + threshold pruning on plateaus (Tartaglione et al. 2020)",
    criterion=None, when="during", options=dict(DEFAULTS), schedule=LobsterSchedule,
    flags=("lambda", "pwe", "twt"), paper="Tartaglione et al. 2020, eq. 6-7, section 4.1"))
