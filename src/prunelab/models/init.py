"""Weight initialisation schemes, as compared in SNIP (Lee et al., ICLR 2019, Table 3: RN, TN, VS-X, VS-H).

SNIP's saliency is computed at initialisation, so the scheme changes which weights survive.

Schemes (weights of Linear/Conv layers and RNN weight matrices; fan_in/fan_out as below):

* ``default``          PyTorch's own `reset_parameters` (Linear/Conv: kaiming-uniform with a=sqrt(5)).
* ``vs-h``             He et al. 2015: N(0, 2/fan_in) (= kaiming normal, not truncated).
* ``vs-x``             Glorot & Bengio 2010: N(0, 2/(fan_in+fan_out)) (= xavier normal, not truncated).
* ``vs``               TensorFlow 1.x `tf.variance_scaling_initializer()` defaults, used by the SNIP
                       code (`network.py`): scale 1, fan_in, normal truncated at 2 std, with the std
                       divided by 0.87962566... (the std of N(0,1) cut at +-2) so the result has
                       variance 1/fan_in, as TF does.
* ``normal`` (RN)      N(0, std^2), std = 0.1 by default. The paper does not state RN's std;
                       0.1 is our choice, set it with `std` (`init_std` in `build_model`).
* ``truncated-normal`` (TN) N(0, std^2) cut at +-2 std, std = 0.1 by default, *not* rescaled
                       (like `tf.truncated_normal_initializer`), so the empirical std is 0.88*std.

Non-default schemes set every bias of these layers to 0, unless ``bias="vs"``: then Linear and Conv
biases are drawn as the SNIP code draws them before pruning (`initializer_b_bp = vs`): TensorFlow's
variance scaling of a 1-D tensor of n entries (fan_in = n), i.e. ``vs`` with fan_in = n; RNN biases stay
0 (TensorFlow's LSTM cell starts its bias at 0). Normalisation layers (BatchNorm etc.) are reset to
weight 1, bias 0 and fresh running statistics. Other parameters are left as they are.

VS-H and VS-X here are the untruncated PyTorch forms; TensorFlow's `he_normal`/`glorot_normal`
are truncated (and rescaled). Use ``vs`` for the SNIP code's actual default.

RNN fans follow TensorFlow, whose cell keeps one kernel of shape (input+hidden, gates*hidden):
for both `weight_ih_lK` and `weight_hh_lK`, fan_in = input_size + hidden_size and
fan_out = gates * hidden_size. That is also the number of terms summed into each gate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PrunelabError, unknown

SCHEMES = ("default", "vs-h", "vs-x", "vs", "normal", "truncated-normal")
BIAS_SCHEMES = ("zeros", "vs")
_ALIASES = {"rn": "normal", "tn": "truncated-normal"}  # the names in SNIP's Table 3
_TF_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def resolve_scheme(scheme: str) -> str:
    """Canonical scheme name ('VS_H' -> 'vs-h', 'RN' -> 'normal'); PrunelabError if unknown."""
    key = scheme.strip().lower().replace("_", "-") if isinstance(scheme, str) else None
    key = _ALIASES.get(key, key)
    if key not in SCHEMES:
        raise unknown("init scheme", str(scheme), SCHEMES)
    return key


def check_bias(bias: str, scheme: str) -> None:
    """PrunelabError unless `bias` is a bias init that goes with the (resolved) weight `scheme`."""
    if bias not in BIAS_SCHEMES:
        raise unknown("init_bias", str(bias), BIAS_SCHEMES)
    if bias != "zeros" and scheme == "default":
        raise PrunelabError(f"init_bias {bias!r} needs a non-default init ('default' keeps PyTorch's biases)")


def uses_std(scheme: str) -> bool:
    return resolve_scheme(scheme) in ("normal", "truncated-normal")


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in/groups, *kernel) weight."""
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _fill(weight, scheme, fan_in, fan_out, generator, std):
    if scheme == "vs-h":
        nn.init.normal_(weight, 0.0, math.sqrt(2.0 / fan_in), generator=generator)
    elif scheme == "vs-x":
        nn.init.normal_(weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    elif scheme == "vs":
        s = math.sqrt(1.0 / fan_in) / _TF_TRUNC_STD
        nn.init.trunc_normal_(weight, 0.0, s, -2 * s, 2 * s, generator=generator)
    elif scheme == "normal":
        nn.init.normal_(weight, 0.0, std, generator=generator)
    elif scheme == "truncated-normal":
        nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std, generator=generator)
    else:  # resolve_scheme guards the public entry points
        raise AssertionError(scheme)


def _init_rnn(rnn: nn.RNNBase, scheme, generator, std):
    for name, p in rnn.named_parameters(recurse=False):
        if name.startswith("bias"):
            nn.init.zeros_(p)
        elif name.startswith("weight_ih") or name.startswith("weight_hh"):
            suffix = name.split("_", 2)[2]  # 'l0' or 'l0_reverse'
            ih = getattr(rnn, f"weight_ih_{suffix}")
            hh = getattr(rnn, f"weight_hh_{suffix}")
            _fill(p, scheme, ih.shape[1] + hh.shape[1], ih.shape[0], generator, std)
        else:  # weight_hr (LSTM projection): an ordinary matrix
            _fill(p, scheme, *_fans(p), generator, std)


@torch.no_grad()
def initialize(model: nn.Module, scheme: str, generator: torch.Generator | None = None,
               std: float = 0.1, bias: str = "zeros") -> nn.Module:
    """Re-initialise `model` in place with `scheme` (see the module docstring); returns it.

    generator: draws come from it (default: the global RNG). For "default", whose PyTorch code has
    no generator argument, a seed drawn from `generator` seeds a forked global RNG instead.
    std: the standard deviation of "normal" and "truncated-normal"; ignored by the others.
    bias: "zeros", or "vs" for the SNIP code's variance-scaled Linear/Conv biases (not with "default").
    """
    scheme = resolve_scheme(scheme)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not (0 < std < math.inf):
        raise PrunelabError(f"init std must be a positive number, got {std!r}")
    check_bias(bias, scheme)
    if scheme == "default":
        return _reset_default(model, generator)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            _fill(m.weight, scheme, *_fans(m.weight), generator, std)
            if m.bias is not None and bias == "vs":
                _fill(m.bias, "vs", m.bias.numel(), m.bias.numel(), generator, std)
            elif m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.RNNBase):
            _init_rnn(m, scheme, generator, std)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.reset_parameters()  # weight 1, bias 0 (and running statistics reset)
    return model


def _reset_default(model: nn.Module, generator):
    def reset():
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    if generator is None:
        reset()
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reset()
    return model
