"""NNrelief: prune each neuron's incoming connections by their share of its input activity.

Dekhovich, Tax, Sluiter & Bessa, "Neural network relief: a pruning algorithm based on neural activity",
Machine Learning 2024 (arXiv 2109.10795); authors' code adekhovich/NNrelief; spec in
docs/methods/relief.md. Our copy of the paper holds only the abstract; the formulas below are a
transcription of the paper's equations, which agrees with the code.

**Score** (docs/methods/relief.md), on a pruning set of N training images drawn once per run with the seed:

* Linear neuron j with inputs x_i: contribution c_ij = (1/N) sum_n |w_ij x_ni|, bias c_bj = |b_j|;
  shares s_ij = c_ij / S_j, s_bj = c_bj / S_j with S_j = sum_i c_ij + c_bj (the bias competes).
* Conv filter j, input channel i (the unit is the whole kernel slice K_ij):
  c_ij = (1/N) sum_n || |K_ij| * |x_ni| ||_F over the output map, c_bj = |b_j| sqrt(h w)
  (``conv_reduce="fro"``, the paper). The authors' code variants: ``"fro_of_mean"`` (vgg/resnet_prune:
  the norm of the convolution with the batch mean of |x|) and ``"sum"`` (lenet_prune: the sum of the
  map's entries, bias |b_j| h w).

**Selection** (3.2): per neuron/filter, sort its shares (weights and bias together) in descending order
and keep the p0 largest, p0 = min{p : sum_{k<=p} s_(k) >= alpha}; alpha_fc for Linear, alpha_conv for
Conv2d. ``selection="paper"`` keeps exactly p0 (ties: lower index first); ``"code"`` is the authors'
rule, pruning everything <= the (p0+1)-th share, so ties at the threshold go, and when alpha needs
every entry the smallest one is still pruned. Pruned entries have share 0 and stay pruned.

**Order** (3.1): all conv layers are scored on the network as it was before this round, then pruned;
the Linear layers are scored on the inputs recomputed after the conv pruning.

**Whole units** (3.1, 3.2): before scoring, a neuron or filter whose output is exactly 0 on the whole
pruning set (ReLU-dead) is removed: its weights, bias and BatchNorm entries, and the input slices of the
layers reading it. After selection, the backward clean-up removes every unit whose outgoing connections
are all pruned (its incoming weights, bias, BatchNorm entries), repeated until nothing changes. Both
act on channels with one producing layer (``structure.ChannelGroup.safe``); the output layer's units
are never removed. Removed units are what ``prunelab.compact`` takes out physically.

**Residual blocks** (3.2, resnet_prune): for conv2 of each basic block (modules with ``conv2``, ``bn2``
and ``shortcut``), channel c is compared through r = ||mean|bn2(conv2)|_c||_F / ||mean|shortcut|_c||_F,
and when r < (1 - alpha_conv) / alpha_conv the whole conv2 filter c (and its BatchNorm entries) is
removed. The code's second rule, masking a shortcut channel when 1/r < (1 - alpha) / alpha, needs a
mask on a parameter-free path and is not implemented; :func:`relief_masks` counts the channels it would
have masked (``shortcut_candidates`` in its report).

**Sparsity**: the method sets no target; alpha and the number of prune-retrain rounds decide it. The
lab's ``rounds`` is the paper's number of iterations (``rewind = "init"`` rewinds the survivors to
their initial values as in the paper's LeNet runs; fine-tuning is the VGG/ResNet procedure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking, structure
from ..data import feed
from ..data.feed import as_feed
from ..errors import PrunelabError
from ..masking import param_name
from ..hooks import run_with_hooks, takes_channels_last
from ..methods import Method, register
from ..options import Options, option
from .snip import attention_slow_path, check_measurable

CONV_REDUCE = ("fro", "fro_of_mean", "sum")
PRECISION = {"float32": torch.float32, "float64": torch.float64}
SELECTION = ("paper", "code")


@dataclass(frozen=True)
class ReliefOptions(Options):
    alpha_fc: float = option(0.95, "share of each neuron's input activity its kept connections carry", low=0,
                             high=1, open_low=True, flag=True)
    alpha_conv: float = option(0.9, "the same for each conv filter (units are kernel slices)", low=0, high=1,
                               open_low=True, flag=True)
    examples: int = option(1000, "pruning-set size drawn from the data", low=1)
    conv_reduce: str = option("fro", "a kernel slice's activity: 'fro', the Frobenius norm of its output map "
                                     "(paper); 'fro_of_mean' or 'sum' (the authors' VGG or LeNet code)",
                              choices=CONV_REDUCE)
    selection: str = option("paper", "keep exactly the fewest entries reaching alpha (paper), or the code's "
                                     "threshold", choices=SELECTION)
    remove_dead: bool = option(True, "remove units that never activate on the pruning set")
    cleanup: bool = option(True, "remove units whose outgoing connections are all gone")
    batch_size: int = option(100, "examples per forward pass (memory and speed only: CNN activations of larger "
                                  "batches run slower on CPUs)", low=1)
    precision: str = option("float32", "arithmetic of the conv layers' activity sums and slice norms: float32 "
                                       "(within about 1e-7 of float64, 1.5x faster) or float64",
                            choices=tuple(PRECISION))


# --- the selection rule ------------------------------------------------------------------------------

def shares(contrib: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each unit's contributions normalised to sum 1: rows of ``contrib`` (units x inputs), with the
    bias contribution as a last column when given. A unit with no activity gets all-zero shares."""
    table = contrib if bias is None else torch.cat([contrib, bias[:, None]], 1)
    total = table.sum(1, keepdim=True)
    return torch.where(total > 0, table / total.clamp_min(torch.finfo(table.dtype).tiny), torch.zeros_like(table))


def keep_by_share(share: torch.Tensor, alpha: float, rule: str = "paper") -> torch.Tensor:
    """Per row, the entries NNrelief keeps: the fewest largest shares whose sum reaches ``alpha``.

    ``rule="paper"`` keeps exactly p0 entries (ties broken by the lower index); ``"code"`` prunes every
    share <= the (p0+1)-th largest (the smallest one when all p0 = n are needed), as the authors' code.
    Zero shares are never kept.
    """
    units, n = share.shape
    if n == 0:
        return torch.zeros_like(share, dtype=torch.bool)
    ordered, order = torch.sort(share, dim=1, descending=True, stable=True)
    # first prefix reaching alpha; 1e-9 absorbs rounding (0.7 + 0.2 < 0.9 in floating point)
    p0 = ((ordered.cumsum(1) < alpha - 1e-9).sum(1) + 1).clamp(max=n)
    if rule == "paper":
        keep_sorted = torch.arange(n)[None, :] < p0[:, None]
        keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    else:
        threshold = ordered.gather(1, p0.clamp(max=n - 1)[:, None])
        keep = share > threshold
    return keep & (share > 0)


# --- activity on the pruning set --------------------------------------------------------------------

def pruning_set(data, examples: int, generator: torch.Generator):
    """N inputs drawn from ``data`` with the generator (all, in order, when it holds no more); any form
    ``prunelab.data.feed`` takes, or a tensor of inputs."""
    if data is None:
        raise PrunelabError("relief needs data: the pruning set is drawn from the training data (pass data=...)")
    return as_feed(data).draw(examples, generator).inputs


@dataclass
class LayerActivity:
    """Sums over the pruning set of one layer's inputs (for its score and for dead-unit checks)."""

    count: int = 0
    abs_sum: torch.Tensor | None = None     # Linear: per input feature; Conv2d: per (C, H, W) position
    conv_fro: torch.Tensor | None = None    # Conv2d, "fro": sum_n || |K_ij| * |x_ni| ||_F, (out, in)
    out_hw: int = 0                          # Conv2d output map size h * w

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def channel_abs(self) -> torch.Tensor:
        """Mean |input| per input channel (conv: over positions too), for the dead-unit check."""
        mean = self.mean_abs()
        return mean if mean.ndim == 1 else mean.flatten(1).sum(1)


def _kernel_slice_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """|K_ij| * |x_i| for every (sample, input channel i, filter j): (B, in, out, h, w), by one grouped conv."""
    weight = conv.weight.detach().abs()
    out_c, in_c = weight.shape[:2]
    grouped = weight.transpose(0, 1).reshape(in_c * out_c, 1, *weight.shape[2:])  # group i: |K_:,i|
    maps = F.conv2d(x.abs(), grouped, None, conv.stride, conv.padding, conv.dilation, groups=in_c)
    return maps.reshape(x.shape[0], in_c, out_c, *maps.shape[2:])


_CHUNK_ELEMENTS = 1 << 18  # 1 MB of float32


def _slice_norm_sums(conv: nn.Conv2d, x_abs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sum_n || |K_ij| * |x_ni| ||_F for every (filter j, input channel i): (out, in), float64.

    The paper's conv contribution (times N), without forming the (N, in, out, h, w) output maps:
    ||K * x||_F^2 = sum_{u,v} K_u K_v G_uv with G_uv = sum_p x[p + u] x[p + v], the Gram matrix of the
    channel's unfolded patches (kh*kw squared numbers per sample and channel, shared by all filters).
    Each sample's norm is computed in ``dtype`` (every term is non-negative: no cancellation, so float32
    stays within about 1e-7 of float64), their sum over samples in float64.
    """
    weight = conv.weight.detach().to("cpu", dtype).abs()
    x_abs = x_abs.to(dtype)
    out_c, in_c = weight.shape[:2]
    kk = weight.shape[2] * weight.shape[3]
    stride_one = conv.stride == (1, 1) and conv.dilation == (1, 1)
    u, v, twice = _row_pairs(*conv.kernel_size) if stride_one else _all_pairs(kk)
    k = weight.reshape(out_c, in_c, kk)
    pair_weight = (k[:, :, u] * k[:, :, v] * torch.where(twice, 2.0, 1.0).to(dtype)).permute(1, 2, 0)  # (in, P, out)
    total = torch.zeros(in_c, out_c, dtype=torch.float64)
    # chunks of samples whose copies (kw shifted maps, or kh*kw unfolded ones) are cache-sized
    copies = conv.kernel_size[1] if stride_one else kk
    per = max(1, _CHUNK_ELEMENTS // (in_c * copies * max(1, (x_abs.shape[-2] + 2) * x_abs.shape[-1])))
    for chunk in x_abs.split(per):
        gram = _row_gram(chunk, conv) if stride_one else _unfold_gram(chunk, conv)   # (b, in, P)
        squares = torch.bmm(gram.transpose(0, 1), pair_weight)                     # (in, b, out)
        total += squares.clamp_(min=0).sqrt_().sum(1)                            # into float64
    return total.T


def _all_pairs(kk: int):
    """(u, v, counted twice) of the entries :func:`_unfold_gram` returns: all kk*kk, each once."""
    u, v = torch.arange(kk).repeat_interleave(kk), torch.arange(kk).repeat(kk)
    return u, v, torch.zeros(kk * kk, dtype=torch.bool)


def _unfold_gram(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The Gram matrix of each (sample, channel)'s unfolded patches, flattened: (b, in, kk*kk)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    cols = cols.view(x.shape[0], x.shape[1], -1, cols.shape[-1])
    return (cols @ cols.transpose(-1, -2)).flatten(2)


def _row_pairs(kh: int, kw: int):
    """(u, v, counted twice) of the entries :func:`_row_gram` returns: the blocks (a, a') of kernel rows
    a <= a', each kw x kw in row-major order; a block off the diagonal stands for its mirror too."""
    a, a2 = torch.triu_indices(kh, kh)
    b, b2 = torch.arange(kw).repeat_interleave(kw), torch.arange(kw).repeat(kw)
    u = (a[:, None] * kw + b[None]).flatten()
    v = (a2[:, None] * kw + b2[None]).flatten()
    return u, v, (a != a2).repeat_interleave(kw * kw)


def _row_gram(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The Gram entries :func:`_row_pairs` names, for stride 1 and dilation 1, from kw column-shifted
    copies instead of kh*kw unfolded ones: the patch entries of kernel row a, for every output position,
    are rows a .. a + h_out - 1 of the padded map, a contiguous block of the copy, so block (a, a + d) of
    the Gram matrix is a matrix product of two views. Only the blocks (0, d) are full products; block
    (a, a + d) is block (a - 1, a - 1 + d) with one row's product left out and one taken in. (b, in, P)."""
    kh, kw = conv.kernel_size
    if conv.padding == "same":  # as torch pads it: the odd pixel after
        (top, bottom), (left, right) = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in (kh, kw)]
    else:
        (top, left) = (0, 0) if conv.padding == "valid" else conv.padding
        bottom, right = top, left
    b, c = x.shape[:2]
    padded = F.pad(x, (left, right, top, bottom))
    rows_in, w_out = padded.shape[-2], padded.shape[-1] - kw + 1
    h_out = rows_in - kh + 1
    shifted = torch.stack([padded[..., j:j + w_out] for j in range(kw)], 2).reshape(b * c, kw, rows_in * w_out)

    def product(first: int, second: int, count: int) -> torch.Tensor:
        """Rows first.. against rows second.., count of each: one kw x kw block per (sample, channel)."""
        return torch.bmm(shifted[:, :, first * w_out:(first + count) * w_out],
                         shifted[:, :, second * w_out:(second + count) * w_out].transpose(1, 2))

    blocks = {}
    for d in range(kh):
        blocks[0, d] = block = product(0, d, h_out)
        for a in range(1, kh - d):  # the window of rows moves down by one
            block = block - product(a - 1, a - 1 + d, 1) + product(a - 1 + h_out, a - 1 + h_out + d, 1)
            blocks[a, a + d] = block
    return torch.cat([blocks[a, a2] for a in range(kh) for a2 in range(a, kh)], 1).view(b, c, -1)


def _abs_nchw(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|x| in ``dtype`` and the contiguous NCHW layout the Gram blocks are views of, in one pass (a
    channels-last batch is transposed by the same kernel)."""
    return torch.abs(x.to(dtype), out=torch.empty(x.shape, dtype=dtype, device=x.device))


def _batch_sum(x: torch.Tensor) -> torch.Tensor:
    """x.sum(0) in float64; a channels-last batch summed in its own memory order (7x faster)."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).sum(0).permute(2, 0, 1).double()
    return x.sum(0).double()


def collect_activity(model: nn.Module, layers: Mapping[str, nn.Module], inputs: torch.Tensor, *,
                     conv_fro: bool, batch_size: int, hooks=(), precision: str = ReliefOptions.precision,
                     channels_last: bool = False) -> dict[str, LayerActivity]:
    """One eval-mode pass over ``inputs`` recording each layer's input activity (see LayerActivity).

    ``hooks``: handles of further hooks the caller registered for this pass (removed after it);
    ``precision``: the arithmetic of a conv's per-batch sums and slice norms (summed over batches in
    float64; Linear layers are float64 throughout); ``channels_last``: the pass in that layout (faster
    convolutions, the same sums up to float32 rounding; see ``hooks.takes_channels_last``)."""
    stats = {name: LayerActivity() for name in layers}
    dtype = PRECISION[precision]

    def hook(name):
        def record(module, args, output):
            s = stats[name]
            if isinstance(module, nn.Linear):  # cheap whatever the precision: float64
                x_abs = args[0].detach().abs()
                total = x_abs.reshape(-1, x_abs.shape[-1]).double().sum(0)
                s.count += x_abs.reshape(-1, x_abs.shape[-1]).shape[0]
            else:
                x_abs = _abs_nchw(args[0].detach(), dtype)
                total = x_abs.sum(0).double()
                s.count += x_abs.shape[0]
                hw = output.shape[-2] * output.shape[-1]
                if s.out_hw and hw != s.out_hw:  # one layer applied to maps of two sizes
                    raise PrunelabError(f"relief: conv layer {name!r} runs on inputs of different sizes, so its "
                                        "activity has no single shape to score")
                s.out_hw = hw
                if conv_fro:
                    with torch.no_grad():
                        norms = _slice_norm_sums(module, x_abs.cpu(), dtype)
                        s.conv_fro = norms if s.conv_fro is None else s.conv_fro + norms
            s.abs_sum = total if s.abs_sum is None else s.abs_sum + total
        return record

    with attention_slow_path():  # the fused inference path skips Linear.forward (and so the hooks)
        run_with_hooks(model, inputs, [*hooks, *(m.register_forward_hook(hook(n)) for n, m in layers.items())],
                       batch_size=batch_size, channels_last=channels_last)
    missed = [n for n, s in stats.items() if s.count == 0]
    if missed:
        more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
        raise PrunelabError(f"relief: layer {missed[0]!r}{more} did not run in the forward pass on the pruning "
                            "set, so its input activity cannot be measured")
    return stats


def _double(conv: nn.Conv2d) -> nn.Conv2d:
    """A float64 view of a conv's settings and |weights| for scoring (the module itself is untouched)."""
    twin = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, bias=False).to(torch.float64)
    twin.weight.data = conv.weight.detach().to("cpu", torch.float64)
    return twin


# --- scores ------------------------------------------------------------------------------------------

def contributions(module: nn.Module, activity: LayerActivity, conv_reduce: str = "fro"):
    """(c, c_b): mean contributions (units x inputs) and the bias contributions (or None), float64 CPU."""
    weight = module.weight.detach().to("cpu", torch.float64).abs()
    bias = None if module.bias is None else module.bias.detach().to("cpu", torch.float64).abs()
    mean = activity.mean_abs().cpu()
    if isinstance(module, nn.Linear):
        return weight * mean[None, :], bias
    hw = activity.out_hw
    if conv_reduce == "fro":
        contrib = activity.conv_fro / max(activity.count, 1)
        return contrib, None if bias is None else bias * math.sqrt(hw)
    maps = _kernel_slice_conv(_double(module), mean[None])[0]  # (in, out, h, w) of the mean input
    if conv_reduce == "fro_of_mean":
        contrib = maps.pow(2).sum((-2, -1)).sqrt().T
        return contrib, None if bias is None else bias * math.sqrt(hw)
    return maps.sum((-2, -1)).T, None if bias is None else bias * hw


def relief_scores(model: nn.Module, params, *, data, generator, alpha_fc=ReliefOptions.alpha_fc,
                  alpha_conv=ReliefOptions.alpha_conv, examples=ReliefOptions.examples,
                  conv_reduce=ReliefOptions.conv_reduce, batch_size=ReliefOptions.batch_size,
                  precision=ReliefOptions.precision, **_) -> dict[str, torch.Tensor]:
    """Each weight's share of its neuron's input activity (kernel slices share one score), for inspection.

    All layers are scored on one pass of the current network (no conv-then-fc ordering, no pruning)."""
    options = _check(alpha_fc=alpha_fc, alpha_conv=alpha_conv, examples=examples, conv_reduce=conv_reduce,
                     batch_size=batch_size, precision=precision)
    layers = _layers(model, params)
    inputs = pruning_set(data, options["examples"], generator)
    stats = collect_activity(model, layers, inputs, conv_fro=conv_reduce == "fro", batch_size=options["batch_size"],
                             precision=precision, channels_last=takes_channels_last(model, inputs))
    scores = {}
    for name, module in layers.items():
        contrib, bias = contributions(module, stats[name], conv_reduce)
        share = shares(contrib, bias)[:, :contrib.shape[1]]
        scores[f"{name}.weight" if name else "weight"] = _expand(share, module)
    return {n: scores[n] for n in params if n in scores}


# --- masks -------------------------------------------------------------------------------------------

@dataclass
class ReliefReport:
    """What one NNrelief step removed besides single connections."""

    dead_units: dict[str, int] = field(default_factory=dict)        # layer -> units removed as dead
    cleaned_units: dict[str, int] = field(default_factory=dict)     # layer -> units removed by the clean-up
    block_filters: dict[str, int] = field(default_factory=dict)     # conv2 -> filters removed (block rule)
    shortcut_candidates: dict[str, int] = field(default_factory=dict)  # shortcut channels the code would mask


def _layers(model: nn.Module, params) -> dict[str, nn.Module]:
    """The Linear / Conv2d modules whose weight is prunable and whose inputs a forward hook on the layer
    sees; anything else is refused, naming the layer and why, before any work.

    A layer called several times (one Linear applied twice) is scored on all its inputs together: a
    neuron's activity is the mean over every input it received."""
    modules = dict(model.named_modules())
    layers = {}
    for name in params:
        owner, _, local = name.rpartition(".")
        module = modules[owner]
        if local != "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
            continue  # biases are scored with their layer
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or local != "weight":
            raise PrunelabError(f"relief scores Linear and Conv2d layers; {name!r} belongs to a "
                                f"{type(module).__name__}")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise PrunelabError(f"relief: conv layer {owner!r} has groups={module.groups}, "
                                f"padding_mode={module.padding_mode!r}; only groups=1 with zero padding is supported")
        check_measurable("relief", model, owner, module, name)
        layers[owner] = module
    if not layers:
        raise PrunelabError("relief: the model has no prunable Linear or Conv2d layer")
    return layers


def _expand(per_slice: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A (out, in) table spread over a weight's shape (a conv kernel slice shares one value)."""
    shape = module.weight.shape
    return per_slice.reshape(*shape[:2], *([1] * (len(shape) - 2))).expand(shape).clone()


def _check(**options) -> dict:
    """PrunelabError for a bad option value; the options over the defaults."""
    return ReliefOptions.parse("relief", options).as_dict()


class _Masks:
    """The masks being built: start from ``alive`` (pruned stays pruned), record what changes."""

    def __init__(self, model: nn.Module, alive: Mapping[str, torch.Tensor] | None):
        self.params = dict(model.named_parameters())
        first: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):  # an alias maps to the first name
            first.setdefault(id(p), n)
        self.canonical = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
        self.alive = alive or {}
        self.masks: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        name = self.canonical.get(name, name)
        if name not in self.masks:
            base = self.alive.get(name)
            self.masks[name] = (base.detach().to("cpu", torch.bool).clone() if base is not None
                                else torch.ones(self.params[name].shape, dtype=torch.bool))
        return self.masks[name]

    def merge(self, update: Mapping[str, torch.Tensor]) -> None:
        for name, mask in update.items():
            name = self.canonical.get(name, name)
            self.masks[name] = self.get(name) & mask.to("cpu", torch.bool)

    def apply(self, model: nn.Module) -> None:
        """Zero the pruned entries now, so the next activity pass sees the pruned network."""
        masking.attach(model, dict(self.masks))


def _unit_groups(graph: structure.ChannelGraph, layers: Mapping[str, nn.Module]):
    """(group index, group) for every removable unit group: safe, read by someone, produced by a layer."""
    return [(g, group) for g, group in enumerate(graph.groups)
            if group.safe and not group.is_output and group.layers[0].module in layers]


def _dead_units(graph, layers, stats) -> dict[int, list[int]]:
    """Units whose output is exactly 0 on the pruning set: every reader sees zero input from them."""
    dead = {}
    for g, group in _unit_groups(graph, layers):
        readers = [s for s in group.consumers if s.kind in ("conv", "linear")]
        if not readers or any(s.module not in stats for s in readers):
            continue
        zero = None
        for s in readers:
            activity = stats[s.module].channel_abs() if s.kind == "conv" else stats[s.module].mean_abs()
            flags = torch.tensor([bool((activity[list(ix)] == 0).all()) for ix in s.index])
            zero = flags if zero is None else zero & flags
        units = torch.nonzero(zero).flatten().tolist()
        if units:
            dead[g] = units
    return dead


def _orphaned_units(graph, layers, masks: _Masks) -> dict[int, list[int]]:
    """Units still producing something whose outgoing connections are all pruned."""
    orphans = {}
    for g, group in _unit_groups(graph, layers):
        producer = group.layers[0]
        rows = masks.get(param_name(producer.module, "weight"))
        units = []
        for c in range(group.size):
            alive_in = any(bool(rows[i].any()) for i in producer.index[c])
            if not alive_in:
                continue
            outgoing = [masks.get(param_name(s.module, "weight"))[:, list(s.index[c])]
                        for s in group.consumers if s.kind in ("conv", "linear")]
            if outgoing and not any(bool(o.any()) for o in outgoing):
                units.append(c)
        if units:
            orphans[g] = units
    return orphans


def _block_sums(model, layers, dtype=torch.float64):
    """Hooks summing |bn2(conv2)| and |shortcut| of every basic block (the residual rule) over one pass,
    each batch in ``dtype`` and the batches in float64: (sums per block: [body, shortcut, count], handles)."""
    blocks = {name: m for name, m in model.named_modules()
              if all(hasattr(m, a) for a in ("conv2", "bn2", "shortcut")) and isinstance(m.conv2, nn.Conv2d)}
    blocks = {n: b for n, b in blocks.items() if param_name(n, "conv2") in layers}
    sums: dict[str, list] = {n: [None, None, 0] for n in blocks}

    def hook(name, slot):
        def record(module, args, output):
            total = _batch_sum(output.detach().to(dtype).abs())
            sums[name][slot] = total if sums[name][slot] is None else sums[name][slot] + total
            if slot == 0:
                sums[name][2] += output.shape[0]
        return record

    handles = [h for n, b in blocks.items()
               for h in (b.bn2.register_forward_hook(hook(n, 0)), b.shortcut.register_forward_hook(hook(n, 1)))]
    return sums, handles


def _block_rule(sums, alpha, masks: _Masks, report: ReliefReport) -> None:
    """conv2 filters of residual blocks whose output is small against the shortcut's (resnet_prune)."""
    bound = (1 - alpha) / alpha
    for name, (body, short, count) in sums.items():
        body_norm = (body / count).flatten(1).norm(dim=1)
        short_norm = (short / count).flatten(1).norm(dim=1)
        weak = torch.nonzero((body_norm < bound * short_norm) & (body_norm > 0)).flatten().tolist()
        report.shortcut_candidates[name] = int(((short_norm < bound * body_norm) & (short_norm > 0)).sum())
        if weak:
            conv2, bn2 = param_name(name, "conv2"), param_name(name, "bn2")
            masks.get(f"{conv2}.weight")[weak] = False
            for local in ("weight", "bias"):
                if f"{bn2}.{local}" in masks.params:
                    masks.get(f"{bn2}.{local}")[weak] = False
            report.block_filters[conv2] = len(weak)


def relief_masks(model: nn.Module, params, *, data, generator, alive=None, alpha_fc=ReliefOptions.alpha_fc,
                 alpha_conv=ReliefOptions.alpha_conv, examples=ReliefOptions.examples,
                 conv_reduce=ReliefOptions.conv_reduce, selection=ReliefOptions.selection,
                 remove_dead=ReliefOptions.remove_dead, cleanup=ReliefOptions.cleanup,
                 batch_size=ReliefOptions.batch_size,
                 precision=ReliefOptions.precision) -> tuple[dict[str, torch.Tensor], ReliefReport]:
    """One NNrelief pruning step (see module doc): masks for every touched parameter, and a report.

    The model's masks are updated as the step goes (dead units, then conv layers, then Linear layers),
    because the Linear layers are scored on the network after this step's conv pruning.
    """
    _check(alpha_fc=alpha_fc, alpha_conv=alpha_conv, examples=examples, conv_reduce=conv_reduce,
           selection=selection, batch_size=batch_size, precision=precision)
    layers = _layers(model, params)
    inputs = pruning_set(data, examples, generator)
    graph = structure.channel_graph(model, feed.to_model(model, feed.take(inputs, slice(0, 1))))
    masks, report = _Masks(model, alive), ReliefReport()
    convs = {n: m for n, m in layers.items() if isinstance(m, nn.Conv2d)}
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}

    fast = takes_channels_last(model, inputs)  # probed before any hook is registered
    # the residual rule reads the network before this step's conv pruning: the same pass as the scores
    block_sums, block_hooks = _block_sums(model, layers, PRECISION[precision]) if convs else ({}, [])
    stats = collect_activity(model, layers, inputs, conv_fro=conv_reduce == "fro" and bool(convs),
                             batch_size=batch_size, hooks=block_hooks, precision=precision, channels_last=fast)
    if remove_dead:
        dead = _dead_units(graph, layers, stats)
        masks.merge(structure.channel_masks(model, graph, dead))
        report.dead_units = {graph.groups[g].root: len(units) for g, units in dead.items()}

    def prune_layers(group: Mapping[str, nn.Module], activity, alpha):
        for name, module in group.items():
            contrib, bias = contributions(module, activity[name], conv_reduce)
            keep = keep_by_share(shares(contrib, bias), alpha, selection)
            update = {param_name(name, "weight"): _expand(keep[:, :contrib.shape[1]], module)}
            if bias is not None:
                update[param_name(name, "bias")] = keep[:, -1]
            masks.merge(update)

    if convs:
        prune_layers(convs, stats, alpha_conv)
        _block_rule(block_sums, alpha_conv, masks, report)
        masks.apply(model)
        stats = collect_activity(model, linears, inputs, conv_fro=False, batch_size=batch_size, channels_last=fast)
    prune_layers(linears, stats, alpha_fc)
    if cleanup:
        while True:
            orphans = _orphaned_units(graph, layers, masks)
            if not orphans:
                break
            masks.merge(structure.channel_masks(model, graph, orphans))
            for g, units in orphans.items():
                root = graph.groups[g].root
                report.cleaned_units[root] = report.cleaned_units.get(root, 0) + len(units)
    order = [n for n, _ in model.named_parameters() if n in masks.masks]
    return {n: masks.masks[n] for n in order}, report


def _pruner(model, params, *, sparsity, scope, alive, data, generator, **options):
    return relief_masks(model, params, data=data, generator=generator, alive=alive, **options)[0]


register(Method(
    "relief", "NNrelief: per-neuron cumulative share of input activity, iterative (Dekhovich et al. 2024)",
    relief_scores, scope="layer", needs_data=True, options=ReliefOptions, pruner=_pruner, structured=True,
    targets=(), schedule="iterative", layers=(nn.Linear, nn.Conv2d),
    paper="Dekhovich, Tax, Sluiter & Bessa, Machine Learning 2024 (arXiv 2109.10795), section 3"))
