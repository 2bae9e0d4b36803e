"""PFP: Provable Filter Pruning (docs/methods/pfp.md).

Liebenwein, Baykal, Lang, Feldman & Rus, "Provable Filter Pruning for Efficient Neural Networks",
ICLR 2020 (arXiv 1911.07412). The algorithm follows the authors' code (lucaslie/torchprune, release
af46c3b), as restated in docs/methods/pfp.md; the paper's own equations were not available.

**Unit.** An *input channel* j of each Conv2d/Conv1d/Linear layer l: a channel of a conv's input, a
neuron of a Linear layer's input (a Conv1d is scored as a Conv2d of height 1; grouped convs are refused).
The layer reading a Hugging Face self-attention has one unit per *head* (the channel graph's head units),
so heads are kept or dropped whole. Removing it zeroes the slice W_l[:, j]; the channel (filter / neuron of the
previous layer) that produced it is then removed too when no other layer reads it (section 2.2,
"propagation"; here computed exactly from the traced channel graph, `prunelab.structure`, instead of
the code's "zero gradient on a few batches" test, so a residual channel is removed only when every
reader dropped it). A Linear layer reading a flattened conv output (LeNet-5-Caffe's fc3) has one unit
per conv channel (its H*W features, like kernel offsets). The first layer's inputs are units too (the
MLP's input pixels; section 2.2, "first layer").

**Empirical sensitivity** (section 2.1). For data points x in S, the input a of layer l (conv: unfolded
patches, im2col) is split into a+ = max(a, 0) and a- = max(-a, 0), each a separate point; the weight into
W+ (positive entries) and W- (negative entries); z+ = W+ a, z- = W- a (bias-free, per output unit i and
patch p). The relative contribution of weight (i, j, u) is

    g = w+_{i,(j,u)} a_{(j,u),p} / z+_{i,p}   or   w-_{i,(j,u)} a_{(j,u),p} / z-_{i,p}

(whichever sign the weight has; a denominator with |z| <= float32 eps counts as infinite, g = 0), and

    s_j = max over x in S, output units i, patches p, kernel offsets u of g.

Exactly that maximum is computed, vectorised over the batch (no loop over points, patches or outputs):
a p-norm upper bound discards the (point, output, patch) triples that cannot raise any channel's running
maximum, and only the remaining ones are evaluated (g <= 1 always, values are clamped to 1 to remove
rounding noise). For a Conv2d on the CPU both z and the bound are convolutions of the input image, so
the unfolded patches (k*k times larger) are never formed (`_conv_max_product`); a Linear layer's bound is
one matrix product (`_max_product`). ``empirical_sensitivity`` gives it on its own; ResNet-56 on 256
CIFAR-10 points costs about 6 training steps of batch 128 on one CPU thread
(benchmarks/results/scoring_cost.md).

**Size of S** (section 2.1): |S| = ceil(C ln(8 eta* / delta')), delta' = delta / eta, eta = sum of the
layers' output units per example (Linear: out_features, conv: C*H*W), eta* = their max, C = 3, rounded
up to a multiple of ``batch_size``. S is drawn (seeded) from ``data`` without replacement, from any form
``prunelab.data.feed`` takes; data holding no more than |S| examples is used whole, in order.

**Budget** (section 2.2). S_l = sum_j s_j, p_j = s_j / S_l, alpha_l = 2 C ln(8 (P_l + 1) k_l / delta)
(P_l patches, k_l kernel elements per unit), and for one global error level eps:
m_l(eps) = ceil(3 (6 + 2 eps) S_l alpha_l / eps^2) >= 1 and the layer keeps
in_l(eps) = min(units, ceil(sum_j 1 - (1 - p_j)^m_l)) >= 1 channels, the expected number of distinct
channels in m_l draws. Layers with a larger total sensitivity keep more. eps is found by bisection
(in log eps over [1e-300, 1e150]) on the *actual* number of weights the resulting masks keep, after
propagation (the code's nested search, ε inside a keep-ratio search, collapsed into one: the kept size
is monotone in eps), so the target is met to within one channel's weights.

**Target.** ``sparsity`` is the fraction of prunable weights (Conv2d/Linear weights) removed, counted
after propagation, as for every prunelab method (``target="weights"``). ``target="all"`` makes it the
fraction of *all* parameters removed, PFP's prune ratio PR (masked biases and BatchNorm entries count as
removed).

**Selection** (``mode``):

* ``deterministic`` (default; PFPNet, what the paper's experiments ran): keep the in_l channels with the
  largest s_j; no reweighting.
* ``sample`` (PFPNetRand, the analysed form): m' draws so that the expected number of distinct channels
  is in_l, m' i.i.d. draws from p (seeded), keep the drawn channels and scale channel j's weights by
  count_j / (m' p_j) (unbiased importance sampling). The weights are rescaled in place.
* ``hybrid`` (PFPNetTop, partially derandomised): channels with p_j >= 1/m' are kept unscaled, the other
  channels are sampled with m' (1 - sum of their kept p) draws from p restricted to them and rescaled
  likewise (our reading of the code's description; see docs/methods/pfp.md).

**Masks**: input slices of every layer (weight columns), and for channels no layer reads any more the
producing weight rows and (``mask_bias=True``, docs/methods/README.md) their bias entries and BatchNorm
weight/bias, so a removed channel outputs exactly 0. Masked entries stay masked (iterative cascades:
sensitivities are recomputed on the current network, dead channels have s = 0 and stay removed).

Options: ``mode``, ``delta`` (delta_S = delta_failure; 1e-16 = the code's default and CIFAR value; the
paper's configs use 1e-12 for LeNet-300-100 and 1e-9 for LeNet-5), ``points`` (|S|; None = from delta),
``batch_size`` (None = 64 for single-channel inputs, PFP's MNIST batch, else 128), ``c`` (3),
``target``, ``mask_bias``, and ``round_to`` (ours, default 1 = the paper): each layer's in_l(eps) is
rounded to the nearest multiple of it (at least one multiple; layers narrower than it are left alone),
so that compact layers have channel counts the CPU's vector kernels handle well (8 or 16).
``round_to="auto"`` (ours) takes the multiple from ``prunelab.backend_probe.channel_multiple``: the step
of the latency staircase of a conv of the model's heaviest shape (kernel, feature-map size, input
width; batch 64, one thread, channels-last), measured once per process (16 on an AVX-512 CPU), or the
value set by ``backend_probe.set_channel_multiple`` / ``PRUNELAB_CHANNEL_MULTIPLE``. Given that value
the plan is deterministic; ``PFPPlan.round_to`` records it. The bisection on eps still meets the target.
``allocation`` (ours, default "paper" = one eps for all layers): "latency" gives layer l the error level
eps (t_l / t)^(1/3), t_l its measured time per input unit at full width
(``prunelab.backend_probe.layer_latency``: batch 64, one thread, channels-last), t their geometric mean, so
layers that cost more time per channel are cut more (``_set_allocation`` derives the exponent).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import structure
from ..data import feed
from ..data.feed import as_feed, example_input
from ..errors import PrunelabError
from ..masking import param_name
from ..hooks import run_with_hooks
from ..methods import Method, register
from ..options import Options, option
from ..selection import check_sparsity

MODES = ("deterministic", "sample", "hybrid")
ALLOCATIONS = ("paper", "latency")
TARGETS = ("weights", "all")
_EPS = float(torch.finfo(torch.float32).eps)
_CHUNK = 1 << 22  # elements per evaluation step (about 16 MB of float32)


# --- empirical sensitivity ------------------------------------------------------------------------------

# The bound of `_max_product` uses p = 16: max_k x_k <= ||x||_16 <= K^(1/16) max_k x_k.

def _pow16(x: torch.Tensor) -> torch.Tensor:
    """x ** 16 in place by four squarings (faster than pow)."""
    for _ in range(4):
        x.mul_(x)
    return x


def _root16(x: torch.Tensor) -> torch.Tensor:
    for _ in range(4):
        x.sqrt_()
    return x


def _max_product(A: torch.Tensor, R: torch.Tensor, W: torch.Tensor, unit: torch.Tensor,
                 best: torch.Tensor) -> torch.Tensor:
    """best[u] = max(best[u], max over q, o, k with unit[k] = u of W[o,k] * A[q,k] * R[q,o]), clamped to 1.

    A (Q, K), R (Q, O), W (O, K), all >= 0. Exact, without forming all Q*O*K products:

    1. the rows with the largest R of each output give a first lower bound per unit;
    2. a pair (q, o) can only raise some unit if R[q,o] max_k W[o,k] A[q,k] / best[unit[k]] > 1. The max
       over k is bounded from above by a p-norm, which is one matrix product:
       R[q,o] (sum_k (A[q,k] W[o,k] / best[unit[k]])^p)^(1/p) (float64; units whose bound would
       overflow count every pair they touch as a candidate);
    3. the candidate pairs are evaluated exactly, largest bound first, in growing batches, and the
       bound is recomputed with the improved best values until no candidate is left.

    The true values never exceed 1 (one weight's share of a sum of non-negative terms), so clamping
    at 1 only removes rounding noise; units at 1 are final.
    """
    Q, K = A.shape
    if Q == 0:
        return best
    amax = A.amax(0)                                           # (K,)
    top = min(Q, 8)
    rtop, itop = R.topk(top, dim=0)                            # (top, O)
    cand = ((A[itop] * rtop[..., None]).amax(0) * W).amax(0).clamp_(max=1.0)
    best = best.scatter_reduce(0, unit, cand, reduce="amax")
    live = amax > 0
    ahat = _pow16((A[:, live] / amax[live]).double())        # (Q, K') in [0, 1]
    wa = (W[:, live] * amax[live]).double()                    # (O, K')
    u_live = unit[live]
    batch = max(1, _CHUNK // max(K, 1))
    while True:
        b = best[u_live].double()[None, :]                     # (1, K')
        open_ = (wa > 0) & (b < 1.0)
        ratio = torch.where(open_, wa / b.clamp(min=1e-300), torch.zeros_like(wa))
        wild = open_ & (ratio > 1e12)                          # best ~ 0: no usable bound
        ratio = ratio.masked_fill(wild, 0.0)
        bound = R.double() * _root16(ahat @ _pow16(ratio).T)   # (Q, O)
        mask = bound > 1.0 - 1e-9
        if bool(wild.any()):
            mask |= ((A[:, live] > 0).double() @ wild.double().T) > 0
        pairs = torch.nonzero(mask)
        if not pairs.numel():
            return best
        q, o = pairs[:, 0], pairs[:, 1]
        key = bound[q, o].nan_to_num(float("inf"))
        order = torch.argsort(key, descending=True)[:batch]
        q, o = q[order], o[order]
        vals = (A[q] * W[o] * R[q, o][:, None]).amax(0).clamp_(max=1.0)   # (K,)
        best = best.scatter_reduce(0, unit, vals, reduce="amax")
        if pairs.shape[0] <= batch:
            return best
        batch *= 2


def _layer_terms(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(A, patches): the layer input as rows of a matrix A (Q, K) with K = weight columns, and P."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features), 1
    if isinstance(module, nn.Conv1d):  # a Conv1d is a Conv2d of height 1
        cols = F.unfold(x.unsqueeze(2), (1, module.kernel_size[0]), (1, module.dilation[0]),
                        (0, module.padding[0]), (1, module.stride[0]))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, CK, P)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]


def _update_sensitivity(module: nn.Module, x: torch.Tensor, unit_of_column: torch.Tensor,
                        best: torch.Tensor) -> torch.Tensor:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1).float()
    wpos, wneg = weight.clamp(min=0), (-weight).clamp(min=0)
    W = torch.cat([wpos, wneg], 0)  # (2O, K): the rows of the positive and of the negative part
    x = x.detach().float()
    if _conv_path(module, x):
        # a Python loop over sub-batches only (memory); points, patches and outputs are tensor dimensions
        W_conv = W.reshape(W.shape[0], *module.weight.shape[1:])
        out_hw = max(1, x.shape[-2] * x.shape[-1] // (module.stride[0] * module.stride[1]))
        per = max(1, (1 << 23) // (W.shape[0] * out_hw))
        for part in x.split(per):
            for a in (part.clamp(min=0), (-part).clamp(min=0)):  # a+ and a- as separate points
                if bool((a > 0).any()):
                    best = _conv_max_product(module, a, W, W_conv, unit_of_column, best)
        return best
    A_all, _ = _layer_terms(module, x)
    rows_per_block = max(1, _CHUNK // max(1, A_all.shape[1]))
    for start in range(0, A_all.shape[0], rows_per_block):
        block = A_all[start:start + rows_per_block]
        for A in (block.clamp(min=0), (-block).clamp(min=0)):  # a+ and a- as separate points
            if not bool((A > 0).any()):
                continue
            z = A @ W.T  # (Q, 2O): z+ for the first O columns, |z-| for the others
            R = torch.where(z > _EPS, 1.0 / z.clamp(min=_EPS), torch.zeros_like(z))
            best = _max_product(A, R, W, unit_of_column, best)
    return best


# --- convolutions without im2col ------------------------------------------------------------------------
#
# The same exact maximum as `_max_product`, for a Conv2d, computed on the input image instead of its
# unfolded patches (9x fewer numbers for a 3x3 kernel): z is one convolution, the p-norm bound is one
# convolution of a^16 with (W / best)^16 in float32, and only the (point, output, position) triples the
# bound cannot rule out gather their patch and are evaluated exactly.

_THETA = 6e-3   # 6e-3^16 = 2.8e-36, above float32's smallest normal: smaller terms may be lost, so the
                # bound adds theta (max_k t_k <= (sum of the kept t_k^16)^(1/16) + theta)
_SLACK = 1e-4   # relative rounding allowance of the float32 bound (sums of positive terms)
_BUDGET_DIV = 2048  # the first batch of candidates evaluated: this fraction of all triples (x4 per round)
_WILD = 1e30    # W a_max / best above this (best ~ 0): such columns are evaluated exactly instead


def _conv_path(module: nn.Module, x: torch.Tensor) -> bool:
    """The image path needs float32 convolutions that sum positive terms directly (relative error of a
    few eps): PyTorch's CPU kernels (oneDNN direct, im2col + GEMM) do; GPU libraries may pick Winograd or
    TF32, so other devices take the unfolded path."""
    return isinstance(module, nn.Conv2d) and not isinstance(module.padding, str) and x.device.type == "cpu"


def _patch_view(a_pad: torch.Tensor, module: nn.Conv2d, out_hw: tuple[int, int]) -> torch.Tensor:
    """The unfolded input as a strided view (B, Ho, Wo, C, kh, kw) of the padded input: no copy (im2col)."""
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    sb, sc, sy, sx = a_pad.stride()
    return a_pad.as_strided((a_pad.shape[0], *out_hw, a_pad.shape[1], kh, kw),
                            (sb, sh * sy, sw * sx, sc, dh * sy, dw * sx))


def _conv_pairs(patches, W, R, b, o, p, unit, best):
    """best raised by the exact values W[o,k] a[b,p,k] R[b,o,p] of the given (b, o, p) triples."""
    width = patches.shape[2]
    K = W.shape[1]
    step = max(1, _CHUNK // K)
    for s in range(0, b.shape[0], step):
        bb, oo, pp = b[s:s + step], o[s:s + step], p[s:s + step]
        # candidates share positions (several outputs each): gather every patch once
        at, inverse = torch.unique(bb * R.shape[2] + pp, return_inverse=True)
        rows = patches[at // R.shape[2], (at % R.shape[2]) // width, at % width].reshape(-1, K)
        vals = (rows[inverse] * W[oo] * R[bb, oo, pp][:, None]).amax(0).clamp_(max=1.0)
        best = best.scatter_reduce(0, unit, vals, reduce="amax")
    return best


def _patches_around_max(a, module, out_hw, channels):
    """(point, position) of every output position whose patch holds channel c's largest input, for each c."""
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw), (ph, pw) = module.stride, module.dilation, module.padding
    flat = a[:, channels].transpose(0, 1).reshape(channels.numel(), -1).argmax(1)
    height, width = a.shape[2:]
    b, y, x = flat // (height * width), (flat // width) % height, flat % width
    oy = (y + ph)[:, None] - torch.arange(kh) * dh                                   # (n, kh): = oh * sh
    ox = (x + pw)[:, None] - torch.arange(kw) * dw
    ok_y = (oy % sh == 0) & (oy >= 0) & (oy // sh < out_hw[0])
    ok_x = (ox % sw == 0) & (ox >= 0) & (ox // sw < out_hw[1])
    ok = ok_y[:, :, None] & ok_x[:, None, :]                                         # (n, kh, kw)
    n, i, j = torch.nonzero(ok, as_tuple=True)
    return b[n], (oy[n, i] // sh) * out_hw[1] + ox[n, j] // sw


def _conv_columns(a_pad, module, out_hw, W, R, columns, unit, best):
    """best raised by the exact maximum over all (point, output, position) of each given weight column."""
    kh, kw = module.kernel_size
    (sh, sw), (dh, dw) = module.stride, module.dilation
    ho, wo = out_hw
    for k in columns.tolist():
        c, u = divmod(k, kh * kw)
        i, j = divmod(u, kw)
        plane = a_pad[:, c, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
        value = ((plane.reshape(plane.shape[0], 1, -1) * W[:, k, None]) * R).amax().clamp(max=1.0)
        best[unit[k]] = torch.maximum(best[unit[k]], value)
    return best


def _conv_max_product(module: nn.Conv2d, a: torch.Tensor, W: torch.Tensor, W_conv: torch.Tensor,
                      unit: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """`_max_product` for one sign part a >= 0 (B, C, H, W) of a Conv2d's input, W = [W+; W-] (2O, K).

    g[b,o,p,k] = W[o,k] a[b,p,k] / z[b,o,p] (a[b,p,:] the patch at output position p), maximised per unit:
    1. z = conv(a, W) and R = 1/z (0 where z <= eps); each output at its largest R, and every output at
       the patches around the largest input of a channel still at 0, give a first lower bound per unit
       (columns whose unit is still at 0 are then maximised one by one, exactly);
    2. with ahat = a / max(a) per channel and Wn[o,k] = W[o,k] max(a_c) / (best_k m_o) (m_o its row max),
       max_k g[b,o,p,k] / best_k <= R m_o (conv(ahat^16, Wn^16)^(1/16) + theta): one convolution bounds
       every triple at once;
    3. the triples whose bound reaches 1 are evaluated exactly, largest bound first, in growing batches,
       and the bound is recomputed with the improved best values until no candidate is left.
    """
    z = F.conv2d(a, W_conv, None, module.stride, module.padding, module.dilation)   # (B, 2O, Ho, Wo)
    batch, outputs, ho, wo = z.shape
    positions = ho * wo
    R = torch.reciprocal(z).masked_fill_(z <= _EPS, 0.0).reshape(batch, outputs, positions)  # 1/z, 0 if z <= eps
    if not bool((R > 0).any()):
        return best  # every g is 0
    ph, pw = module.padding
    a_pad = F.pad(a, (pw, pw, ph, ph))
    K = W.shape[1]

    # each output at its largest R: a first lower bound (point, then position: two cheap reductions)
    per_point = R.amax(2)                                                             # (B, 2O)
    first_b = per_point.argmax(0)                                                     # (2O,)
    o_all = torch.arange(outputs)
    first_p = R[first_b, o_all].argmax(1)
    patches = _patch_view(a_pad, module, (ho, wo))
    best = _conv_pairs(patches, W, R, first_b, o_all, first_p, unit, best)

    amax = a.amax((0, 2, 3))                                                         # (C,)
    per_channel = module.kernel_size[0] * module.kernel_size[1]
    # channels whose unit has no lower bound yet: every output at the patches around their largest input
    cold = torch.nonzero((best[unit[::per_channel]] <= 0) & (amax > 0)).squeeze(1)
    if cold.numel():
        b, p = _patches_around_max(a, module, (ho, wo), cold)
        n = b.shape[0]
        best = _conv_pairs(patches, W, R, b.repeat(outputs), o_all.repeat_interleave(n), p.repeat(outputs),
                           unit, best)

    scale = amax.repeat_interleave(per_channel)                                      # (K,)
    ahat16 = _pow16(a / amax.clamp(min=torch.finfo(a.dtype).tiny)[None, :, None, None])
    exact = torch.zeros(K, dtype=torch.bool)                                         # columns done exactly
    # the first bound is loose (one point per output so far): evaluate its best few triples, then bound
    # again; in a trained-or-not ResNet-56 the second bound leaves tens to thousands of candidates
    budget = max(1024, batch * outputs * positions // _BUDGET_DIV)
    while True:
        b_col = best[unit]
        open_ = (W > 0) & ((b_col < 1.0) & (scale > 0) & ~exact)[None, :]
        wild = (open_ & (W * scale[None, :] >= _WILD * b_col[None, :])).any(0)
        if bool(wild.any()):
            columns = torch.nonzero(wild).squeeze(1)
            best = _conv_columns(a_pad, module, (ho, wo), W, R, columns, unit, best)
            exact[columns] = True
            continue
        ratio = torch.where(open_, W * scale[None, :] / b_col.clamp(min=1e-38)[None, :], torch.zeros_like(W))
        m = ratio.amax(1)                                                            # (2O,)
        live = m > 0
        if not bool(live.any()):
            return best
        wn16 = _pow16(ratio / m.clamp(min=1e-38)[:, None]).reshape(W_conv.shape)
        S = F.conv2d(ahat16, wn16, None, module.stride, module.padding, module.dilation).reshape(R.shape)
        bound = _root16(S.clamp_(min=0.0)).mul_(1.0 + _SLACK).add_(_THETA).mul_(m[None, :, None]).mul_(R)
        triples = torch.nonzero(bound > 1.0 - _SLACK)
        if not triples.numel():
            return best
        last = triples.shape[0] <= budget  # every candidate gets evaluated: the maximum is exact
        if not last:
            key = bound[triples[:, 0], triples[:, 1], triples[:, 2]]
            triples = triples[torch.topk(key, budget).indices]
        best = _conv_pairs(patches, W, R, triples[:, 0], triples[:, 1], triples[:, 2], unit, best)
        if last:
            return best
        budget *= 4


def _column_units(module: nn.Module, units_of_input: torch.Tensor) -> torch.Tensor:
    """Unit of each weight column (conv: input channel x kernel offset) from the unit of each input."""
    if isinstance(module, nn.Linear):
        return units_of_input
    per_channel = math.prod(module.kernel_size)
    return units_of_input.repeat_interleave(per_channel)


def _check_layer(name: str, module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise PrunelabError(f"pfp supports Linear, Conv1d and Conv2d layers; {name} is {type(module).__name__}")
    if isinstance(module, nn.Linear):
        return
    if module.groups != 1:
        raise PrunelabError(f"pfp: {name} is a grouped convolution (groups={module.groups}): its sensitivities "
                            f"are defined for dense layers only (exclude it, e.g. exclude={name!r})")
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise PrunelabError(f"pfp: {name} pads with padding={module.padding!r}, padding_mode="
                            f"{module.padding_mode!r}; pfp needs numeric zero padding")


@torch.no_grad()
def empirical_sensitivity(model: nn.Module, inputs: torch.Tensor, layers: list[str] | None = None, *,
                          units: Mapping[str, torch.Tensor] | None = None,
                          batch_size: int = 64) -> dict[str, torch.Tensor]:
    """PFP's empirical sensitivity s_j of every input unit of each layer (docs/methods/pfp.md).

    ``layers``: module names (default: every Linear/Conv2d). ``units``: per layer, the unit of each input
    feature/channel (default: one unit per input channel of a conv, per input feature of a Linear); a
    unit's sensitivity is the max over its features. The model runs in eval mode (BatchNorm running
    statistics) on ``inputs`` in batches of ``batch_size``; its modes are restored. Returns float32
    tensors on the CPU.
    """
    named = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in named.items() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    best: dict[str, torch.Tensor] = {}
    column_units: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    for name in layers:
        module = named[name]
        _check_layer(name, module)
        n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        u = units.get(name) if units is not None else None
        u = torch.arange(n_in) if u is None else u.to(torch.long)
        column_units[name] = _column_units(module, u).to(device)
        best[name] = torch.zeros(int(u.max()) + 1 if u.numel() else 0, device=device)

    def hook(module, args, name):
        best[name] = _update_sensitivity(module, args[0], column_units[name], best[name])

    handles = [named[n].register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in layers]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for chunk in feed.chunks(inputs, batch_size):
            feed.call(model, feed.to_model(model, chunk))
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.train(mode)
    return {n: b.cpu() for n, b in best.items()}


# --- sample size and allocation -------------------------------------------------------------------------

def sample_size(etas: list[int], delta: float, c: float = 3.0, batch_size: int = 1) -> int:
    """|S| = ceil(C ln(8 eta* / delta')), delta' = delta / sum(eta), rounded up to a multiple of batch_size."""
    eta, eta_star = float(sum(etas)), float(max(etas))
    size = math.ceil(c * (math.log(8.0 * eta_star) - math.log(delta) + math.log(eta)))
    return int(math.ceil(size / batch_size) * batch_size)


def _alpha(patches: int, kernel: int, delta: float, c: float) -> float:
    return 2.0 * c * (math.log(8.0 * (patches + 1) * kernel) - math.log(delta))


def _log_draws(log_eps: float, total: float, alpha: float) -> float:
    """log m_l(eps) = log ceil(3 (6 + 2 eps) S_l alpha_l / eps^2), at least log 1."""
    if total <= 0:
        return 0.0
    eps = math.exp(log_eps) if log_eps < 700 else float("inf")
    if math.isinf(eps):
        return 0.0
    log_m = math.log(3.0) + math.log(6.0 + 2.0 * eps) + math.log(total) + math.log(alpha) - 2.0 * log_eps
    if log_m > 700:
        return log_m  # beyond float range: ceil does not matter
    return math.log(max(1.0, math.ceil(math.exp(log_m))))


def expected_unique(p: torch.Tensor, draws: float) -> float:
    """E[distinct channels] in ``draws`` i.i.d. draws from p: sum_j 1 - (1 - p_j)^draws."""
    p = p.double()
    nz = p[p > 0]
    if math.isinf(draws):
        return float(nz.numel())
    return float((-torch.expm1(draws * torch.log1p(-nz.clamp(max=1.0))).nan_to_num(1.0)).sum())


def _draws_for(p: torch.Tensor, kept: int) -> float:
    """m' such that the expected number of distinct channels in m' draws is ``kept`` (bisection)."""
    if kept >= int((p > 0).sum()):
        return float("inf")
    lo, hi = float(kept), float(kept)
    while expected_unique(p, hi) < kept:
        hi *= 2.0
        if hi > 1e18:
            return float("inf")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if expected_unique(p, mid) < kept:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.5:
            break
    return hi


@dataclass
class _Layer:
    name: str
    module: nn.Module
    n_units: int
    feature_units: torch.Tensor          # (in_dim,) unit of each input feature/channel
    unit_features: list[list[int]]       # features of each unit
    patches: int
    kernel: int
    eta: int
    group: int | None                    # the channel group this layer reads (None: model input)
    sensitivity: torch.Tensor | None = None
    alive: torch.Tensor | None = None    # units with at least one unmasked weight column
    total: float = 0.0
    alpha: float = 0.0
    round_to: int = 1
    input_shape: tuple = ()
    log_eps_scale: float = 0.0           # allocation="latency": log of this layer's error-level factor
    latency_ms: float | None = None

    def kept_units(self, log_eps: float) -> int:
        n_alive = int(self.alive.sum())
        if self.total <= 0 or n_alive == 0:
            return min(1, n_alive)
        log_m = _log_draws(log_eps + self.log_eps_scale, self.total, self.alpha)
        draws = math.exp(log_m) if log_m < 700 else float("inf")
        unique = expected_unique(self.sensitivity / self.total, draws)
        kept = max(1, min(n_alive, math.ceil(unique - 1e-9)))
        # Nearest multiple: still monotone in eps. A layer exactly one multiple wide is kept whole: any
        # narrower count runs no faster on a blocked backend, so its multiply-adds are better cut elsewhere.
        if self.round_to > 1 and n_alive >= self.round_to:
            kept = min(n_alive, self.round_to * max(1, round(kept / self.round_to)))
        return kept


@dataclass
class PFPPlan:
    """Everything one PFP pruning step decided (``plan`` returns it; the ``pfp`` method applies it)."""

    points: int
    epsilon: float
    target: int
    kept: int
    total: int
    masks: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    layers: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    round_to: int = 1                    # the multiple used ("auto" resolved)
    allocation: str = "paper"
    _selector: Any = field(default=None, repr=False)

    def at(self, sparsity: float, *, round_to: int | str | None = None,
           allocation: str | None = None) -> "PFPPlan":
        """The plan for another target from the same sensitivities: no second pass over S.

        Equal to ``plan(...)`` called again with ``sparsity`` (and ``round_to`` / ``allocation``, when
        given; else this plan's) and the same seed (same S, same draws in the sampling modes), at the cost of the
        allocation search only; the unit of ``sparsity`` is this plan's (``target``). For callers that
        search a ratio (e.g. one meeting a FLOP budget)."""
        started = time.perf_counter()
        layers = self._selector.layers
        if round_to is not None or allocation is not None:
            check_options(**({} if round_to is None else {"round_to": round_to}),
                          **({} if allocation is None else {"allocation": allocation}))
        multiple = self.round_to if round_to is None else _resolve_round_to(round_to, layers)
        for layer in layers:
            layer.round_to = multiple
        self._selector.allocation = self.allocation if allocation is None else allocation
        _set_allocation(layers, self._selector.allocation)
        result = _allocate(self._selector, check_sparsity(sparsity), self.points)
        result.seconds = {**self.seconds, "allocation": time.perf_counter() - started}
        return result

    def size_at(self, epsilon: float) -> int:
        """What the masks for error level ``epsilon`` would keep (same count as ``kept``), for inspection."""
        return self._selector.evaluate(math.log(epsilon))[0]

    def allocation_at(self, epsilon: float) -> dict[str, int]:
        """in_l(epsilon): the channels each layer is allotted at ``epsilon``, before selection."""
        return {l.name: l.kept_units(math.log(epsilon)) for l in self._selector.layers}


def _default_batch(example) -> int:
    """PFP's batch sizes: 64 for single-channel inputs (MNIST), else 128 (also for dicts of inputs)."""
    return 64 if torch.is_tensor(example) and example.dim() > 1 and example.shape[1] == 1 else 128


def _draw_inputs(data, points: int, generator: torch.Generator):
    """S: ``points`` inputs drawn without replacement (all of them, in order, when the data holds no more)."""
    return as_feed(data).draw(points, generator).inputs


def _layers(model: nn.Module, params: Mapping[str, torch.Tensor], graph: structure.ChannelGraph,
            example) -> list[_Layer]:
    named = dict(model.named_modules())
    chosen = []
    for name, module in named.items():
        if param_name(name, "weight") in params and isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d,
                                                                                nn.Conv3d)):
            _check_layer(name, module)
            chosen.append(name)
    for pname in params:
        owner = named.get(pname.rpartition(".")[0])
        if owner is not None and isinstance(owner, nn.RNNBase):
            raise PrunelabError("pfp supports Linear and Conv2d layers, not recurrent layers")
    shapes: dict[str, tuple] = {}
    inputs: dict[str, tuple] = {}  # for allocation="latency", which times each layer at its own shape
    def record(name):
        def hook(_module, _args, output):
            shapes.setdefault(name, tuple(output.shape))  # returns None: the output is left alone
            inputs.setdefault(name, tuple(_args[0].shape))
        return hook

    run_with_hooks(model, example, [named[n].register_forward_hook(record(n)) for n in chosen])
    for name in chosen:
        if name not in shapes:
            raise PrunelabError(f"pfp: layer {name!r} is not called as a module in the forward pass (its weight "
                                f"is read by another module, such as nn.MultiheadAttention's out_proj); "
                                f"exclude it (exclude={name!r})")
    layers = []
    for name in chosen:
        module = named[name]
        n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        found = graph.consuming(name)
        feature_units = None
        group = None
        if found is not None:
            g, sl = found
            units = torch.full((n_in,), -1, dtype=torch.long)
            for r, ix in enumerate(sl.index):
                units[list(ix)] = r
            if bool((units >= 0).all()):
                feature_units, group = units, g
        if feature_units is None:
            feature_units = torch.arange(n_in)
        n_units = int(feature_units.max()) + 1
        unit_features = [[] for _ in range(n_units)]
        for f, u in enumerate(feature_units.tolist()):
            unit_features[u].append(f)
        per_unit = max(len(f) for f in unit_features)
        if isinstance(module, nn.Linear):
            kernel, patches = per_unit, 1
        else:
            kernel = math.prod(module.kernel_size) * per_unit
            patches = math.prod(shapes[name][2:])
        eta = int(math.prod(shapes[name][1:]))
        layers.append(_Layer(name, module, n_units, feature_units, unit_features, patches, kernel, eta, group,
                             input_shape=inputs[name]))
    if not layers:
        raise PrunelabError("pfp found no Linear/Conv2d layer among the prunable parameters")
    return layers


class _Selector:
    """Masks (and scales) for one error level; counts what they keep."""

    def __init__(self, model, params, graph, layers, alive, mode, mask_bias, target, generator):
        self.model, self.params, self.graph, self.layers = model, params, graph, layers
        self.alive, self.mode, self.mask_bias, self.target_kind = alive, mode, mask_bias, target
        self.generator_state = generator.get_state()
        self.by_group: dict[int, list[_Layer]] = {}
        for layer in layers:
            if layer.group is not None:
                self.by_group.setdefault(layer.group, []).append(layer)
        self.all_params = dict(model.named_parameters())
        self.total_params = sum(p.numel() for p in self.all_params.values())
        self.prunable_total = sum(self.all_params[param_name(l.name, "weight")].numel() for l in layers)

    def choose(self, counts: dict[str, int], generator: torch.Generator | None):
        """Kept units (bool) and per-unit scales of each layer for the given kept counts."""
        kept, scales = {}, {}
        for layer in self.layers:
            k = counts[layer.name]
            s = layer.sensitivity.masked_fill(~layer.alive, 0.0).double()
            keep = torch.zeros(layer.n_units, dtype=torch.bool)
            scale = None
            if self.mode == "deterministic" or layer.total <= 0 or k >= int((s > 0).sum()):
                order = torch.sort(s.masked_fill(~layer.alive, -1.0), descending=True, stable=True).indices
                keep[order[:k]] = True
            else:
                p = s / s.sum()
                draws = _draws_for(p, k)
                if math.isinf(draws):
                    keep = p > 0
                elif self.mode == "sample":
                    m = max(1, int(round(draws)))
                    count = torch.bincount(torch.multinomial(p, m, replacement=True, generator=generator),
                                           minlength=layer.n_units).double()
                    keep = count > 0
                    scale = torch.where(keep, count / (m * p).clamp(min=1e-300), torch.ones_like(p))
                else:  # hybrid
                    fixed = p >= 1.0 / draws
                    rest = p.masked_fill(fixed, 0.0)
                    mass = float(rest.sum())
                    m = int(round(draws * mass))
                    keep = fixed.clone()
                    scale = torch.ones_like(p)
                    if m >= 1 and mass > 0:
                        q = rest / mass
                        count = torch.bincount(torch.multinomial(q, m, replacement=True, generator=generator),
                                               minlength=layer.n_units).double()
                        drawn = count > 0
                        keep |= drawn
                        scale = torch.where(drawn, count / (m * q).clamp(min=1e-300), scale)
            keep &= layer.alive
            if not bool(keep.any()) and bool(layer.alive.any()):  # never cut a layer completely
                keep[int(torch.argmax(s.masked_fill(~layer.alive, -1.0)))] = True
            kept[layer.name] = keep
            if scale is not None:
                scales[layer.name] = scale
        return kept, scales

    def masks(self, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        masks: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            name = param_name(layer.name, "weight")
            base = self.alive.get(name)
            mask = (base.to("cpu", torch.bool).clone() if base is not None
                    else torch.ones(self.all_params[name].shape, dtype=torch.bool))
            columns = kept[layer.name][layer.feature_units]  # (in_dim,)
            mask &= columns.view(1, -1, *([1] * (mask.dim() - 2)))
            masks[name] = mask
        dead = self._dead_channels(kept)
        extra = structure.channel_masks(self.model, self.graph, dead, alive=self.alive,
                                        mask_bias=self.mask_bias, consumers=False)
        for name, mask in extra.items():
            masks[name] = masks[name] & mask if name in masks else mask
        return masks

    def _dead_channels(self, kept) -> dict[int, list[int]]:
        """Channels of each group that no layer reads any more (fixed point through shortcuts)."""
        groups = self.graph.groups
        dead = {g: torch.zeros(group.size, dtype=torch.bool) for g, group in enumerate(groups)}
        layer_of = {l.name: l for l in self.layers}
        readers = {}
        for g, group in enumerate(groups):
            if group.is_output or group.has_other:
                continue
            cond = torch.ones(group.size, dtype=torch.bool)
            links = []
            for s in group.consumers:
                if s.kind in ("conv", "linear"):
                    layer = layer_of.get(s.module)
                    if layer is None or layer.group != g:
                        cond[:] = False
                    else:
                        cond &= ~kept[s.module]
                elif s.kind == "shortcut":
                    links.append(s)
                else:
                    cond[:] = False
            readers[g] = (cond, links)
        for _ in range(len(groups) + 1):
            changed = False
            for g, (cond, links) in readers.items():
                new = cond.clone()
                for s in links:
                    module = self.model.get_submodule(s.module)
                    for r, ix in enumerate(s.index):
                        for i in ix:
                            target = self._shortcut_target(s.module, module, i)
                            if target is None or not bool(dead[target[0]][target[1]]):
                                new[r] = False
                if not torch.equal(new, dead[g]):
                    dead[g] = new
                    changed = True
            if not changed:
                break
        return {g: torch.nonzero(d).squeeze(1).tolist() for g, d in dead.items() if bool(d.any())}

    def _shortcut_target(self, name, module, i):
        t = structure.shortcut_destination(module, i)
        if t is None:
            return None
        for g, group in enumerate(self.graph.groups):
            for s in group.producers:
                if s.module == name:
                    for r, ix in enumerate(s.index):
                        if t in ix:
                            return g, r
        return None

    def count(self, masks: dict[str, torch.Tensor]) -> int:
        if self.target_kind == "weights":
            total = 0
            for layer in self.layers:
                total += int(masks[param_name(layer.name, "weight")].sum())
            return total
        removed = 0
        for name, param in self.all_params.items():
            mask = masks.get(name, self.alive.get(name))
            if mask is not None:
                removed += param.numel() - int(mask.sum())
        return self.total_params - removed

    def evaluate(self, log_eps: float):
        counts = {l.name: l.kept_units(log_eps) for l in self.layers}
        generator = torch.Generator()
        generator.set_state(self.generator_state)
        kept, scales = self.choose(counts, generator)
        masks = self.masks(kept)
        return self.count(masks), masks, kept, scales, counts


@dataclass(frozen=True)
class PfpOptions(Options):
    mode: str = option("deterministic", "keep the top channels (PFPNet), sample them (PFPNetRand) or both "
                                        "(PFPNetTop)", choices=MODES, flag=True)
    delta: float = option(1e-16, "failure probability delta_S, which sizes the sample S", low=0, high=1,
                          open_low=True, open_high=True, flag=True)
    points: int | None = option(None, "|S|, the data points; None: from delta", low=1)
    batch_size: int | None = option(None, "examples per forward pass; None: 64 for 1-channel inputs, else 128",
                                    low=1)
    c: float = option(3.0, "the constant C of the sample size and budget", low=0, open_low=True)
    target: str = option("weights", "what the target counts: the prunable weights, or all parameters (PR)",
                         choices=TARGETS)
    mask_bias: bool = option(True, "also mask the removed channels' biases and BatchNorm entries")
    round_to: int | str = option(1, "round each layer's channel budget to a multiple of this (ours; 1 = the "
                                    "paper); 'auto': the step measured on this CPU (prunelab.backend_probe)",
                                 low=1, flag=True)
    allocation: str = option("paper", "one error level for all layers (the paper), or 'latency' (ours): layers "
                                      "that take longer per channel get a larger one", choices=ALLOCATIONS)

    def check(self) -> None:
        if isinstance(self.round_to, str) and self.round_to != "auto":
            raise PrunelabError(f"method 'pfp' option round_to must be a positive integer or 'auto', "
                                f"got {self.round_to!r}")


def _probe_shape(layers: list[_Layer]) -> tuple[str, dict]:
    """The backend probe's layer shape for ``round_to="auto"``: the (kernel, feature-map size) class of
    conv layers with the most multiply-adds (the first on a tie), its median input width; a model
    without a Conv2d layer probes its Linear layers' median input width."""
    convs = [l for l in layers if isinstance(l.module, nn.Conv2d)]
    if not convs:
        widths = sorted(l.module.in_features for l in layers if isinstance(l.module, nn.Linear)) or [32]
        return "linear", {"width": widths[len(widths) // 2]}
    def shape(l: _Layer) -> tuple[int, int]:  # (kernel, feature-map side)
        return l.module.kernel_size[0], max(1, round(math.sqrt(l.patches)))

    macs: dict[tuple, int] = {}
    for l in convs:
        macs[shape(l)] = macs.get(shape(l), 0) + l.module.weight.numel() * l.patches
    kernel, size = max(macs, key=macs.get)  # max keeps the first of equals: deterministic
    widths = sorted(l.module.in_channels for l in convs if shape(l) == (kernel, size))
    return "conv2d", {"width": widths[len(widths) // 2], "size": size, "kernel": kernel}


def _set_allocation(layers: list[_Layer], allocation: str) -> None:
    """Each layer's error-level factor: 1 (the paper), or for "latency" (ours) (t_l / t)^(1/3), t_l the
    measured time of layer l per input unit at its full width (batch 64, one thread, channels-last), t
    their geometric mean. Why 1/3: m_l = K_l / eps_l^2 draws, and minimising sum_l t_l m_l for a fixed
    sum_l eps_l gives eps_l proportional to (t_l K_l)^(1/3); only the t_l part is applied, so equal
    latencies give the paper's one eps. Still monotone in eps: the bisection meets the target as before."""
    if allocation == "paper":
        for layer in layers:
            layer.log_eps_scale = 0.0
        return
    from .. import backend_probe

    for layer in layers:
        if layer.latency_ms is None:
            layer.latency_ms = backend_probe.layer_latency(layer.module, layer.input_shape[1:])
    scored = [l for l in layers if l.total > 0 and l.latency_ms > 0]
    if not scored:
        return
    logs = {l.name: math.log(l.latency_ms / l.n_units) for l in scored}
    mean = sum(logs.values()) / len(logs)
    for layer in layers:
        layer.log_eps_scale = (logs[layer.name] - mean) / 3.0 if layer.name in logs else 0.0


def _resolve_round_to(round_to: int | str, layers: list[_Layer]) -> int:
    """round_to as an integer: "auto" asks the backend probe (cached per process)."""
    if round_to != "auto":
        return int(round_to)
    from .. import backend_probe

    kind, shape = _probe_shape(layers)
    return backend_probe.channel_multiple(kind, **shape)


def check_options(**options) -> None:
    """PrunelabError for a bad option value."""
    PfpOptions.parse("pfp", options)


def plan(model: nn.Module, params: Mapping[str, torch.Tensor], data, sparsity: float, *,
         generator: torch.Generator, alive: Mapping[str, torch.Tensor] | None = None,
         mode: str = PfpOptions.mode, delta: float = PfpOptions.delta, points: int | None = None,
         batch_size: int | None = None, c: float = PfpOptions.c, target: str = PfpOptions.target,
         mask_bias: bool = PfpOptions.mask_bias, round_to: int | str = PfpOptions.round_to,
         allocation: str = PfpOptions.allocation) -> PFPPlan:
    """Compute PFP's masks for ``sparsity`` without touching the model (see the module docstring).

    The sensitivities are computed once: ``plan(...).at(other)`` gives the plan for another target
    from them (a search over ratios scores once)."""
    sparsity = check_sparsity(sparsity)
    check_options(mode=mode, delta=delta, points=points, batch_size=batch_size, c=c, target=target,
                  round_to=round_to, allocation=allocation)
    if data is None:
        raise PrunelabError("method 'pfp' needs data to score (pass data=...)")
    alive = dict(alive or {})
    timings = {}
    started = time.perf_counter()
    example = example_input(model, data, what="pfp")
    if batch_size is None:
        batch_size = _default_batch(example)
    graph = structure.channel_graph(model, example)
    layers = _layers(model, params, graph, example)
    timings["graph"] = time.perf_counter() - started
    round_to = _resolve_round_to(round_to, layers)

    if points is None:
        points = sample_size([l.eta for l in layers], delta, c, batch_size)
    inputs = _draw_inputs(data, points, generator)
    started = time.perf_counter()
    sens = empirical_sensitivity(model, inputs, [l.name for l in layers],
                                 units={l.name: l.feature_units for l in layers}, batch_size=batch_size)
    timings["sensitivity"] = time.perf_counter() - started
    started = time.perf_counter()
    for layer in layers:
        s = sens[layer.name].double()
        name = param_name(layer.name, "weight")
        mask = alive.get(name)
        if mask is None:
            layer.alive = torch.ones(layer.n_units, dtype=torch.bool)
        else:
            columns = mask.to("cpu", torch.bool).transpose(0, 1).reshape(mask.shape[1], -1).any(1)
            layer.alive = torch.zeros(layer.n_units, dtype=torch.long).scatter_reduce(
                0, layer.feature_units, columns.long(), reduce="amax") > 0
        layer.sensitivity = s.masked_fill(~layer.alive, 0.0)
        layer.total = float(layer.sensitivity.sum())
        layer.alpha = _alpha(layer.patches, layer.kernel, delta, c)
        layer.round_to = round_to
    _set_allocation(layers, allocation)

    selector = _Selector(model, params, graph, layers, alive, mode, mask_bias, target, generator)
    selector.allocation = allocation
    result = _allocate(selector, sparsity, feed.count(inputs))
    timings["allocation"] = time.perf_counter() - started
    result.seconds = timings
    return result


def _allocate(selector: _Selector, sparsity: float, points: int) -> PFPPlan:
    """Section 2.2's budget for ``sparsity`` on scored layers: bisection on eps for the kept count."""
    layers = selector.layers
    goal_total = selector.prunable_total if selector.target_kind == "weights" else selector.total_params
    goal = int(round((1.0 - sparsity) * goal_total))
    if sparsity == 0.0:
        keep_all = {l.name: l.alive.clone() for l in layers}
        masks = selector.masks(keep_all)
        best = (selector.count(masks), masks, keep_all, {}, {l.name: int(l.alive.sum()) for l in layers}, 0.0)
    else:
        lo, hi = math.log(1e-300), math.log(1e150)
        best = None
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            count, masks, kept, scales, counts = selector.evaluate(mid)
            if best is None or abs(count - goal) < abs(best[0] - goal) or (
                    abs(count - goal) == abs(best[0] - goal) and count < best[0]):
                best = (count, masks, kept, scales, counts, mid)
            if count == goal or hi - lo < 1e-9:
                break
            if count > goal:
                lo = mid
            else:
                hi = mid
        for log_eps in (lo, hi):  # the two sides of the last step
            result = selector.evaluate(log_eps)
            if abs(result[0] - goal) < abs(best[0] - goal):
                best = (*result, log_eps)
    count, masks, kept, scales, counts, log_eps = best
    round_to = layers[0].round_to if layers else 1

    weight_scales = {}
    for layer in layers:
        if layer.name in scales:
            name = param_name(layer.name, "weight")
            column = scales[layer.name][layer.feature_units].float()
            shape = (1, -1, *([1] * (selector.all_params[name].dim() - 2)))
            weight_scales[name] = column.view(shape)
    report_layers = [{
        "name": l.name, "units": l.n_units, "alive": int(l.alive.sum()), "kept": int(kept[l.name].sum()),
        "allocated": counts[l.name], "total_sensitivity": l.total, "patches": l.patches, "kernel": l.kernel,
        "eta": l.eta, "latency_ms": l.latency_ms, "eps_factor": math.exp(l.log_eps_scale)} for l in layers]
    return PFPPlan(points=points, epsilon=math.exp(log_eps) if log_eps < 700 else float("inf"),
                   target=goal, kept=count, total=goal_total, masks=masks, scales=weight_scales,
                   layers=report_layers, round_to=round_to, allocation=selector.allocation, _selector=selector)


def pfp_pruner(model, params, *, sparsity, scope, alive, data, generator, **options):
    """The ``pfp`` method: compute the plan, rescale sampled channels in place, return the masks."""
    if scope != "global":
        raise PrunelabError(f"pfp allocates channels across layers itself (one error level): scope must be "
                            f"'global', got {scope!r}")
    result = plan(model, params, data, sparsity, generator=generator, alive=alive, **options)
    if result.scales:
        all_params = dict(model.named_parameters())
        with torch.no_grad():
            for name, scale in result.scales.items():
                all_params[name].mul_(scale.to(all_params[name].device, all_params[name].dtype))
    return result.masks


def pfp_scores(model, params, *, data, generator, points=None, batch_size=None, delta=PfpOptions.delta,
               c=PfpOptions.c, **_):
    """Each weight scored by the sensitivity of the input unit it reads (inspection: ``prunelab.scores``)."""
    if data is None:
        raise PrunelabError("method 'pfp' needs data to score (pass data=...)")
    example = example_input(model, data, what="pfp")
    batch_size = batch_size or _default_batch(example)
    graph = structure.channel_graph(model, example)
    layers = _layers(model, params, graph, example)
    if points is None:
        points = sample_size([l.eta for l in layers], delta, c, batch_size)
    inputs = _draw_inputs(data, points, generator)
    sens = empirical_sensitivity(model, inputs, [l.name for l in layers],
                                 units={l.name: l.feature_units for l in layers}, batch_size=batch_size)
    scores = {}
    for layer in layers:
        name = param_name(layer.name, "weight")
        column = sens[layer.name][layer.feature_units]
        shape = (1, -1, *([1] * (params[name].dim() - 2)))
        scores[name] = column.view(shape).expand(params[name].shape).clone()
    return scores


register(Method("pfp", "Provable Filter Pruning: data-informed channel sensitivity, one error level for all "
                       "layers (Liebenwein et al.)", pfp_scores, scope="global", when="trained", needs_data=True,
                options=PfpOptions, pruner=pfp_pruner, structured=True, layers=(nn.Linear, nn.Conv1d, nn.Conv2d),
                targets=("sparsity", "parameters"), target_options={"parameters": {"target": "all"}},
                data_split="val", paper="Liebenwein et al., ICLR 2020"))
