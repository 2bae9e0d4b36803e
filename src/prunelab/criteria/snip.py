"""SNIP: single-shot network pruning based on connection sensitivity (docs/methods/snip.md).

Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.

Each prunable weight w_j gets a gate c_j (the network computes with c ⊙ w). The connection sensitivity
is the derivative of the loss with respect to the gate at c = 1 (paper eq. 5):

    g_j = dL(c ⊙ w; D_b) / dc_j |_{c=1} = w_j * dL/dw_j

with L the mean softmax cross-entropy on a mini-batch D_b of training data. The score is its normalised
magnitude over *all* prunable tensors together (eq. 6):

    s_j = |g_j| / sum_k |g_k|

and the method keeps the top kappa = round((1 - sparsity) m) scores globally (eq. 7; exact count and
deterministic ties are `prunelab.selection`'s job). One forward-backward pass scores every weight.

Options (``Method.options``; ``--method-option key=value`` in the lab):

* ``batch_size`` (None): examples per scoring batch. None = the paper's choice, which is the training
  batch size: 100 for single-channel inputs (the MNIST family), 128 otherwise (CIFAR).
* ``batches`` (1): number of batches. The official code draws exactly one. With more, the *signed*
  g_j are summed over the batches before the absolute value (the gradient of the summed loss; what
  torchprune's SNIP does; see docs/methods/snip.md), not the |g_j| of each batch.
* ``bn_mode`` ("eval"): "eval" = normalisation layers use their running statistics, which on a fresh
  model are the initial ones (mean 0, variance 1), as the official code does (``is_train=False``);
  "train" = batch statistics. Either way the running statistics are left exactly as they were.
  Dropout is always off while scoring.

Scoring data: any form ``prunelab.data.feed`` takes (a Dataset, a DataLoader, an ``(inputs, targets)``
pair, an iterable of batches). ``batches x batch_size`` un-augmented examples are drawn without
replacement with a seed taken from ``generator`` (all of them, in order, when the data holds no more) and
cut into consecutive batches. The loss is the feed's ``loss_fn`` (default cross-entropy).

Scoring leaves the model as it was: weights, buffers (BatchNorm running statistics), the train/eval
mode of every module, ``requires_grad`` and ``.grad`` (gradients are taken with `torch.autograd.grad`,
so no ``.grad`` is written and no mask hook fires). On a masked model the masked weights are zero, so
their g is 0; the selection ignores them anyway. Biases (``include_bias=True``, the official code's
behaviour) are scored the same way: a bias initialised to 0 has g = 0 and goes first.

The helpers below (`scoring_batches`, `scoring_mode`, `loss_gradients`) are shared with the other
prune-at-initialisation criteria (GraSP, SynFlow).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..data import feed
from ..data.feed import Feed, as_feed
from ..errors import PrunelabError
from ..methods import Method, register
from ..options import Options, option

BN_MODES = ("eval", "train")
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# --- shared helpers ---------------------------------------------------------------------------------

def check_positive_int(method: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunelabError(f"{method} option {name} must be a positive integer, got {value!r}")
    return value


def check_bn_mode(method: str, bn_mode) -> str:
    if bn_mode not in BN_MODES:
        raise PrunelabError(f"{method} option bn_mode must be one of: {', '.join(BN_MODES)}; got {bn_mode!r}")
    return bn_mode


@dataclass(frozen=True)
class SnipOptions(Options):
    batch_size: int | None = option(None, "examples per scoring batch; None: the paper's training batch "
                                          "(100 for 1-channel inputs, else 128)", low=1)
    batches: int = option(1, "scoring batches; signed sensitivities are summed over them", low=1)
    bn_mode: str = option("eval", "normalisation layers on running ('eval') or batch ('train') statistics",
                          choices=BN_MODES)


def default_batch_size(data: Feed) -> int:
    """The paper's scoring batch (= its training batch): 100 for 1-channel (MNIST) inputs, else 128."""
    try:
        shape = as_feed(data).input_shape()
    except PrunelabError:  # a dict of inputs (token ids and masks): no channels to read
        return 128
    return 100 if len(shape) >= 1 and shape[0] == 1 else 128


def require_data(data, method: str) -> Feed:
    """``data`` as a Feed, or the error naming the method that needs it."""
    if data is None:
        raise PrunelabError(f"method {method!r} needs data to score (pass data=...)")
    return as_feed(data)


def scoring_batches(data, generator: torch.Generator, *, batch_size: int | None, batches: int,
                    method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` examples drawn without replacement with a seed taken from
    ``generator`` (``prunelab.data.feed``'s draw: the same examples from every form of the same data).
    ``batch_size`` None: the paper's (100 or 128), or all examples when the data holds fewer."""
    batches = check_positive_int(method, "batches", batches)
    if batch_size is not None:
        batch_size = check_positive_int(method, "batch_size", batch_size)
    data = require_data(data, method)
    size = batch_size or default_batch_size(data)
    if data.length is not None and batch_size is None:
        size = min(size, max(data.length // batches, 1))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    drawn = data.draw(size * batches, torch.Generator().manual_seed(seed))
    if len(drawn) < size * batches:
        raise PrunelabError(f"{method}: the data holds {len(drawn)} examples, too few for {batches} full "
                            f"batch(es) of {size} (set batch_size or batches)")
    if drawn.targets is None:
        raise PrunelabError(f"{method} scores the loss: the data must hold targets")
    return [(feed.take(drawn.inputs, slice(i * size, (i + 1) * size)), drawn.targets[i * size:(i + 1) * size])
            for i in range(batches)]


@contextlib.contextmanager
def attention_slow_path() -> Iterator[None]:
    """``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` on their Python path: their inference
    fast path (eval mode without gradients) runs fused kernels that skip the submodules' forward (so
    hooks on ``linear1`` never fire) and have no gradient."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def attention_owner(model: nn.Module, module: nn.Module) -> str | None:
    """The name of the ``nn.MultiheadAttention`` whose ``out_proj`` ``module`` is (it reads the Linear's
    weight directly, never calling its forward), else None."""
    for name, owner in model.named_modules():
        if isinstance(owner, nn.MultiheadAttention) and owner.out_proj is module:
            return name
    return None


def tied_elsewhere(model: nn.Module, name: str) -> str | None:
    """Another name of parameter ``name`` held by a *different* module (a tied weight), else None; a module
    registered twice (the same layer under two names) is not a tie."""
    for held in masking.holders(model).values():
        names = [n for n, _, _ in held]
        if name in names:
            first = held[names.index(name)][1]
            return next((n for n, m, _ in held if m is not first), None)
    return None


def check_measurable(method: str, model: nn.Module, module_name: str, module: nn.Module, name: str) -> None:
    """Refuse, in one line, a weight whose layer's inputs a per-layer activity rule (relief, iSparse) cannot
    measure: a MultiheadAttention ``out_proj`` (read directly, never called), or a weight tied to another
    layer's."""
    attention = attention_owner(model, module)
    if attention is not None:
        raise PrunelabError(f"{method}: {module_name} is used inside MultiheadAttention {attention!r}, which "
                            "reads its weight directly, so its inputs cannot be measured as a Linear's")
    tie = tied_elsewhere(model, name)
    if tie is not None:
        raise PrunelabError(f"{method}: {name} is tied to {tie}, another layer's weight; {method} measures each "
                            "layer's inputs separately and cannot score a weight two layers use")


@contextlib.contextmanager
def scoring_mode(model: nn.Module, params: Mapping[str, nn.Parameter], bn_mode: str = "eval",
                 restore_buffers: bool = True) -> Iterator[None]:
    """Put ``model`` in scoring mode and restore it exactly afterwards.

    Inside: every module in eval mode (no dropout), except normalisation layers in train mode when
    ``bn_mode == "train"`` (batch statistics) and recurrent layers without inter-layer dropout (same
    computation in either mode; cuDNN differentiates RNNs only in train mode); the prunable parameters
    require grad. Afterwards: each module's own mode, each parameter's ``requires_grad`` and (with
    ``restore_buffers``) every buffer's values, so BatchNorm running statistics are unchanged.
    """
    modes = {module: module.training for module in model.modules()}
    requires = {name: p.requires_grad for name, p in params.items()}
    saved = [(b, b.detach().clone()) for name, b in model.named_buffers()  # masks are never written here
             if not name.endswith(masking.MASK_SUFFIX)] if restore_buffers else []
    try:
        model.eval()
        for module in model.modules():
            if bn_mode == "train" and isinstance(module, _NORM_LAYERS):
                module.train()
            elif isinstance(module, nn.RNNBase) and not module.dropout:
                module.train()
        for p in params.values():
            p.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for p, flag in zip(params.values(), requires.values()):
            p.requires_grad_(flag)
        for module, mode in modes.items():
            module.training = mode


def loss_gradients(model: nn.Module, params: Mapping[str, nn.Parameter], inputs, targets, *,
                   data: Feed | None = None, temperature: float = 1.0,
                   create_graph: bool = False) -> list[torch.Tensor]:
    """dL/dw for each of ``params``, L = ``data``'s loss (default: mean cross-entropy) of logits / temperature
    (no .grad written)."""
    data = data if data is not None else Feed((inputs, targets))
    logits = data.logits(model, inputs)
    if temperature != 1.0:
        logits = logits / temperature
    loss = data.loss_fn(logits, targets.to(logits.device))
    return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True))


# --- SNIP ---------------------------------------------------------------------------------------------

def connection_sensitivity(model: nn.Module, params: Mapping[str, nn.Parameter], *, data,
                           generator: torch.Generator, batch_size: int | None = SnipOptions.batch_size,
                           batches: int = SnipOptions.batches,
                           bn_mode: str = SnipOptions.bn_mode) -> dict[str, torch.Tensor]:
    """The signed connection sensitivity g_j = w_j dL/dw_j (paper eq. 5), summed over the batches.

    Returned in float64 on the CPU, keyed like ``params``.
    """
    bn_mode = check_bn_mode("snip", bn_mode)
    data = require_data(data, "snip")
    drawn = scoring_batches(data, generator, batch_size=batch_size, batches=batches, method="snip")
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
    with scoring_mode(model, params, bn_mode):
        for inputs, targets in drawn:
            grads = loss_gradients(model, params, inputs, targets, data=data)
            for (name, p), grad in zip(params.items(), grads):
                total[name] += (p.detach() * grad).cpu().to(torch.float64)  # float64 on the CPU (not on MPS)
    return total


def snip_scores(model: nn.Module, params: Mapping[str, nn.Parameter], *, data, generator: torch.Generator,
                batch_size: int | None = SnipOptions.batch_size, batches: int = SnipOptions.batches,
                bn_mode: str = SnipOptions.bn_mode, **_) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity s_j = |g_j| / sum_k |g_k| (paper eqs. 5-6); higher = keep."""
    g = connection_sensitivity(model, params, data=data, generator=generator, batch_size=batch_size,
                               batches=batches, bn_mode=bn_mode)
    magnitude = {name: value.abs() for name, value in g.items()}
    norm = sum(float(m.sum()) for m in magnitude.values())
    if norm > 0:  # all-zero sensitivities (e.g. every weight masked) stay zero rather than NaN
        magnitude = {name: m / norm for name, m in magnitude.items()}
    return magnitude


register(Method(
    "snip", "connection sensitivity |w dL/dw| on a data batch, pruned once at initialisation",
    snip_scores, scope="global", when="init", needs_data=True,
    options=SnipOptions,
    paper="Lee, Ajanthan & Torr, ICLR 2019"))
