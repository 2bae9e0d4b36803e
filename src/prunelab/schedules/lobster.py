"""LOBSTER's schedule: train with the regulariser, prune with the largest safe threshold on each plateau.

Tartaglione et al. 2020, section 4.1 (the update, eq. 6-7, and the threshold search are in
``prunelab.criteria.lobster``). Each epoch: on the validation loss either keep going, or (a plateau of PWE
epochs) restore the best weights and zero every covered parameter below the largest threshold T whose
validation loss stays within (1 + TWT) of the loss before thresholding. Stops after ``stop_after``
pruning phases that did not increase the compression ratio (or at the end of the user's budget).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import metrics
from ..criteria.lobster import LobsterOptions, Plateau, Regulariser, apply_threshold, covered_parameters, \
    find_threshold
from ..training import evaluate
from .base import Schedule


class Lobster(Schedule):
    """LOBSTER in your loop: ``step()`` after each optimizer step applies the regulariser (it reads the
    gradients of the last backward pass, so call it before ``zero_grad``); ``epoch_end(val_loss)`` runs the
    plateau rule and, on a plateau, a pruning phase whose threshold search evaluates ``val_data``.

    ``options``: LOBSTER's (``lambda``, ``pwe``, ``twt``, ``weights_only``, ``reference_midpoint``,
    ``stop_after``, ``plateau_tolerance``), as keyword arguments or a dict. ``eval_batch_size``: of the
    validation passes (on a CPU, a CNN often evaluates faster in batches of 100 than of 1000).
    """

    def __init__(self, model: nn.Module, val_data, *, loss_fn: Callable | None = None,
                 get_logits: Callable | None = None, options: dict | None = None, eval_batch_size: int = 1000,
                 **more_options):
        super().__init__(model)
        self.options = LobsterOptions.parse("lobster", {**(options or {}), **more_options}).as_dict()
        self.val_data, self.loss_fn, self.get_logits = val_data, loss_fn, get_logits
        self.eval_batch_size = eval_batch_size
        self.params = covered_parameters(model, self.options["weights_only"])
        self.regulariser = Regulariser(self.params, self.options["lambda"])
        self.plateau = Plateau(self.options["pwe"], self.options["plateau_tolerance"])
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.phases_without_gain = 0

    def step(self) -> None:
        super().step()
        self.regulariser.apply()

    def val_loss(self, stop_above: float | None = None) -> float:
        return evaluate(self.model, self.val_data, self.eval_batch_size, loss_fn=self.loss_fn,
                        get_logits=self.get_logits, stop_above=stop_above)["loss"]

    def epoch_end(self, val_loss: float | None = None, epoch: int | None = None) -> dict | None:
        """Plateau bookkeeping for an epoch whose validation loss was ``val_loss`` (measured on ``val_data``
        when not given); on a plateau, a pruning phase: its record is returned."""
        super().epoch_end(epoch=epoch)
        val_loss = self.val_loss() if val_loss is None else val_loss
        improved, plateau = self.plateau.update(val_loss)
        if improved:
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if not plateau:
            return None
        if self.best_weights is not None:  # the authors restore the best weights before pruning
            self.model.load_state_dict(self.best_weights)
        self.plateau.reset()
        before = metrics.sparsity_summary(self.model)["compression_ratio"]
        search = find_threshold(self.model, self.params, self.val_loss, self.options["twt"],
                                self.options["reference_midpoint"], early_exit=True)
        self._attach_masks(apply_threshold(self.params, search.threshold))
        summary = metrics.sparsity_summary(self.model)
        gain = summary["compression_ratio"] > before * (1 + 1e-9)
        self.phases_without_gain = 0 if gain else self.phases_without_gain + 1
        self.best_weights = None
        return self._record({
            "epoch": self.epochs, "threshold": search.threshold, "val_loss_before": search.reference_loss,
            "val_loss_after": self.val_loss(), "loss_bound": search.bound, "evaluations": search.evaluations,
            "compression_ratio": summary["compression_ratio"], "sparsity_all": summary["sparsity_all"],
            "remaining_percent": {name: 100.0 * float((p != 0).float().mean()) for name, p in self.params.items()},
        })

    def describe(self, event: dict) -> str:
        line = (f"threshold {event['threshold']:.4g}, val loss {event['val_loss_before']:.4f} -> "
                f"{event['val_loss_after']:.4f}, compression {event['compression_ratio']:.2f}x")
        return line + (f", test error {event['test_error']:.2%}" if event.get("test_error") is not None else "")

    @property
    def done(self) -> bool:
        return self.phases_without_gain >= self.options["stop_after"]

    def stop_reason(self) -> str:
        return f"no further compression for {self.options['stop_after']} pruning phases"

    # -- resume --
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        base, _ = super().state()
        tensors = {f"best::{k}": v for k, v in (self.best_weights or {}).items()}
        return ({**base, "best": self.plateau.best, "bad_epochs": self.plateau.bad_epochs, "phases": list(self.events),
                 "phases_without_gain": self.phases_without_gain, "has_best": self.best_weights is not None},
                tensors)

    def load(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().load(state, tensors)
        self.events = list(state["phases"])
        self.plateau.best, self.plateau.bad_epochs = state["best"], state["bad_epochs"]
        self.phases_without_gain = state["phases_without_gain"]
        self.best_weights = ({k[len("best::"):]: v for k, v in tensors.items() if k.startswith("best::")}
                             if state["has_best"] else None)
