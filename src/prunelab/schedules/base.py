"""What every schedule shares: the calls a training loop makes, and where pruning events are kept.

A schedule decides *when* a model is pruned and by how much; a method (``prunelab.prune``) decides *what*.
Drive one from any training loop, with any optimizer::

    schedule.attach(optimizer)           # masks then also clean this optimizer's state
    for epoch in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            schedule.step()              # after each optimizer step
        event = schedule.epoch_end(val_loss=...)   # a pruning event (a dict) or None
        if schedule.done:
            break

``state()`` / ``load(state, tensors)`` save and restore a schedule (JSON-able values and tensors), so a
checkpointed loop resumes exactly; the lab's runner checkpoints them after every epoch.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masking


def pop_eligibility(options: dict) -> dict:
    """Take ``include``/``exclude`` (which parameters are eligible: ``prunelab.prune``'s) out of a
    schedule's keyword options, which are otherwise the method's."""
    return {key: options.pop(key) for key in ("include", "exclude") if key in options}


class Schedule:
    """Base class: counts steps and epochs and keeps the events; subclasses prune in ``step`` or
    ``epoch_end``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.epochs = 0
        self.events: list[dict] = []

    def attach(self, optimizer: torch.optim.Optimizer | None) -> "Schedule":
        """The optimizer training the model: new masks zero its state (momentum, Adam moments) at once."""
        self.optimizer = optimizer
        return self

    def step(self) -> dict | None:
        """Call after each optimizer step; returns a pruning event when this step pruned."""
        self.steps += 1
        return None

    def epoch_end(self, val_loss: float | None = None, epoch: int | None = None) -> dict | None:
        """Call at the end of each epoch (``epoch``: its 1-based number, counted here when not given);
        returns a pruning event when the schedule pruned."""
        self.epochs = self.epochs + 1 if epoch is None else epoch
        return None

    @property
    def done(self) -> bool:
        """True when the schedule has nothing left to do and training may stop early."""
        return False

    def stop_reason(self) -> str:
        return "the training budget is spent"

    def describe(self, event: dict) -> str:
        """One log line for an event."""
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in event.items()
                         if not isinstance(v, (dict, list)))

    def _attach_masks(self, new_masks) -> None:
        masking.attach(self.model, new_masks, self.optimizer)

    def _record(self, event: dict) -> dict:
        self.events.append(event)
        return event

    # -- resume --
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"steps": self.steps, "epochs": self.epochs, "events": list(self.events)}, {}

    def load(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.steps, self.epochs = int(state.get("steps", 0)), int(state.get("epochs", 0))
        self.events = list(state.get("events", []))
