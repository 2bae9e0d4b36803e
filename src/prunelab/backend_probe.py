"""Which channel counts the CPU backend runs efficiently: the step of a layer's latency in its width.

oneDNN's convolution kernels work on blocks of output channels (16 floats per AVX-512 register, 8 per
AVX2 one), so a conv with 17 output channels costs about as much as one with 32: latency is a
staircase in the channel count. :func:`probe` measures that staircase on this machine and finds its
step, the *channel multiple*; PFP's ``round_to="auto"`` (ours, not the paper's) rounds each layer's
channel budget to it, so that the multiply-adds PFP removes turn into time saved.

The probe times ``conv2d(x, w)`` with ``width`` input channels and c output channels (the side on
which the backend blocks; the next layer's input side grows about linearly in c and favours no
multiple) for c in ``5 .. 32``, at the model's kernel and feature-map size, batch 64, one thread,
channels-last by default (the setting of ``benchmarks/pfp_resnet56_speed.py``). Each c is timed
``repeats`` times, interleaved with the other counts, and its fastest time is kept (the other jobs of a
shared machine only ever add time). A candidate multiple g in (2, 4, 8, 16) is accepted when rounding
the counts in the lower half of a g-block up to the next multiple of g costs, at the median, under a
quarter of what the added multiply-adds would (a staircase of step >= g costs nothing there, one of step
g/2 at least a third of that share, a linear cost all of it; :func:`choose_multiple`); the largest
accepted g wins, 1 when none is. A Linear layer is probed the same way with ``F.linear`` on a
(batch, width) input.

:func:`layer_latency` times one Conv/Linear layer's product at its own full shape (same batch, thread
and layout), for PFP's ``allocation="latency"``.

The result is cached per process and shape. :func:`set_channel_multiple` or the environment variable
``PRUNELAB_CHANNEL_MULTIPLE`` overrides it (no timing at all), e.g. to reproduce a result measured on
another machine, or in tests.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import PrunelabError

CANDIDATES = (2, 4, 8, 16)
ENV = "PRUNELAB_CHANNEL_MULTIPLE"

_CACHE: dict[tuple, "ProbeResult"] = {}
_LATENCY: dict[tuple, float] = {}
_OVERRIDE: int | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe` measured and decided."""

    multiple: int                                      # the step: 1, or one of CANDIDATES
    shape: dict                                        # kind, width, size, kernel, batch, threads, layout
    channels: list[int] = field(default_factory=list)  # the c probed
    ms: list[float] = field(default_factory=list)      # fastest time of each c
    excess: dict[int, float] = field(default_factory=dict)    # g -> median time added by rounding up to g
    expected: dict[int, float] = field(default_factory=dict)  # g -> median multiply-adds added by it
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"multiple": self.multiple, "shape": self.shape, "channels": self.channels,
                "ms": [round(t, 4) for t in self.ms], "excess": self.excess, "expected": self.expected,
                "seconds": self.seconds}


def _check_multiple(value, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or (isinstance(value, float) and value != n) or isinstance(value, bool):
        raise PrunelabError(f"{where} must be a positive integer, got {value!r}")
    return n


def set_channel_multiple(multiple: int | None) -> None:
    """Use ``multiple`` instead of probing (None: probe again, the cache kept)."""
    global _OVERRIDE
    _OVERRIDE = None if multiple is None else _check_multiple(multiple, "channel multiple")


def clear_cache() -> None:
    _CACHE.clear()
    _LATENCY.clear()


def results() -> list[ProbeResult]:
    """The probes measured in this process (for reports)."""
    return list(_CACHE.values())


def probe(kind: str = "conv2d", *, width: int = 32, size: int = 16, kernel: int = 3, batch: int = 64,
          threads: int = 1, channels_last: bool = True, repeats: int = 7) -> ProbeResult:
    """Measure the latency staircase of one layer shape (cached per process; see the module docstring)."""
    if kind not in ("conv2d", "linear"):
        raise PrunelabError(f"backend probe kind must be 'conv2d' or 'linear', got {kind!r}")
    key = (kind, width, size, kernel, batch, threads, channels_last, repeats)
    if key in _CACHE:
        return _CACHE[key]
    started = time.perf_counter()
    channels = list(range(max(CANDIDATES) // 4 + 1, 2 * max(CANDIDATES) + 1))
    generator = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            if kind == "conv2d":
                x = torch.randn(batch, width, size, size, generator=generator)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                calls = {}
                for c in channels:
                    w = torch.randn(c, width, kernel, kernel, generator=generator)
                    if channels_last:
                        w = w.contiguous(memory_format=torch.channels_last)
                    calls[c] = (lambda w=w: F.conv2d(x, w, padding=kernel // 2))
                number = 1
            else:
                x = torch.randn(batch, width, generator=generator)
                calls = {c: (lambda w=torch.randn(c, width, generator=generator): F.linear(x, w))
                         for c in channels}
                number = 200  # one product takes microseconds: time many per measurement

            def run(c):
                for _ in range(number):
                    calls[c]()

            best = {c: math.inf for c in channels}
            for c in channels:  # warm-up: oneDNN builds a kernel per shape on first use
                run(c)
            for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every c alike
                for c in channels:
                    started_c = time.perf_counter()
                    run(c)
                    best[c] = min(best[c], time.perf_counter() - started_c)
    finally:
        torch.set_num_threads(previous)
    multiple, excess, expected = choose_multiple(channels, [best[c] for c in channels])
    shape = {"kind": kind, "width": width, "size": size, "kernel": kernel, "batch": batch, "threads": threads,
             "channels_last": channels_last}
    result = ProbeResult(multiple, shape, channels, [best[c] * 1e3 / number for c in channels], excess,
                         expected, time.perf_counter() - started)
    _CACHE[key] = result
    return result


def choose_multiple(channels: list[int], times: list[float]) -> tuple[int, dict, dict]:
    """The step of a latency staircase from the times of ``channels``; also, for each candidate g, the
    median time and the median multiply-adds (fractions) added by rounding a count up to a multiple of g.

    Only counts in the lower half of a g-block are rounded (c mod g in 1..g/2): on a staircase of step s
    they stay in their s-block when g <= s (no time added) and cross into the next one when g = 2s (at
    least a third of the multiply-adds' share). g is accepted when the time added is under a quarter of
    the multiply-adds added; the largest accepted g wins, 1 when none is."""
    best = dict(zip(channels, times))
    excess, expected = {}, {}
    multiple = 1
    for g in CANDIDATES:
        pairs = [(c, g * math.ceil(c / g)) for c in channels if 0 < c % g <= g // 2 and g * math.ceil(c / g) in best]
        excess[g] = round(_median([best[up] / best[c] - 1.0 for c, up in pairs]), 4)
        expected[g] = round(_median([up / c - 1.0 for c, up in pairs]), 4)
        if pairs and excess[g] <= 0.25 * expected[g]:
            multiple = g
    return multiple, excess, expected


def layer_latency(module: torch.nn.Module, input_shape: tuple, *, batch: int = 64, threads: int = 1,
                  channels_last: bool = True, repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed calls (ms) of a Conv1d/Conv2d/Linear layer's product at its full width
    on a (batch, *input_shape) input; the module's own forward and hooks (masks) are bypassed. Cached per
    process by shape, so equal layers are timed once; 0.0 for other module types."""
    conv2d = isinstance(module, torch.nn.Conv2d)
    if not isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
        return 0.0
    w = module.weight.detach()
    settings = ((module.stride, module.padding, module.dilation, module.groups)
                if not isinstance(module, torch.nn.Linear) else ())
    key = ("layer", type(module).__name__, tuple(w.shape), settings, tuple(input_shape), batch, threads,
           channels_last and conv2d, repeats)
    if key in _LATENCY:
        return _LATENCY[key]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=generator)
    w = torch.randn(w.shape, generator=generator)
    if conv2d and channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    if isinstance(module, torch.nn.Linear):
        call = lambda: F.linear(x, w)  # noqa: E731
    else:
        op = F.conv2d if conv2d else F.conv1d
        call = lambda: op(x, w, None, *settings)  # noqa: E731
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            call()  # warm-up
            best = math.inf
            for _ in range(repeats):
                started = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    _LATENCY[key] = best * 1e3
    return _LATENCY[key]


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    if not n:
        return 0.0
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def channel_multiple(kind: str = "conv2d", **shape) -> int:
    """The channel multiple for ``round_to="auto"``: the override, else ``PRUNELAB_CHANNEL_MULTIPLE``,
    else :func:`probe` ``(kind, **shape).multiple``."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    env = os.environ.get(ENV, "").strip()
    if env:
        return _check_multiple(env if not env.isdigit() else int(env), f"environment variable {ENV}")
    return probe(kind, **shape).multiple
