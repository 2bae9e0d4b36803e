"""LOBSTER: loss-based sensitivity regularisation, with threshold pruning on validation plateaus.

Tartaglione, Bragagnolo, Grangetto, Lepsoy, "LOss-Based SensiTivity rEgulaRization: towards deep sparse
neural networks" (2020 preprint; journal version Neural Networks 146, 2022). Specification:
``docs/methods.md`` section 4.

- Update (paper eq. 6-7): ``w <- w - eta*g - lambda*w*max(0, 1 - |g|)``, g the raw batch-mean gradient
  dL/dw. As in the authors' code the ordinary optimizer step runs first and the penalty is applied to the
  post-step weights with the same gradient (:class:`Regulariser`).
- Pruning phase (paper section 4.1): when the validation loss has not improved for PWE epochs, restore the
  best weights and zero every covered parameter with |w| < T, T the largest threshold whose validation
  loss stays within (1 + TWT) of the loss before thresholding, found by bisection
  (:func:`find_threshold`). Zeroed parameters are pinned (our masks).
- Covered parameters: every parameter of Linear, Conv and BatchNorm layers (weights, biases, gamma/beta)
  as in the paper; ``weights_only`` restricts to the prunable weights.

Choices where the paper and the authors' code differ (methods.md 4.6): the threshold returned is the last
*verified* one (the code returns an untested midpoint: ``reference_midpoint=True``); momentum buffers of
pinned parameters are zeroed (the masks do it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import masking, metrics
from .errors import PrunelabError
from .training import evaluate

DEFAULTS = {"lambda": 1e-4, "pwe": 20, "twt": 0.05, "weights_only": False, "reference_midpoint": False,
            "stop_after": 10, "plateau_tolerance": 0.01}


def covered_parameters(model: nn.Module, weights_only: bool = False) -> dict[str, nn.Parameter]:
    """The parameters LOBSTER regularises and thresholds."""
    if weights_only:
        return masking.prunable_parameters(model)
    return masking.prunable_parameters(model, include_bias=True, include_norm=True)


class Regulariser:
    """``p <- p - lambda * p * relu(1 - |g|)`` after every optimizer step (paper eq. 7).

    Registered as a step post-hook of one optimizer; works with SGD with or without momentum (the
    penalty is outside the optimizer, as in the authors' code).
    """

    def __init__(self, params: dict[str, nn.Parameter], lam: float):
        if not lam >= 0:
            raise PrunelabError(f"lambda must be >= 0, got {lam}")
        self.params, self.lam = list(params.values()), float(lam)

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_post_hook(lambda *_: self.apply())

    @torch.no_grad()
    def apply(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params or self.lam == 0:
            return
        gates = torch._foreach_abs([p.grad for p in params])      # |g|
        torch._foreach_neg_(gates)
        torch._foreach_add_(gates, 1.0)                           # 1 - |g|
        torch._foreach_clamp_min_(gates, 0.0)                     # max(0, 1 - |g|)
        torch._foreach_mul_(gates, params)                        # w * max(0, 1 - |g|)
        torch._foreach_add_(params, gates, alpha=-self.lam)


@torch.no_grad()
def apply_threshold(params: dict[str, nn.Parameter], threshold: float) -> dict[str, torch.Tensor]:
    """Masks keeping |w| >= threshold (and what is already non-zero); the caller attaches them."""
    return {name: (p.abs() >= threshold) & (p != 0) for name, p in params.items()}


@dataclass
class ThresholdSearch:
    threshold: float
    reference_loss: float     # validation loss before thresholding
    loss: float               # validation loss at the returned threshold (inf if never evaluated)
    bound: float              # (1 + TWT) * reference_loss
    evaluations: int


@torch.no_grad()
def find_threshold(model: nn.Module, params: dict[str, nn.Parameter], loss_at: Callable[[], float],
                   twt: float, reference_midpoint: bool = False, max_steps: int = 60) -> ThresholdSearch:
    """The largest global magnitude threshold T keeping ``loss_at()`` <= (1 + twt) x its value at T = 0.

    Bisection as in the authors' ``_find_threshold_with_bisection`` (methods.md 4.2): the bracket starts
    at the mean over layers of the mean |w| of the non-zero weights; the search stops when the bracket's
    losses differ by less than 5% of the bound or the midpoint stops moving. Returns the lower end of the
    bracket, which was evaluated and is feasible (or, with ``reference_midpoint``, the untested midpoint).
    Every trial restores the weights.
    """
    if not twt >= 0:
        raise PrunelabError(f"twt must be >= 0, got {twt}")
    originals = {n: p.detach().clone() for n, p in params.items()}
    evaluations = 0

    def trial(threshold: float) -> float:
        nonlocal evaluations
        evaluations += 1
        for name, p in params.items():
            p.mul_(originals[name].abs() >= threshold)
        try:
            return loss_at()
        finally:
            for name, p in params.items():
                p.copy_(originals[name])

    magnitudes = torch.cat([o.abs().flatten() for o in originals.values()])
    magnitudes = magnitudes[magnitudes > 0]
    reference = trial(0.0)
    bound = (1.0 + twt) * reference
    if magnitudes.numel() == 0:
        return ThresholdSearch(0.0, reference, reference, bound, evaluations)
    layer_means = [o.abs()[o != 0].mean().item() for n, o in originals.items()
                   if n.endswith("weight") and (o != 0).any()]
    mean = sum(layer_means) / len(layer_means) if layer_means else magnitudes.mean().item()
    at_mean = trial(mean)
    low, high = magnitudes.min().item(), magnitudes.max().item()
    if at_mean <= bound:
        a, loss_a, b, loss_b = mean, at_mean, high, trial(high)
        if loss_b <= bound:  # even removing everything covered stays within the tolerance
            return ThresholdSearch(high, reference, loss_b, bound, evaluations)
    else:
        a, loss_a, b, loss_b = low, reference, mean, at_mean  # nothing is below the smallest |w|
    for _ in range(max_steps):
        if abs(loss_a - loss_b) < 0.05 * bound:
            break
        middle = 0.5 * (a + b)
        if abs(middle - a) <= 1e-10 or abs(b - middle) <= 1e-10:
            break
        loss_mid = trial(middle)
        if loss_mid <= bound:
            a, loss_a = middle, loss_mid
        else:
            b, loss_b = middle, loss_mid
    if reference_midpoint:
        return ThresholdSearch(0.5 * (a + b), reference, math.inf, bound, evaluations)
    return ThresholdSearch(a, reference, loss_a, bound, evaluations)


@dataclass
class Plateau:
    """PWE plateau detector on the validation loss, as the authors' ``plateau_scheduler.Scheduler``
    (checked against EIDOSLAB/LOBSTER): an epoch is good when its loss is below best x (1 + tolerance),
    tolerance 0.01, and a good epoch resets the bad-epoch counter; the best loss and its weights update
    only on a strict improvement. After ``patience`` epochs that are not good, :meth:`update` returns True.
    A negative tolerance (``plateau_tolerance=-0.01``: improve by 1% or count as bad) is our variant; it
    prunes far more often (README, LOBSTER reproduction).
    """

    patience: int
    tolerance: float = 0.01
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, loss: float) -> tuple[bool, bool]:
        """Record one epoch's loss: returns (improved, plateau reached)."""
        good = loss < self.best * (1.0 + self.tolerance)
        improved = loss < self.best
        if improved:
            self.best = loss
        self.bad_epochs = 0 if good else self.bad_epochs + 1
        return improved, self.bad_epochs >= self.patience

    def reset(self) -> None:
        self.best, self.bad_epochs = math.inf, 0


@dataclass
class LobsterSchedule:
    """The whole LOBSTER run as a during-training schedule for the lab (see ``lab/run.py``).

    Each epoch: train with the regulariser, then on the validation loss either keep going, or (plateau)
    restore the best weights and prune with the largest safe threshold. Stops after ``stop_after`` pruning
    phases that did not increase the compression ratio (or at the epoch budget).
    """

    model: nn.Module
    options: dict[str, Any]
    params: dict[str, nn.Parameter] = field(init=False)
    plateau: Plateau = field(init=False)
    best_weights: dict[str, torch.Tensor] | None = None
    phases: list[dict] = field(default_factory=list)
    phases_without_gain: int = 0

    def __post_init__(self):
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise PrunelabError(f"unknown option(s) {', '.join(sorted(unknown))} for method 'lobster'; "
                                f"allowed: {', '.join(sorted(DEFAULTS))}")
        self.options = {**DEFAULTS, **self.options}
        if int(self.options["pwe"]) < 1:
            raise PrunelabError(f"pwe must be >= 1, got {self.options['pwe']}")
        self.params = covered_parameters(self.model, bool(self.options["weights_only"]))
        self.plateau = Plateau(int(self.options["pwe"]), float(self.options["plateau_tolerance"]))

    def attach(self, optimizer: torch.optim.Optimizer):
        return Regulariser(self.params, float(self.options["lambda"])).attach(optimizer)

    def after_epoch(self, epoch: int, val_loss: float, val, test, device="cpu") -> dict | None:
        """Plateau bookkeeping after an epoch whose validation loss was ``val_loss``; on a plateau, runs a
        pruning phase and returns its record."""
        improved, plateau = self.plateau.update(val_loss)
        if improved:
            self.best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if not plateau:
            return None
        if self.best_weights is not None:  # the authors restore the best weights before pruning
            self.model.load_state_dict(self.best_weights)
        self.plateau.reset()
        before = metrics.sparsity_summary(self.model)["compression_ratio"]
        search = find_threshold(self.model, self.params, lambda: evaluate(self.model, val, device=device)["loss"],
                                float(self.options["twt"]), bool(self.options["reference_midpoint"]))
        masking.attach(self.model, apply_threshold(self.params, search.threshold))
        summary = metrics.sparsity_summary(self.model)
        after_loss = evaluate(self.model, val, device=device)["loss"]
        gain = summary["compression_ratio"] > before * (1 + 1e-9)
        self.phases_without_gain = 0 if gain else self.phases_without_gain + 1
        self.best_weights = None
        record = {
            "epoch": epoch, "threshold": search.threshold, "val_loss_before": search.reference_loss,
            "val_loss_after": after_loss, "loss_bound": search.bound, "evaluations": search.evaluations,
            "compression_ratio": summary["compression_ratio"], "sparsity_all": summary["sparsity_all"],
            "remaining_percent": {name: 100.0 * float((p != 0).float().mean()) for name, p in self.params.items()},
            "test_error": evaluate(self.model, test, device=device)["error"],
        }
        self.phases.append(record)
        return record

    def describe(self, record: dict) -> str:
        """One log line for a pruning phase's record."""
        return (f"threshold {record['threshold']:.4g}, val loss {record['val_loss_before']:.4f} -> "
                f"{record['val_loss_after']:.4f}, compression {record['compression_ratio']:.2f}x, "
                f"test error {record['test_error']:.2%}")

    def done(self) -> bool:
        return self.phases_without_gain >= int(self.options["stop_after"])

    def stop_reason(self) -> str:
        return f"no further compression for {self.options['stop_after']} pruning phases"

    # -- resume ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {f"best::{k}": v for k, v in (self.best_weights or {}).items()}
        return ({"best": self.plateau.best, "bad_epochs": self.plateau.bad_epochs, "phases": self.phases,
                 "phases_without_gain": self.phases_without_gain, "has_best": self.best_weights is not None},
                tensors)

    def load(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.plateau.best, self.plateau.bad_epochs = state["best"], state["bad_epochs"]
        self.phases, self.phases_without_gain = state["phases"], state["phases_without_gain"]
        self.best_weights = ({k[len("best::"):]: v for k, v in tensors.items() if k.startswith("best::")}
                             if state["has_best"] else None)
