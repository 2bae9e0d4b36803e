"""SNIP: single-shot network pruning based on connection sensitivity (methods.md section 1).

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
  torchprune's SNIP does, and what methods.md recommends), not the |g_j| of each batch.
* ``bn_mode`` ("eval"): "eval" = normalisation layers use their running statistics, which on a fresh
  model are the initial ones (mean 0, variance 1), as the official code does (``is_train=False``);
  "train" = batch statistics. Either way the running statistics are left exactly as they were.
  Dropout is always off while scoring.

Scoring data: ``data`` is an `ArrayDataset` (anything with ``.batches(batch_size, shuffle, seed,
augment)``), from which ``batches`` shuffled, un-augmented batches are drawn with a seed taken from
``generator``; or an ``(inputs, targets)`` pair of tensors, used whole and in order as the scoring
data (split into ``batches`` consecutive chunks; ``batch_size`` must then be left unset).

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
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..errors import PrunelabError
from ..methods import Method, register

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


def check_options(options) -> None:
    """SNIP's option values, checked by the lab before a run starts."""
    check_positive_int("snip", "batches", options.get("batches", 1))
    if options.get("batch_size") is not None:
        check_positive_int("snip", "batch_size", options["batch_size"])
    check_bn_mode("snip", options.get("bn_mode", "eval"))


def _as_pair(data):
    """(inputs, targets) if ``data`` is a pair of tensors, else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
            raise PrunelabError(f"scoring data: inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) "
                                "must hold the same, non-zero number of examples")
        return inputs, targets
    return None


def example_shape(data) -> tuple[int, ...] | None:
    """The shape of one input example of ``data`` (a dataset or a pair of tensors), or None."""
    if data is None:
        return None
    pair = _as_pair(data)
    if pair is not None:
        return tuple(pair[0].shape[1:])
    inputs = getattr(data, "inputs", None)
    if torch.is_tensor(inputs):
        return tuple(inputs.shape[1:])
    return None


def default_batch_size(data) -> int:
    """The paper's scoring batch (= its training batch): 100 for 1-channel (MNIST) inputs, else 128."""
    shape = example_shape(data)
    return 100 if shape is not None and len(shape) >= 1 and shape[0] == 1 else 128


def scoring_batches(data, generator: torch.Generator, *, batch_size: int | None, batches: int,
                    method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The scoring batches: see the module docstring for the rules."""
    batches = check_positive_int(method, "batches", batches)
    if batch_size is not None:
        batch_size = check_positive_int(method, "batch_size", batch_size)
    if data is None:
        raise PrunelabError(f"method {method!r} needs data to score (pass data=...)")
    pair = _as_pair(data)
    if pair is not None:
        if batch_size is not None:
            raise PrunelabError(f"{method}: batch_size applies to a dataset; a pair of (inputs, targets) "
                                "tensors is used whole (split it with the batches option)")
        if batches > pair[0].shape[0]:
            raise PrunelabError(f"{method}: cannot split {pair[0].shape[0]} examples into {batches} batches")
        return list(zip(torch.tensor_split(pair[0], batches), torch.tensor_split(pair[1], batches)))
    if not hasattr(data, "batches"):
        raise PrunelabError(f"{method}: data must be a dataset (ArrayDataset) or a pair of (inputs, targets) "
                            f"tensors, got {type(data).__name__}")
    size = batch_size or default_batch_size(data)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    drawn = []
    for batch in data.batches(size, shuffle=True, seed=seed, drop_last=True, augment=False):
        drawn.append(batch)
        if len(drawn) == batches:
            return drawn
    raise PrunelabError(f"{method}: the data holds {len(data)} examples, too few for {batches} full batch(es) "
                        f"of {size} (set batch_size or batches)")


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


def to_model(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Move a batch to the model's device (and floating inputs to its dtype)."""
    reference = next(model.parameters())
    if inputs.is_floating_point():
        inputs = inputs.to(reference.device, reference.dtype)
    else:
        inputs = inputs.to(reference.device)
    return inputs, targets.to(reference.device)


def loss_gradients(model: nn.Module, params: Mapping[str, nn.Parameter], inputs, targets, *,
                   temperature: float = 1.0, create_graph: bool = False) -> list[torch.Tensor]:
    """dL/dw for each of ``params``, L = mean cross-entropy of logits / temperature (no .grad written)."""
    inputs, targets = to_model(model, inputs, targets)
    logits = model(inputs)
    if temperature != 1.0:
        logits = logits / temperature
    loss = F.cross_entropy(logits, targets)
    return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True))


# --- SNIP ---------------------------------------------------------------------------------------------

def connection_sensitivity(model: nn.Module, params: Mapping[str, nn.Parameter], *, data,
                           generator: torch.Generator, batch_size: int | None = None, batches: int = 1,
                           bn_mode: str = "eval") -> dict[str, torch.Tensor]:
    """The signed connection sensitivity g_j = w_j dL/dw_j (paper eq. 5), summed over the batches.

    Returned in float64 on the CPU, keyed like ``params``.
    """
    bn_mode = check_bn_mode("snip", bn_mode)
    drawn = scoring_batches(data, generator, batch_size=batch_size, batches=batches, method="snip")
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
    with scoring_mode(model, params, bn_mode):
        for inputs, targets in drawn:
            grads = loss_gradients(model, params, inputs, targets)
            for (name, p), grad in zip(params.items(), grads):
                total[name] += (p.detach() * grad).cpu().to(torch.float64)  # float64 on the CPU (not on MPS)
    return total


def snip_scores(model: nn.Module, params: Mapping[str, nn.Parameter], *, data, generator: torch.Generator,
                batch_size: int | None = None, batches: int = 1, bn_mode: str = "eval",
                **_) -> dict[str, torch.Tensor]:
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
    options={"batch_size": None, "batches": 1, "bn_mode": "eval"}, validate=check_options,
    paper="Lee, Ajanthan & Torr, ICLR 2019"))
