"""Plots of runs: test error against compression ratio along a run's pruning trajectory.

Reads ``result.json`` of a finished run, or ``state.json`` of one still going, and writes a PNG
atomically. Matplotlib is used through its Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import io
from pathlib import Path

from ..checkpoint import atomic_write, output_file, read_json
from ..errors import PrunelabError


def trajectory(run_dir: str | Path) -> list[dict]:
    """The pruning phases of a run that record a compression ratio and a test error."""
    run_dir = Path(run_dir)
    source = run_dir / "result.json" if (run_dir / "result.json").exists() else run_dir / "state.json"
    if not source.exists():
        raise PrunelabError(f"{run_dir} is not a run folder (no result.json or state.json)")
    phases = [p for p in read_json(source, dict).get("prune_events", [])
              if "compression_ratio" in p and p.get("test_error") is not None]
    if not phases:
        raise PrunelabError(f"{source} records no pruning phase with a compression ratio and a test error")
    return phases


def plot_trajectory(run_dirs: list[str | Path], out: str | Path, references: list[dict] | None = None) -> Path:
    """Test error (%) against compression ratio (log scale), one line per run, optional reference points
    (``{"label", "compression_ratio", "test_error"}``, e.g. a paper's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    out = output_file(out, ".png")  # checked before any work
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for run_dir in run_dirs:
        phases = trajectory(run_dir)
        axes.plot([p["compression_ratio"] for p in phases], [100 * p["test_error"] for p in phases],
                  marker="o", markersize=3, label=Path(run_dir).name)
    for ref in references or []:
        axes.scatter([ref["compression_ratio"]], [100 * ref["test_error"]], marker="*", s=120, zorder=3,
                     label=ref.get("label", "reference"))
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("compression ratio (all parameters / non-zero)")
    axes.set_ylabel("test error (%)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(out, buffer.getvalue())
    return Path(out)
