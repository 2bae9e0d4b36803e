"""Pruning in rounds, each followed by (re)training: one-shot, iterative magnitude pruning (IMP), lottery
tickets with rewinding, and NNrelief's iterations.

Round r of R prunes to ``1 - (1 - s)^(r/R)``: every round keeps the same fraction of what survived the
last one, and the last round reaches s exactly. After a round the surviving weights go on from where they
are (fine-tuning), or are rewound, keeping the masks:

* ``rewind="init"``: to the weights the schedule was created with (Frankle & Carbin 2019, lottery ticket);
* ``rewind="early"``: to the weights after ``rewind_step`` optimizer steps (Frankle et al. 2020, late
  rewinding; ``step()`` takes the snapshot).

A method that decides how much to prune (NNrelief) is given no target: each round prunes by its own rule.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masking, pruning
from ..errors import PrunelabError
from .base import Schedule, pop_eligibility

REWIND = ("none", "init", "early")


def rewind(model: nn.Module, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load ``weights`` (a state dict) into ``model`` keeping its masks (pruned weights stay zero); the
    optimizer's state is cleared, as a fresh optimizer's would be."""
    current = masking.masks(model)
    masking.remove(model)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise PrunelabError(f"the rewind weights do not fit this model: {str(error).strip().splitlines()[0]}") \
            from None
    finally:
        masking.attach(model, current)
    if optimizer is not None:
        optimizer.state.clear()


def round_targets(sparsity: float, rounds: int) -> list[float]:
    """The cumulative target after each of ``rounds`` rounds (geometric; the last is ``sparsity``)."""
    return [1.0 - (1.0 - sparsity) ** (r / rounds) if r < rounds else sparsity for r in range(1, rounds + 1)]


class Iterative(Schedule):
    """``rounds`` pruning rounds with ``method``; in your loop, every ``epochs_per_round`` epochs
    ``epoch_end`` prunes (and rewinds), and ``done`` turns True once the last round has been retrained
    for ``epochs_per_round`` epochs. The lab calls :meth:`prune_round` and :meth:`rewind` itself.

    After a rewind the optimizer's state (momentum, Adam moments) is cleared, as a fresh optimizer would
    start; your learning-rate schedule is yours to restart.
    """

    def __init__(self, model: nn.Module, method: str = "magnitude", *, sparsity: float | None = None,
                 channels: float | None = None, parameters: float | None = None, rounds: int = 1,
                 epochs_per_round: int | None = None, rewind: str = "none", rewind_step: int = 0, data=None,
                 seed: int = 0, scope: str | None = None, include_bias: bool = False, loss_fn=None,
                 get_logits=None, **options):
        super().__init__(model)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise PrunelabError(f"rounds must be a positive integer, got {rounds!r}")
        if rewind not in REWIND:
            raise PrunelabError(f"invalid rewind {rewind!r}; choose from: {', '.join(REWIND)}")
        if (rewind == "early") != (rewind_step > 0):
            raise PrunelabError("rewind = 'early' needs rewind_step >= 1 (the step rewound to), and only it does")
        self.method = pruning.get_method(method)
        self.eligible = pop_eligibility(options)  # include=/exclude=: which parameters may be pruned
        self.method.parse_options(options)  # a bad option fails here, not at the first round
        self.kind, total = pruning.check_target(self.method, sparsity=sparsity, channels=channels,
                                                 parameters=parameters)
        self.targets = [None] * rounds if self.kind is None else round_targets(total, rounds)
        self.rounds, self.epochs_per_round = rounds, epochs_per_round
        self.rewind_mode, self.rewind_step = rewind, rewind_step
        self.data, self.seed, self.scope, self.include_bias = data, seed, scope, include_bias
        self.loss_fn, self.get_logits, self.options = loss_fn, get_logits, options
        self.rewind_point = self.snapshot() if rewind == "init" else None

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def pruned_rounds(self) -> int:
        return len(self.events)

    def step(self) -> None:
        super().step()
        if self.rewind_mode == "early" and self.steps == self.rewind_step:
            self.rewind_point = self.snapshot()

    def prune_round(self, round: int | None = None) -> dict:
        """Prune round ``round`` (1-based; default: the next one), without rewinding: its event (the prune
        report with the round number)."""
        round = self.pruned_rounds + 1 if round is None else round
        if not 1 <= round <= self.rounds:
            raise PrunelabError(f"round {round} is not one of the {self.rounds} rounds")
        target = self.targets[round - 1]
        amount = {} if self.kind is None else {self.kind: target}
        report = pruning.prune(self.model, self.method.name, data=self.data, scope=self.scope, seed=self.seed,
                               include_bias=self.include_bias, optimizer=self.optimizer, loss_fn=self.loss_fn,
                               **self.eligible,
                               get_logits=self.get_logits, **amount, **self.options)
        return self._record({"round": round, **report.as_dict()})

    def rewind(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Put back the rewind point's weights (or ``weights``), keeping the masks and the pruned zeros."""
        weights = self.rewind_point if weights is None else weights
        if weights is None:
            raise PrunelabError("no rewind point: rewind = 'early' takes it at rewind_step, which training has "
                                "not reached")
        rewind(self.model, weights, self.optimizer)

    def epoch_end(self, val_loss: float | None = None, epoch: int | None = None) -> dict | None:
        super().epoch_end(epoch=epoch)
        if self.epochs_per_round is None:
            raise PrunelabError("give epochs_per_round to drive the rounds from epoch_end, or call prune_round()")
        if self.epochs % self.epochs_per_round or self.pruned_rounds >= self.rounds:
            return None
        event = self.prune_round()
        if self.rewind_mode != "none":
            self.rewind()
            event["rewound"] = self.rewind_mode
        return event

    @property
    def done(self) -> bool:
        return (self.epochs_per_round is not None
                and self.epochs >= self.epochs_per_round * (self.rounds + 1))

    def describe(self, event: dict) -> str:
        return (f"round {event['round']}/{self.rounds} {event['method']}: kept {event['kept']:,} of "
                f"{event['total']:,} prunable weights (sparsity {event['sparsity']:.4f})")

    def state(self):
        base, tensors = super().state()
        if self.rewind_point is not None:
            tensors = {f"rewind::{k}": v for k, v in self.rewind_point.items()}
        return base, tensors

    def load(self, state, tensors) -> None:
        super().load(state, tensors)
        point = {k[len("rewind::"):]: v for k, v in tensors.items() if k.startswith("rewind::")}
        self.rewind_point = point or self.rewind_point
