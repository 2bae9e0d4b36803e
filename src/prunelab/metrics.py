"""What a pruned model is and what it costs: parameters, sparsity, FLOPs, latency.

Vocabulary (design.md section 2):

- ``sparsity``: fraction of the prunable weights that the masks remove.
- ``sparsity_all``: fraction of all parameters that are zero (masked or not).
- ``compression_ratio``: all parameters / non-zero parameters (LOBSTER's figure).
- ``flops.dense``: multiply-adds x 2 of one forward pass of one example, counted by
  ``torch.utils.flop_counter`` (recurrent layers, which it does not count, by their closed form).
- ``flops.effective``: the same with every layer's count scaled by the fraction of its weights that
  survive: what a sparse kernel would have to do. Unstructured masks do not make dense kernels faster.
- ``latency_ms``: median CPU time of one forward pass; ``compare_latency`` / ``structured_metrics`` set a
  compact model (``prunelab.structure.compact``) against its dense architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import masking
from .errors import PrunelabError


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total, non-zero, prunable and kept-prunable parameter counts (masked weights count as zero)."""
    masks = masking.masks(model)
    prunable = masking.prunable_parameters(model)
    total = nonzero = 0
    for name, param in model.named_parameters():
        total += param.numel()
        values = param.detach()
        if name in masks:
            values = values * masks[name]
        nonzero += int(torch.count_nonzero(values))
    prunable_total = sum(p.numel() for p in prunable.values())
    prunable_kept = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in prunable.items())
    return {"total": total, "nonzero": nonzero, "prunable": prunable_total, "prunable_kept": prunable_kept}


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    counts = parameter_counts(model)
    return {
        "params": counts,
        "sparsity": 1.0 - counts["prunable_kept"] / counts["prunable"] if counts["prunable"] else 0.0,
        "sparsity_all": 1.0 - counts["nonzero"] / counts["total"],
        "compression_ratio": counts["total"] / max(counts["nonzero"], 1),
    }


def alive_units(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{layer: {"alive": n, "total": m}}``: output units (neurons, filters) of each Linear / Conv2d with
    at least one surviving incoming weight, as NNrelief counts "remaining neurons"."""
    masks = masking.masks(model)
    units = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            weight = module.weight.detach()
            key = f"{name}.weight" if name else "weight"
            if key in masks:
                weight = weight * masks[key]
            rows = weight.reshape(weight.shape[0], -1)
            units[name] = {"alive": int((rows != 0).any(1).sum()), "total": rows.shape[0]}
    return units


def layer_table(model: nn.Module, flops: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per prunable parameter: name, shape, params, non-zero (kept by its mask), sparsity."""
    masks = masking.masks(model)
    rows = []
    for name, param in masking.prunable_parameters(model).items():
        kept = int(masks[name].sum()) if name in masks else param.numel()
        row = {"name": name, "shape": list(param.shape), "params": param.numel(), "nonzero": kept,
               "sparsity": 1.0 - kept / param.numel()}
        if flops is not None:
            row["flops"] = flops.get(name.rpartition(".")[0], 0)
        rows.append(row)
    return rows


@torch.no_grad()
def module_flops(model: nn.Module, example: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass on ``example``: the total and ``{module name: flops}``.

    Convolutions, matrix products and the rest come from ``FlopCounterMode``; recurrent layers, which
    it counts as zero on the CPU, are counted as 2 x steps x gates x hidden x (input + hidden).
    """
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    recurrent: dict[str, int] = {}
    hooks = [module.register_forward_hook(_recurrent_counter(name, recurrent))
             for name, module in model.named_modules() if isinstance(module, nn.RNNBase)]
    try:
        with counter:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    root = type(model).__name__
    per_module = {}
    for key, counts in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            per_module[key[len(root) + 1:]] = int(sum(counts.values()))
    per_module.update(recurrent)
    return int(counter.get_total_flops()) + sum(recurrent.values()), per_module


def _recurrent_counter(name: str, sink: dict[str, int]):
    gates = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}

    def hook(module: nn.RNNBase, inputs, _output):
        x = inputs[0]
        steps = x.shape[1] if module.batch_first else x.shape[0]
        batch = x.shape[0] if module.batch_first else (x.shape[1] if x.dim() == 3 else 1)
        per_step = 0
        for layer in range(module.num_layers):
            width = module.input_size if layer == 0 else module.hidden_size * (2 if module.bidirectional else 1)
            per_step += gates[module.mode] * module.hidden_size * (width + module.hidden_size)
        sink[name] = 2 * batch * steps * per_step * (2 if module.bidirectional else 1)

    return hook


def flop_summary(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], dict[str, int]]:
    """Dense and effective FLOPs of one example, and the per-module dense counts."""
    total, per_module = module_flops(model, example[:1])
    masks = masking.masks(model)
    saved = 0.0
    for module_name, flops in per_module.items():
        # A layer's multiply-adds scale with its weights; several tensors (LSTM) weigh by size.
        own = [mask for name, mask in masks.items() if name.rpartition(".")[0] == module_name]
        if own:
            density = sum(int(m.sum()) for m in own) / sum(m.numel() for m in own)
            saved += flops * (1.0 - density)
    effective = int(round(total - saved))
    return {"dense": total, "effective": effective, "reduction": total / max(effective, 1)}, per_module


def latency_ms(model: nn.Module, example: torch.Tensor, threads: int = 1, min_run_time: float = 0.3) -> float:
    """Median CPU inference latency of ``model(example)`` in milliseconds (torch.utils.benchmark)."""
    from torch.utils.benchmark import Timer

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            timer = Timer(stmt="model(x)", globals={"model": model, "x": example}, num_threads=threads)
            return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3
    finally:
        model.train(was_training)


def structured_metrics(dense: nn.Module, small: nn.Module, example: torch.Tensor, *, threads: int = 1,
                       latency: bool = True, min_run_time: float = 0.3,
                       channels_last: bool = False) -> dict[str, Any]:
    """PR, FR and measured CPU latency of a compact model against the dense architecture.

    * ``pr`` = 1 - params(small) / params(dense), over all parameters (PFP's prune ratio of the
      physically smaller model); ``pr_nonzero`` counts the small model's non-zero parameters instead
      (masks still inside the small model count as zero).
    * ``fr`` = 1 - FLOPs(small) / FLOPs(dense), one example, ``module_flops``.
    * ``latency_ms``: ``latency_ms`` on ``example`` (its batch size) with ``threads`` threads, for
      both models without mask hooks, in three alternating rounds; the median round of each is reported.
      ``channels_last=True`` times both in the channels-last layout (see ``compare_latency``).
    """
    p_dense = sum(p.numel() for p in dense.parameters())
    p_small = sum(p.numel() for p in small.parameters())
    nnz_small = parameter_counts(small)["nonzero"]
    f_dense, _ = module_flops(dense, example[:1])
    f_small, _ = module_flops(small, example[:1])
    result = {
        "params": {"dense": p_dense, "small": p_small, "small_nonzero": nnz_small},
        "pr": 1.0 - p_small / p_dense,
        "pr_nonzero": 1.0 - nnz_small / p_dense,
        "flops": {"dense": f_dense, "small": f_small},
        "fr": 1.0 - f_small / max(f_dense, 1),
        "latency_ms": None,
    }
    if latency:
        result["latency_ms"] = compare_latency(dense, small, example, threads=threads, min_run_time=min_run_time,
                                               channels_last=channels_last)
    return result


def compare_latency(dense: nn.Module, small: nn.Module, example: torch.Tensor, *, threads: int = 1,
                    min_run_time: float = 0.3, channels_last: bool = False) -> dict[str, Any]:
    """Median CPU latency (ms) of two models on ``example`` (its batch size), and the speed-up dense/small.

    Both run without mask hooks, alternating over three rounds so that a slow spell of a shared machine
    hits both; the median round of each is reported. ``channels_last=True`` times both in the
    channels-last layout (image inputs only), which oneDNN runs faster on many CPUs than the default
    one, most of all for channel counts that are not a multiple of 8 or 16.
    """
    plain_dense, plain_small = masking.copy_model(dense), masking.copy_model(small)
    masking.make_permanent(plain_dense)
    masking.make_permanent(plain_small)
    if channels_last:
        if example.dim() != 4:
            raise PrunelabError("channels_last timing needs an image batch (N, C, H, W)")
        plain_dense = plain_dense.to(memory_format=torch.channels_last)
        plain_small = plain_small.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    rounds = [(latency_ms(plain_dense, example, threads=threads, min_run_time=min_run_time / 3),
               latency_ms(plain_small, example, threads=threads, min_run_time=min_run_time / 3))
              for _ in range(3)]
    dense_ms = sorted(r[0] for r in rounds)[1]
    small_ms = sorted(r[1] for r in rounds)[1]
    return {"dense": dense_ms, "small": small_ms, "speedup": dense_ms / small_ms if small_ms else None,
            "batch": int(example.shape[0]), "threads": threads,
            "layout": "channels_last" if channels_last else "contiguous", "rounds": [list(r) for r in rounds]}
