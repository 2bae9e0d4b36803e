"""Sparse inference where it pays: masked ``nn.Linear`` layers replaced by a CSR kernel only where measured faster.

:func:`sparsify` runs one forward pass of an example to learn each layer's input shape, then for every
masked ``nn.Linear`` times the dense ``F.linear`` against ``torch.addmm`` with the weight in CSR form on
an input of that shape, alternating the two over rounds (so that load on the machine hits both alike)
and taking medians. A layer is replaced by :class:`SparseLinear` only when the sparse kernel is faster
by ``margin`` (1.1x by default); the rest stay dense, so the result is never slower than the masked
model beyond timing noise. The choice holds for the batch size, thread count and machine measured on.
The whole model's outputs are then checked against the masked model's.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import masking
from .errors import PrunelabError

MODES = ("auto", "sparse", "dense")


def _csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return weight.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in CSR form (inference only: no gradient to the weight).

    Built from a (masked) ``nn.Linear`` by :meth:`from_linear`; outputs equal the masked layer's up to
    float rounding (a different order of summation)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight_csr = _csr(weight)
        self.register_buffer("bias_column", None if bias is None else bias.detach().reshape(-1, 1).clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "SparseLinear":
        weight = layer.weight.detach()
        mask = getattr(layer, "weight" + masking.MASK_SUFFIX, None)
        if mask is not None:
            weight = weight * mask.to(weight.dtype)
        return cls(weight, layer.bias)

    def _apply(self, fn, recurse=True):  # .to(device/dtype) also moves the CSR weight
        super()._apply(fn, recurse)
        self.weight_csr = fn(self.weight_csr)
        return self

    @property
    def nnz(self) -> int:
        return int(self.weight_csr.values().numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.bias_column is None:
            out = torch.mm(self.weight_csr, flat.T)
        else:
            out = torch.addmm(self.bias_column, self.weight_csr, flat.T)
        return out.T.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        total = self.in_features * self.out_features
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_column is not None}, density={self.nnz / max(total, 1):.4f}")


@dataclass
class SparsifyReport:
    """Per masked Linear: shape, sparsity, the input measured on, median dense and sparse times
    (microseconds per call), speedup (dense / sparse) and the choice ("sparse" or "dense") with why."""
    layers: list[dict[str, Any]] = field(default_factory=list)
    threads: int = 1
    rounds: int = 0
    margin: float = 1.1
    mode: str = "auto"
    max_abs_diff: float = 0.0
    tolerance: float = 0.0

    @property
    def replaced(self) -> list[str]:
        return [layer["name"] for layer in self.layers if layer["choice"] == "sparse"]

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "threads": self.threads, "rounds": self.rounds, "margin": self.margin,
                "mode": self.mode, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "replaced": self.replaced}

    def __str__(self) -> str:
        lines = [f"{'layer':<24} {'shape':>12} {'input':>12} {'sparsity':>8} {'dense us':>9} "
                 f"{'sparse us':>9} {'speedup':>7}  choice"]
        for layer in self.layers:
            def us(v):
                return f"{v:9.1f}" if v is not None else f"{'-':>9}"
            speed = f"{layer['speedup']:7.2f}" if layer["speedup"] is not None else f"{'-':>7}"
            lines.append(f"{layer['name']:<24} {'x'.join(map(str, layer['shape'])):>12} "
                         f"{'x'.join(map(str, layer['input'])):>12} {layer['sparsity']:8.3f} "
                         f"{us(layer['dense_us'])} {us(layer['sparse_us'])} {speed}  "
                         f"{layer['choice']} ({layer['reason']})")
        lines.append(f"threads={self.threads} rounds={self.rounds} margin={self.margin} "
                     f"max_abs_diff={self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})")
        return "\n".join(lines)


def _run(model: nn.Module, example):
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _outputs(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    return []


def _calls_per_sample(fn, target_s: float = 0.002) -> int:
    """How many calls make one timed sample last about ``target_s`` (timer resolution, call overhead)."""
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, int(target_s / once)))


def time_alternating(contenders: dict[str, Any], rounds: int, target_s: float = 0.002) -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternating rounds (order reversed every
    other round) so that a change of load on the machine hits all alike."""
    for fn in contenders.values():  # warm up (allocator, MKL handles)
        fn(), fn()
    reps = {name: _calls_per_sample(fn, target_s) for name, fn in contenders.items()}
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for index in range(rounds):
        for name in (order if index % 2 == 0 else order[::-1]):
            fn, n = contenders[name], reps[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(values) for name, values in samples.items()}


@torch.no_grad()
def sparsify(model: nn.Module, example, *, threads: int | None = None, rounds: int = 15,
             margin: float = 1.1, mode: str = "auto", tolerance: float = 1e-5
             ) -> tuple[nn.Module, SparsifyReport]:
    """An inference copy of ``model`` (eval mode; masks made permanent: pruned weights zero, no mask
    hooks) with each masked ``nn.Linear`` replaced by :class:`SparseLinear`
    where the CSR kernel measured at least ``margin`` times faster than dense on the layer's input from
    one pass of ``example`` (a tensor, a tuple of positional inputs or a dict of keyword inputs).

    ``threads``: the torch thread count to measure with (default: the current one; restored after).
    ``mode``: "auto" (measure), "sparse" (replace every masked Linear that has pruned weights, still
    timed for the report), "dense" (replace none). A layer with no pruned weight is never replaced.
    The copy's outputs on ``example`` must match the masked model's within ``tolerance * max(1, |out|)``,
    else PrunelabError. Returns ``(copy, report)``; ``model`` is left as it was.
    """
    if mode not in MODES:
        raise PrunelabError(f"unknown mode {mode!r}; choose from: {', '.join(MODES)}")
    if rounds < 1:
        raise PrunelabError(f"rounds must be at least 1, got {rounds}")
    if threads is not None and threads < 1:
        raise PrunelabError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _sparsify(model, example, rounds, margin, mode, tolerance)
    finally:
        torch.set_num_threads(previous)


def _sparsify(model, example, rounds, margin, mode, tolerance):
    reference = copy.deepcopy(model).eval()
    inputs: dict[str, torch.Tensor] = {}
    linears = {name: module for name, module in reference.named_modules()
               if type(module) is nn.Linear and hasattr(module, "weight" + masking.MASK_SUFFIX)}
    handles = [module.register_forward_pre_hook(
        lambda mod, args, name=name: inputs.setdefault(name, args[0].detach().clone()))
        for name, module in linears.items()]
    try:
        expected = _outputs(_run(reference, example))
    finally:
        for handle in handles:
            handle.remove()
    if not expected:
        raise PrunelabError("the model's output on the example holds no tensor to check against")

    result = copy.deepcopy(reference)
    masking.make_permanent(result)  # an inference copy: zeros for good, no mask hooks left to run
    report = SparsifyReport(threads=torch.get_num_threads(), rounds=rounds, margin=margin, mode=mode,
                            tolerance=tolerance)
    for name, layer in linears.items():
        mask = getattr(layer, "weight" + masking.MASK_SUFFIX)
        sparsity = 1.0 - float(mask.sum()) / max(mask.numel(), 1)
        entry: dict[str, Any] = {"name": name, "shape": list(layer.weight.shape), "sparsity": round(sparsity, 6),
                                 "input": [], "dense_us": None, "sparse_us": None, "speedup": None}
        report.layers.append(entry)
        if name not in inputs:
            entry.update(choice="dense", reason="not called by the example")
            continue
        x = inputs[name].reshape(-1, layer.in_features)
        entry["input"] = list(x.shape)
        if sparsity == 0.0:
            entry.update(choice="dense", reason="no pruned weight")
            continue
        weight = (layer.weight * mask.to(layer.weight.dtype)).detach()
        bias = layer.bias
        try:
            candidate = SparseLinear(weight, bias)
            candidate(x)
        except (RuntimeError, NotImplementedError) as error:
            entry.update(choice="dense", reason=f"no sparse kernel: {str(error).splitlines()[0][:80]}")
            continue
        times = time_alternating({"dense": lambda: F.linear(x, weight, bias), "sparse": lambda: candidate(x)},
                                 rounds)
        speedup = times["dense"] / times["sparse"]
        entry.update(dense_us=round(times["dense"] * 1e6, 3), sparse_us=round(times["sparse"] * 1e6, 3),
                     speedup=round(speedup, 3))
        if mode == "dense":
            entry.update(choice="dense", reason="mode=dense")
        elif mode == "sparse":
            entry.update(choice="sparse", reason="mode=sparse")
        elif speedup >= margin:
            entry.update(choice="sparse", reason=f"faster by >= {margin}x")
        else:
            entry.update(choice="dense", reason=f"sparse not faster by {margin}x")
        if entry["choice"] == "sparse":
            if not name:  # the model is itself one Linear
                result = SparseLinear.from_linear(result)
                continue
            parent_name, _, local = name.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            setattr(parent, local, SparseLinear.from_linear(getattr(parent, local)))

    got = _outputs(_run(result, example))
    if len(got) != len(expected):
        raise PrunelabError("the sparse model's output differs in structure from the masked model's")
    worst, scale = 0.0, 1.0
    for a, b in zip(expected, got):
        if a.shape != b.shape:
            raise PrunelabError(f"the sparse model's output has shape {tuple(b.shape)}, "
                                f"the masked model's {tuple(a.shape)}")
        if a.is_floating_point() or a.is_complex():
            worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
            scale = max(scale, float(a.abs().max()) if a.numel() else 0.0)
        elif not torch.equal(a, b):
            raise PrunelabError("the sparse model's integer output differs from the masked model's")
    report.max_abs_diff = worst
    if not worst <= tolerance * scale:
        raise PrunelabError(f"the sparse model's outputs differ from the masked model's by {worst:.3g} "
                            f"(allowed {tolerance * scale:.3g}); keep the dense model")
    return result, report
