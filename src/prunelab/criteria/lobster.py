"""LOBSTER: loss-based sensitivity regularisation, with threshold pruning on validation plateaus.

Tartaglione, Bragagnolo, Grangetto, Lepsoy, "LOss-Based SensiTivity rEgulaRization: towards deep sparse
neural networks" (2020 preprint; journal version Neural Networks 146, 2022). Specification:
``docs/methods/lobster.md``.

- Update (paper eq. 6-7): ``w <- w - eta*g - lambda*w*max(0, 1 - |g|)``, g the raw batch-mean gradient
  dL/dw. As in the authors' code the ordinary optimizer step runs first and the penalty is applied to the
  post-step weights with the same gradient (:class:`Regulariser`).
- Pruning phase (paper section 4.1): when the validation loss has not improved for PWE epochs, restore the
  best weights and zero every covered parameter with |w| < T, T the largest threshold whose validation
  loss stays within (1 + TWT) of the loss before thresholding, found by bisection
  (:func:`find_threshold`). Zeroed parameters are pinned (our masks).
- Covered parameters: every parameter of Linear, Conv and BatchNorm layers (weights, biases, gamma/beta)
  as in the paper; ``weights_only`` restricts to the prunable weights.

Choices where the paper and the authors' code differ (docs/methods/lobster.md): the threshold returned is
the last *verified* one (the code returns an untested midpoint: ``reference_midpoint=True``); momentum
buffers of pinned parameters are zeroed (the masks do it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import masking
from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option


@dataclass(frozen=True)
class LobsterOptions(Options):
    # "lambda" is a Python keyword: the field is lam, the option and flag are named lambda (see parse)
    lam: float = option(1e-4, "lambda, the regularisation strength of eq. 7", low=0)
    pwe: int = option(20, "plateau waiting epochs (PWE) before a pruning phase", low=1, flag=True)
    twt: float = option(0.05, "threshold worsening tolerance (TWT): relative validation-loss increase a pruning "
                              "phase may cause", low=0, flag=True)
    weights_only: bool = option(False, "regularise and threshold only the prunable weights (not biases and "
                                       "normalisation parameters)")
    reference_midpoint: bool = option(False, "return the bisection's untested midpoint, as the authors' code")
    stop_after: int = option(10, "stop after this many pruning phases without further compression", low=1)
    plateau_tolerance: float = option(0.01, "an epoch is good when its loss is below best x (1 + this); "
                                            "-0.01 is our stricter variant")

    @classmethod
    def parse(cls, method: str, values=None) -> "LobsterOptions":
        values = dict(values or {})
        if "lambda" in values:
            values["lam"] = values.pop("lambda")
        elif "lam" in values:
            raise PrunelabError(f"unknown option(s) lam for method {method!r}; the option is named lambda")
        try:
            return super().parse(method, values)
        except PrunelabError as error:  # name the option as the user wrote it
            raise PrunelabError(str(error).replace(" lam ", " lambda ").replace("allowed: lam,", "allowed: lambda,")) \
                from None

    @classmethod
    def defaults(cls) -> dict:
        values = super().defaults()
        return {"lambda" if k == "lam" else k: v for k, v in values.items()}

    @classmethod
    def flags(cls) -> tuple[str, ...]:
        return ("lambda", *super().flags())

    @classmethod
    def help(cls, name: str) -> str:
        return super().help("lam" if name == "lambda" else name)

    def as_dict(self) -> dict:
        return {"lambda" if k == "lam" else k: v for k, v in super().as_dict().items()}


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
def find_threshold(model: nn.Module, params: dict[str, nn.Parameter], loss_at: Callable[..., float],
                   twt: float, reference_midpoint: bool = False, max_steps: int = 60,
                   early_exit: bool = False) -> ThresholdSearch:
    """The largest global magnitude threshold T keeping ``loss_at()`` <= (1 + twt) x its value at T = 0.

    Bisection as in the authors' ``_find_threshold_with_bisection`` (docs/methods/lobster.md): the bracket
    starts at the mean over layers of the mean |w| of the non-zero weights; its ends are the smallest and
    largest non-zero weight magnitudes (biases excluded), and an upper end's loss counts as infinite until a
    trial replaces it. The search stops when the bracket's losses differ by less than 5% of the bound or the
    midpoint stops moving. Returns the lower end of the bracket, which was evaluated and is feasible (or,
    with ``reference_midpoint``, the untested midpoint). Every trial restores the weights.

    ``early_exit`` (ours; same decisions, cheaper): trials after the first are called as
    ``loss_at(stop_above)``, which may return early with any lower bound of the loss above ``stop_above``
    (``prunelab.training.evaluate(..., stop_above=)``). Set at 1.06 x the bound, such a trial is
    infeasible, and its loss is at least 5% of the bound above every feasible one, so neither the
    bracket nor the stopping rule can tell the bound from the exact loss.
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
            return loss_at(1.06 * bound) if early_exit and evaluations > 1 else loss_at()
        finally:
            for name, p in params.items():
                p.copy_(originals[name])

    # the bracket's ends and start come from the weights alone (biases and BatchNorm shifts are thresholded
    # too, but a large bias must not stretch the bracket), as the authors' threshold_scheduler.py does
    weights = [o.abs()[o != 0] for n, o in originals.items() if n.endswith("weight") and (o != 0).any()]
    reference = trial(0.0)  # the first trial: never stopped early (the bound comes from it)
    bound = (1.0 + twt) * reference
    if not weights:
        return ThresholdSearch(0.0, reference, reference, bound, evaluations)
    mean = sum(w.mean().item() for w in weights) / len(weights)
    low, high = min(w.min().item() for w in weights), max(w.max().item() for w in weights)
    at_mean = trial(mean)
    if at_mean < bound:
        a, loss_a, b, loss_b = mean, at_mean, high, math.inf  # the upper end is not evaluated: bisect on
    else:
        # below the smallest weight only biases and normalisation parameters can fall: check that end too,
        # so that the threshold returned is always one whose loss was measured (0 removes nothing)
        at_low = trial(low)
        a, loss_a = (low, at_low) if at_low <= bound else (0.0, reference)
        b, loss_b = mean, at_mean
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


register(Method(
    "lobster", "loss-based sensitivity regularisation + threshold pruning on plateaus (Tartaglione et al. 2020)",
    criterion=None, when="during", options=LobsterOptions, schedule="lobster", targets=(),
    paper="Tartaglione et al. 2020, eq. 6-7, section 4.1"))
