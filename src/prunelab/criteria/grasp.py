"""GraSP: gradient signal preservation, pruning at initialisation (docs/methods/grasp-synflow.md).

Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020.

GraSP keeps the weights whose removal would hurt the gradient flow most. With g = dL/dθ and H the
Hessian of L, removing a set of weights (a perturbation δ = -θ on them) changes the squared gradient
norm to first order by

    Δ||g||² ≈ 2 δᵀ H g,   so for weight j alone:   Δ_j ≈ -2 θ_j (H g)_j.

The paper scores S(-θ) = -θ ⊙ (H g) (= Δ/2) and removes the weights with the *largest* S: removing them
raises the gradient norm most (or lowers it least). The official code (alecwangcq/GraSP
``pruner/GraSP.py``, commit f166054, read for this implementation) computes ``-θ ⊙ Hg``, takes the top
``ratio`` fraction as the threshold and keeps the entries at or below it.

**Sign convention here.** prunelab's criteria return "higher = keep", so this criterion returns the
keep score ``θ ⊙ (H g) = -S``: the top-k of it is exactly the complement of removing the largest S. It
equals ``½ d||g(c ⊙ θ)||² / dc_j`` at c = 1 (the gate derivative of half the squared gradient norm),
which the tests check by finite differences. Note it is signed, not a magnitude: a weight whose removal
would *raise* the gradient norm has a negative keep score and goes first, before a zero weight.

Details, as in the official code (``pruner/GraSP.py``, ``main_prune_non_imagenet.py``, configs):

* L is the cross-entropy of logits divided by a temperature, ``temperature`` = 200.
* The scoring batch is class-balanced and ordered by class: ``samples_per_class`` = 10 examples of every
  class (the CIFAR configs' value), drawn with a seed from ``generator`` from any form of data
  (``prunelab.data.feed``). Data holding no more examples than the draw needs is used whole, in order.
* Each batch is processed in two halves (the first and second half of the class-ordered batch, as the
  official code does): g = Σ_halves ∇L_half, then H g = Σ_halves ∇(gᵀ∇L_half) by double backward
  (a Hessian-vector product; g held fixed). With BatchNorm in train mode each half has its own batch
  statistics, as there. A batch of one example is not split.
* ``bn_mode`` = "train": the official code scores the network as built, which is in train mode (batch
  statistics); "eval" uses the running statistics. The running statistics are restored either way.
  Dropout is off while scoring.
* ``iterations`` (1): number of balanced batches (the official ``num_iters``); g is summed over all of
  them before the Hessian products.
* Not reproduced: the official ``GraSP(..., reinit=True)`` re-draws the *Linear* layers' weights of its
  scoring copy with Xavier-normal before scoring (so the fc masks are scored on other weights than the
  ones trained); here every layer is scored on the model's own weights.

H g needs a second derivative of every operation on the path. Scoring therefore runs attention
(``torch.nn.functional.scaled_dot_product_attention``, which ``nn.MultiheadAttention`` and Hugging Face
models call) on its math backend, because the fused flash / memory-efficient kernels have no double
backward, with ``nn.MultiheadAttention``'s fused inference path off, and recurrent models with cuDNN
disabled on a GPU (cuDNN RNNs have no double backward). The math backend computes the same attention
(to rounding) and is used only while scoring. An operation that still has no second derivative is
refused in one line naming it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option
from ..data import feed
from .snip import (BN_MODES, attention_slow_path, check_bn_mode, check_positive_int, loss_gradients, require_data,
                   scoring_mode)


def balanced_batches(data, generator: torch.Generator, samples_per_class: int,
                     iterations: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``iterations`` disjoint batches of ``samples_per_class`` examples of each class (seeded)."""
    samples_per_class = check_positive_int("grasp", "samples_per_class", samples_per_class)
    iterations = check_positive_int("grasp", "iterations", iterations)
    data = require_data(data, "grasp")
    targets = data.targets()
    classes = torch.unique(targets).tolist()
    if len(targets) <= samples_per_class * len(classes) * iterations:  # no more than one draw: all, in order
        everything = data.draw(len(targets))
        return [(feed.take(everything.inputs, part), everything.targets[part])
                for part in torch.tensor_split(torch.arange(len(targets)), iterations)]
    order = torch.randperm(len(targets), generator=generator)
    shuffled = targets[order]
    per_class = []
    for label in classes:
        rows = order[shuffled == label]
        if len(rows) < samples_per_class * iterations:
            raise PrunelabError(f"grasp: class {label} has {len(rows)} examples, fewer than "
                                f"samples_per_class x iterations = {samples_per_class * iterations}")
        per_class.append(rows)
    drawn = []
    for it in range(iterations):
        idx = torch.cat([rows[it * samples_per_class:(it + 1) * samples_per_class] for rows in per_class])
        rows = data.rows(idx)
        drawn.append((rows.inputs, rows.targets))
    return drawn


def _halves(inputs: torch.Tensor, targets: torch.Tensor):
    """The first and second half of a batch (the official code's split); a single example stays whole."""
    n = feed.count(inputs)
    if n < 2:
        return [(inputs, targets)]
    first, second = slice(0, n // 2), slice(n // 2, n)
    return [(feed.take(inputs, first), targets[first]), (feed.take(inputs, second), targets[second])]


@contextlib.contextmanager
def twice_differentiable(model: nn.Module):
    """Kernels with a double backward for H g: attention on SDPA's math backend and on
    ``nn.MultiheadAttention``'s Python path; recurrent layers without cuDNN."""
    recurrent = any(isinstance(m, nn.RNNBase) for m in model.modules())
    no_cudnn = torch.backends.cudnn.flags(enabled=False) if recurrent else contextlib.nullcontext()
    with sdpa_kernel(SDPBackend.MATH), attention_slow_path(), no_cudnn:
        yield


def _hessian_product(model, params, g, inputs, targets, data, temperature) -> list[torch.Tensor]:
    """∇(gᵀ ∇L) on one batch, g held fixed: a Hessian-vector product by double backward."""
    weights = list(params.values())
    try:
        grads = loss_gradients(model, params, inputs, targets, data=data, temperature=temperature,
                               create_graph=True)
        z = sum((fixed * grad).sum() for fixed, grad in zip(g, grads))
        if not z.requires_grad:  # the gradient does not depend on the weights: H g = 0
            return [torch.zeros_like(w) for w in weights]
        return list(torch.autograd.grad(z, weights, allow_unused=True, materialize_grads=True))
    except (RuntimeError, NotImplementedError) as error:
        if "not implemented" not in str(error) and "differentiate twice" not in str(error):  # once_differentiable
            raise
        first = str(error).strip().splitlines()[0]
        raise PrunelabError(f"grasp needs second derivatives (a Hessian-vector product) and the model uses an "
                            f"operation without one: {first}") from None


@dataclass(frozen=True)
class GraspOptions(Options):
    samples_per_class: int = option(10, "examples of every class in a scoring batch", low=1)
    iterations: int = option(1, "class-balanced scoring batches", low=1)
    temperature: float = option(200.0, "the logits are divided by it before the loss", low=0, open_low=True)
    bn_mode: str = option("train", "normalisation layers on batch ('train') or running ('eval') statistics",
                          choices=BN_MODES)


def grasp_scores(model: nn.Module, params: Mapping[str, nn.Parameter], *, data, generator: torch.Generator,
                 samples_per_class: int = GraspOptions.samples_per_class,
                 iterations: int = GraspOptions.iterations, temperature: float = GraspOptions.temperature,
                 bn_mode: str = GraspOptions.bn_mode, **_) -> dict[str, torch.Tensor]:
    """GraSP keep score θ ⊙ (H g) = -S(-θ) (Wang et al. 2020, the paper's score negated): higher = keep."""
    bn_mode = check_bn_mode("grasp", bn_mode)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise PrunelabError(f"grasp option temperature must be a positive number, got {temperature!r}")
    data = require_data(data, "grasp")
    drawn = balanced_batches(data, generator, samples_per_class, iterations)
    weights = list(params.values())
    halves = [half for inputs, targets in drawn for half in _halves(inputs, targets)]
    with scoring_mode(model, params, bn_mode), twice_differentiable(model):
        # g: the gradient summed over all half-batches (the official code's first pass)
        g = [torch.zeros_like(w) for w in weights]
        for inputs, targets in halves:
            for total, grad in zip(g, loss_gradients(model, params, inputs, targets, data=data, temperature=temperature)):
                total += grad
        # H g: for each half-batch, differentiate z = gᵀ ∇L_half once more
        hg = [torch.zeros_like(w) for w in weights]
        for inputs, targets in halves:
            for total, product in zip(hg, _hessian_product(model, params, g, inputs, targets, data, temperature)):
                total += product.detach()
    return {name: (w.detach() * product).cpu().to(torch.float64)
            for (name, w), product in zip(params.items(), hg)}


register(Method(
    "grasp", "gradient signal preservation θ⊙Hg at initialisation (keeps what gradient flow needs)",
    grasp_scores, scope="global", when="init", needs_data=True,
    options=GraspOptions,
    paper="Wang, Zhang & Grosse, ICLR 2020"))
