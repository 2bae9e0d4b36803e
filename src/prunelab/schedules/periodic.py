"""Masks recomputed every few epochs while training from scratch: iSparse's "train-with" mode.

Garg & Candan 2020 train with sparsification applied during training; our reading (only excerpts of the
paper survive): every ``interval`` epochs the method re-scores the current weights and masks the
lowest-scoring edges at the target factor. Any score-based method can be used this way.

prunelab's masks never revive a weight: a masked edge is zero, so it scores 0 and stays masked (the
selection ranks only surviving edges). At a fixed factor the first recomputation therefore decides the
mask and later ones keep exactly the surviving set (the event's ``changed`` is 0): with the default
``ramp=1`` train-with means "train ``interval`` epochs dense, sparsify, train on under the mask".
``ramp=k`` (ours, not the paper's) raises the factor linearly over the first k recomputations, so each
re-scores the survivors with the weights of that moment. Scoring examples are drawn afresh at each
recomputation from a seed derived from (seed, epoch), so a resumed run is identical.
"""

from __future__ import annotations

import time

from torch import nn

from .. import masking, pruning
from ..errors import PrunelabError
from ..training import derive_seed
from .base import Schedule, pop_eligibility


class Periodic(Schedule):
    """Recompute ``method``'s masks at ``sparsity`` every ``interval`` epochs (``ramp``: reach the target
    over the first ``ramp`` recomputations). ``options``: the method's options."""

    def __init__(self, model: nn.Module, method: str = "isparse", *, sparsity: float, data, interval: int = 1,
                 ramp: int = 1, seed: int = 0, scope: str | None = None, include_bias: bool = False,
                 loss_fn=None, get_logits=None, **options):
        super().__init__(model)
        for name, value in (("interval", interval), ("ramp", ramp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrunelabError(f"{name} must be a positive integer, got {value!r}")
        self.method = pruning.get_method(method)
        self.eligible = pop_eligibility(options)  # include=/exclude=: which parameters may be pruned
        self.method.parse_options(options)  # a bad option fails here, not at the first recomputation
        self.options = {k: v for k, v in options.items() if k not in ("mode", "interval", "ramp")}
        self.sparsity = pruning.check_target(self.method, sparsity=sparsity)[1]
        self.data, self.interval, self.ramp, self.seed = data, interval, ramp, seed
        self.scope, self.include_bias = scope, include_bias
        self.loss_fn, self.get_logits = loss_fn, get_logits

    def target(self, recomputation: int) -> float:
        return self.sparsity * min(1.0, recomputation / self.ramp)

    def epoch_end(self, val_loss: float | None = None, epoch: int | None = None) -> dict | None:
        super().epoch_end(epoch=epoch)
        if self.epochs % self.interval:
            return None
        started = time.perf_counter()
        recomputation = len(self.events) + 1
        target = self.target(recomputation)
        before = masking.masks(self.model)
        report = pruning.prune(self.model, self.method.name, sparsity=target, data=self.data, scope=self.scope,
                               seed=derive_seed(self.seed, f"{self.method.name}-train-with", self.epochs),
                               include_bias=self.include_bias, optimizer=self.optimizer, loss_fn=self.loss_fn,
                               **self.eligible,
                               get_logits=self.get_logits, **self.options)
        after = masking.masks(self.model)
        changed = sum(int((after[n] != before[n]).sum()) if n in before else int((~after[n]).sum())
                      for n in after)
        return self._record({"epoch": self.epochs, "recomputation": recomputation, "target_sparsity": target,
                             "sparsity": report.sparsity, "changed": changed,
                             "seconds": time.perf_counter() - started})

    def describe(self, event: dict) -> str:
        line = (f"{self.method.name} masks recomputed (#{event['recomputation']}): sparsity {event['sparsity']:.4f} "
                f"(target {event['target_sparsity']:.4f}), {event['changed']:,} mask entries changed")
        if "test_error" in event:
            val = "n/a" if event.get("val_error") is None else f"{event['val_error']:.2%}"
            line += f", val error {val}, test error {event['test_error']:.2%}"
        return line

    def state(self):
        base, tensors = super().state()
        return {**base, "recomputations": len(self.events), "records": list(self.events)}, tensors

    def load(self, state, tensors) -> None:
        super().load(state, tensors)
        self.events = list(state["records"])
