"""Gradual pruning with the cubic schedule of Zhu & Gupta, "To prune, or not to prune" (ICLR workshop
2018, eq. 1), the schedule of ``torch.ao``'s and NNI's gradual pruners.

From step t0 = ``start`` every ``every`` steps until t0 + n*dt = ``end`` the sparsity rises to

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,

fast at first, while many redundant weights remain, and slowly towards the final sparsity s_f. Each
pruning step ranks the surviving weights with ``method`` (magnitude by default); pruned weights never
come back.
"""

from __future__ import annotations

from torch import nn

from .. import pruning
from ..errors import PrunelabError
from .base import Schedule, pop_eligibility


def cubic_sparsity(step: int, *, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's s_t at ``step`` (``initial`` before ``start``, ``final`` from ``end`` on)."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


class Gradual(Schedule):
    """Prune ``method`` to :func:`cubic_sparsity` every ``every`` optimizer steps between ``start`` and
    ``end`` (``step()`` does it); ``options``: the method's options."""

    def __init__(self, model: nn.Module, method: str = "magnitude", *, sparsity: float, end: int,
                 start: int = 0, every: int = 100, initial: float = 0.0, data=None, seed: int = 0,
                 scope: str | None = None, include_bias: bool = False, loss_fn=None, get_logits=None, **options):
        super().__init__(model)
        self.method = pruning.get_method(method)
        self.eligible = pop_eligibility(options)  # include=/exclude=: which parameters may be pruned
        self.method.parse_options(options)
        self.final = pruning.check_target(self.method, sparsity=sparsity)[1]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(every, int)) \
                or start < 0 or end <= start or every < 1:
            raise PrunelabError(f"gradual pruning needs integer steps 0 <= start < end and every >= 1; got "
                                f"start {start!r}, end {end!r}, every {every!r}")
        if not 0.0 <= initial <= self.final:
            raise PrunelabError(f"initial sparsity must be in [0, {self.final}], got {initial!r}")
        self.start, self.end, self.every, self.initial = start, end, every, initial
        self.data, self.seed, self.scope, self.include_bias = data, seed, scope, include_bias
        self.loss_fn, self.get_logits, self.options = loss_fn, get_logits, options

    def step(self) -> dict | None:
        super().step()
        t = self.steps
        if t < self.start or t > self.end or ((t - self.start) % self.every and t != self.end):
            return None
        target = cubic_sparsity(t, final=self.final, start=self.start, end=self.end, initial=self.initial)
        done = self.events[-1]["sparsity"] if self.events else 0.0
        if target <= 0.0 or target <= done:
            return None
        report = pruning.prune(self.model, self.method.name, sparsity=target, data=self.data, scope=self.scope,
                               seed=self.seed, include_bias=self.include_bias, optimizer=self.optimizer,
                               **self.eligible,
                               loss_fn=self.loss_fn, get_logits=self.get_logits, **self.options)
        return self._record({"step": t, **report.as_dict()})

    @property
    def done(self) -> bool:
        return False  # training goes on after the last pruning step: fine-tuning at the final sparsity

    def describe(self, event: dict) -> str:
        return (f"step {event['step']}: {event['method']} to sparsity {event['sparsity']:.4f} "
                f"({event['kept']:,} of {event['total']:,} prunable weights kept)")
