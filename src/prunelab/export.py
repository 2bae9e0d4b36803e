"""Export pruned models for deployment: ONNX (checked with ONNX Runtime) or a ``torch.export`` program.

    report = prunelab.export.export(model, example, "model.onnx")           # format from the suffix
    print(report.line())   # path, size, max |ONNX - PyTorch|, latency ratio against the dense model

A masked model is exported with its masks folded in (a copy: ``copy_model`` + ``make_permanent``), so
the graph holds zeros in the weights and no mask multiplies; a compact model (``prunelab.compact``,
possibly with GatheredLinear/GatheredConv layers) is exported as it is. The exported file is run on the
example and compared with PyTorch: more than ``tolerance * max(1, max |output|)`` apart raises
PrunelabError. ONNX needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import masking
from .errors import PrunelabError

FORMATS = ("onnx", "torch")
ONNX_EXTRA = "onnx export needs the onnx extra: pip install 'prunelab[onnx]'"
TOLERANCE = 1e-4
_TWO_GB = 2 ** 31 - 2 ** 27  # ONNX protobuf limit, with room for the graph: larger weights go to a .data file


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured.

    ``max_abs_diff``: max |exported - PyTorch| over the outputs on the example (and, ONNX with a dynamic
    batch, a batch of another size); ``scale``: max(1, max |PyTorch output|), the tolerance's scale.
    ``latency_ms``: ONNX Runtime (one thread, batch of the example) median milliseconds of the exported
    model (``exported``) and of the dense reference (``dense``), measured in alternating rounds;
    ``ratio`` = exported / dense (below 1: the pruned model is faster). None when not measured.
    """

    path: str
    format: str
    bytes: int
    max_abs_diff: float
    tolerance: float
    scale: float
    exporter: str
    opset: int | None = None
    dynamic_batch: bool = False
    folded_masks: bool = False
    params: int = 0
    dense_params: int | None = None
    latency_ms: dict[str, float] | None = None
    ratio: float | None = None
    files: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line: path, size, the check, and the latency ratio if measured."""
        size = self.bytes / 2 ** 20
        text = f"wrote {self.path} ({self.format}, {size:.2f} MiB), max abs diff {self.max_abs_diff:.1e}"
        if self.ratio is not None:
            text += (f", onnxruntime latency {self.latency_ms['exported']:.3f} ms vs dense "
                     f"{self.latency_ms['dense']:.3f} ms ({self.ratio:.2f}x)")
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_onnx() -> None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise PrunelabError(ONNX_EXTRA) from None


def _inputs(example) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise PrunelabError("export needs an example tensor (or a tuple of tensors) the model accepts, got "
                            f"{type(example).__name__}")
    return inputs


def _outputs(value) -> list[torch.Tensor]:
    """The output tensors of a forward pass, flattened in order (a tensor, tuple/list, or dict)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _outputs(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return _outputs(value.to_tuple())
    raise PrunelabError(f"cannot compare a model output of type {type(value).__name__}")


def deployable(model: nn.Module) -> nn.Module:
    """An eval-mode copy with the masks folded into the weights (no mask multiplies; the model is untouched)."""
    clone = masking.copy_model(model)
    if masking.is_masked(clone):
        masking.make_permanent(clone)
    return clone.eval()


def _batched(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """The inputs with batch ``size`` (rows repeated cyclically)."""
    out = []
    for t in inputs:
        index = torch.arange(size, device=t.device) % t.shape[0]
        out.append(t.index_select(0, index))
    return tuple(out)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and log warnings (torchvision missing, deprecations): keep them off."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                              "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _onnx_file(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int | None,
               dynamic: bool) -> tuple[str, bool]:
    """Write ``model`` as ONNX; returns (exporter, dynamic batch). The torch.export-based exporter first
    (dynamic batch, then static), the TorchScript one as the fallback."""
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > _TWO_GB
    errors = []
    attempts = [("dynamo", True), ("dynamo", False)] if dynamic else [("dynamo", False)]
    attempts += [("torchscript", dynamic)]
    for exporter, batch in attempts:
        for stale in (path, Path(str(path) + ".data")):
            stale.unlink(missing_ok=True)
        trace_inputs = _batched(inputs, 2) if batch and inputs[0].shape[0] == 1 else inputs  # 1 specialises
        kwargs: dict[str, Any] = dict(input_names=names, output_names=None)
        if opset is not None:
            kwargs["opset_version"] = opset
        try:
            with _quiet(), torch.no_grad():
                if exporter == "dynamo":
                    if batch:
                        dim = torch.export.Dim("batch", min=1)
                        kwargs["dynamic_shapes"] = tuple({0: dim} for _ in trace_inputs)
                    torch.onnx.export(model, trace_inputs, str(path), dynamo=True, external_data=large,
                                      verbose=False, **kwargs)
                else:
                    if batch:
                        kwargs["dynamic_axes"] = {n: {0: "batch"} for n in names}
                    torch.onnx.export(model, trace_inputs, str(path), dynamo=False, **kwargs)
            return exporter, batch
        except Exception as error:  # noqa: BLE001 - every exporter failure is tried with the next one
            errors.append(f"{exporter}{' (dynamic batch)' if batch else ''}: {_first_line(error)}")
    raise PrunelabError("ONNX export failed: " + "; ".join(errors))


def _session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_session(session, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feed)]


def _max_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> tuple[float, float]:
    if len(ours) != len(theirs):
        raise PrunelabError(f"{what} gives {len(ours)} outputs, PyTorch {len(theirs)}")
    diff, scale = 0.0, 1.0
    for a, b in zip(ours, theirs):
        b = b.detach().cpu()
        if tuple(a.shape) != tuple(b.shape):
            raise PrunelabError(f"{what} output of shape {tuple(a.shape)}, PyTorch {tuple(b.shape)}")
        if a.is_floating_point() or b.is_floating_point():
            diff = max(diff, (a.double() - b.double()).abs().max().item() if a.numel() else 0.0)
            scale = max(scale, b.double().abs().max().item() if b.numel() else 0.0)
        elif not torch.equal(a, b.to(a.dtype)):
            diff = float("inf")
    return diff, scale


def _time_sessions(sessions: dict[str, Any], inputs: Sequence[torch.Tensor], rounds: int,
                   seconds: float) -> dict[str, float]:
    """Median milliseconds per run of each session, measured in alternating rounds (warm-up first)."""
    feeds = {k: {i.name: t.detach().cpu().numpy() for i, t in zip(s.get_inputs(), inputs)}
             for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    # repetitions per round: about seconds / (2 * rounds) of the slower model
    once = {}
    for k, s in sessions.items():
        start = time.perf_counter()
        s.run(None, feeds[k])
        once[k] = time.perf_counter() - start
    reps = max(1, int(seconds / (len(sessions) * rounds * max(max(once.values()), 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            for _ in range(reps):
                s.run(None, feeds[k])
            times[k].append((time.perf_counter() - start) / reps * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def export(model: nn.Module, example, path: str | os.PathLike, *, format: str | None = None,
           opset: int | None = None, dense: nn.Module | None = None, tolerance: float = TOLERANCE,
           dynamic_batch: bool = True, latency: bool = True, rounds: int = 7,
           latency_seconds: float = 1.0) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX (``format="onnx"``) or a ``torch.export`` program (``"torch"``,
    a .pt2 archive written by ``torch.export.save``; no pickle of the module) and check the file.

    ``example``: a batch the model accepts (a tensor or a tuple of tensors). ``format``: default from the
    suffix of ``path`` (.onnx, .pt2), else onnx. ``opset``: the ONNX opset (default: the exporter's).
    Masks are folded into a copy first; the model itself is not modified. The file is loaded back and run
    on the example (ONNX: with ONNX Runtime; with a dynamic batch also on a batch of another size); more than
    ``tolerance * max(1, max |output|)`` from PyTorch raises PrunelabError. ONNX with ``latency``: the
    exported model and ``dense`` (default: the model with its masks folded, the same graph) are timed in
    ONNX Runtime, one thread, alternating ``rounds``; ``report.ratio`` = exported / dense.
    """
    if format is None:
        format = "torch" if Path(path).suffix == ".pt2" else "onnx"
    if format not in FORMATS:
        raise PrunelabError(f"unknown export format {format!r}; formats: {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()
    inputs = _inputs(example)
    folded = deployable(model)
    was_masked = masking.is_masked(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = _outputs(folded(*inputs))
    params = sum(p.numel() for p in folded.parameters())
    dense_params = None if dense is None else sum(p.numel() for p in dense.parameters())
    if format == "torch":
        return _export_torch(folded, inputs, expected, path, tolerance, dynamic_batch, was_masked, params,
                             dense_params)
    exporter, dynamic = _onnx_file(folded, inputs, path, opset, dynamic_batch)
    session = _session(path)
    diff, scale = _max_diff(_run_session(session, inputs), expected, "ONNX Runtime")
    if dynamic:  # the batch dimension really is free: a batch of another size gives the same rows
        other = _batched(inputs, inputs[0].shape[0] + 2)
        with torch.no_grad():
            reference = _outputs(folded(*other))
        d, s = _max_diff(_run_session(session, other), reference, "ONNX Runtime")
        diff, scale = max(diff, d), max(scale, s)
    _check(diff, scale, tolerance, "ONNX Runtime")
    import onnx

    graph_opset = next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                        if o.domain in ("", "ai.onnx")), opset)
    files = [str(p) for p in (path, Path(str(path) + ".data")) if p.exists()]
    report = ExportReport(str(path), "onnx", sum(os.path.getsize(f) for f in files), diff, tolerance, scale,
                          exporter, graph_opset, dynamic, was_masked, params, dense_params, files=files)
    if latency:
        reference = deployable(dense) if dense is not None else folded
        with tempfile.TemporaryDirectory() as tmp:
            dense_path = Path(tmp) / "dense.onnx"
            _onnx_file(reference, inputs, dense_path, opset, False)
            times = _time_sessions({"exported": session, "dense": _session(dense_path)}, inputs, rounds,
                                   latency_seconds)
        report.latency_ms = times
        report.ratio = times["exported"] / times["dense"]
    return report


def _check(diff: float, scale: float, tolerance: float, what: str) -> None:
    if not diff <= tolerance * scale:
        raise PrunelabError(f"{what} outputs differ from PyTorch's by {diff:.3g} (tolerance {tolerance:g} x "
                            f"{scale:.3g}); the exported file is not trustworthy")


def _export_torch(folded: nn.Module, inputs, expected, path: Path, tolerance: float, dynamic_batch: bool,
                  was_masked: bool, params: int, dense_params: int | None) -> ExportReport:
    program, dynamic, errors = None, False, []
    for batch in ((True, False) if dynamic_batch else (False,)):
        trace_inputs = _batched(inputs, 2) if batch and inputs[0].shape[0] == 1 else inputs
        shapes = tuple({0: torch.export.Dim("batch", min=1)} for _ in inputs) if batch else None
        try:
            with _quiet(), torch.no_grad():
                program = torch.export.export(folded, trace_inputs, dynamic_shapes=shapes)
            dynamic = batch
            break
        except Exception as error:  # noqa: BLE001
            errors.append(f"{'dynamic' if batch else 'static'} batch: {_first_line(error)}")
    if program is None:
        raise PrunelabError("torch.export failed: " + "; ".join(errors))
    with _quiet():
        torch.export.save(program, str(path))
        loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        diff, scale = _max_diff(_outputs(loaded(*inputs)), expected, "the saved program")
    _check(diff, scale, tolerance, "the saved program's")
    return ExportReport(str(path), "torch", path.stat().st_size, diff, tolerance, scale, "torch.export", None,
                        dynamic, was_masked, params, dense_params, files=[str(path)])


def run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, nn.Module | None, torch.Tensor, str]:
    """The final model of a finished lab run folder, for :func:`export`: (model, dense reference or None,
    an example batch of one of the model's input shape, file stem). A run that made a compact model
    (``compact.safetensors``) gives it, with the masked model as the dense reference; otherwise the masked
    model (``model.safetensors``)."""
    from . import checkpoint
    from .data import dataset_info
    from .lab import state as run_state
    from .models import build_model, model_info
    from .structure import load_compact

    folder = Path(run_dir)
    if not (folder / "config.toml").is_file():
        raise PrunelabError(f"{folder} is not a run folder (no config.toml)")
    state_path = folder / "state.json"
    if not (folder / "result.json").is_file() or not (folder / "model.safetensors").is_file():
        raise PrunelabError(f"run {folder} is not finished (no result.json / model.safetensors): run it to the "
                            "end first")
    if state_path.is_file():
        run_state.verify(checkpoint.read_json(state_path, dict), folder, "model.safetensors")
    tensors, meta = checkpoint.load_tensors(folder / "model.safetensors")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise PrunelabError(f"{folder / 'model.safetensors'} names no model in its metadata (corrupt)")
    name = config["model"]
    try:
        info = model_info(name)
        dataset = config.get("dataset") or info.default_dataset
        model = build_model(name, num_classes=dataset_info(dataset).num_classes,
                            **(config.get("model_options") or {}))
    except (KeyError, TypeError) as error:
        raise PrunelabError(f"{folder}: cannot rebuild model {name!r}: {_first_line(error)}") from None
    checkpoint.restore_model(model, tensors)
    model.eval()
    example = torch.randn(1, *info.input_shape, generator=torch.Generator().manual_seed(0))
    if (folder / "compact.safetensors").is_file():
        return load_compact(folder / "compact.safetensors"), model, example, "compact"
    return model, None, example, "model"
