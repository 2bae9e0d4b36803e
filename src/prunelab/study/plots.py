"""A study's plots (PNG, matplotlib's Agg canvas, written atomically): test error against sparsity,
effective sparsity, compression ratio and multiply-add (FLOP) reduction, one line per method with a
mean +- std band over seeds, the dense control as a band across the plot, the papers' numbers as stars.

Baselines (random, magnitude) are dashed; a method's sanity checks share its colour (shuffle dotted,
reinit dash-dotted).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write
from .aggregate import Group
from .spec import BASELINES

AXES = {  # metric: (file name part, x label)
    "sparsity": ("sparsity", "sparsity (fraction of prunable weights removed, nominal)"),
    "effective": ("effective-sparsity", "effective sparsity (weights on no input-output path count as removed)"),
    "compression": ("compression", "compression ratio (all parameters / non-zero)"),
    "flops": ("multiply-adds", "multiply-add (FLOP) reduction (dense / with masked weights skipped)"),
}
SPARSITY_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
VARIANT_STYLE = {"": ("-", "o"), "shuffle": (":", "x"), "reinit": ("-.", "s")}


def draw(groups: list[Group], points: list[dict[str, Any]], folder: Path, stem: str) -> dict[str, Path]:
    """One PNG per metric for the groups of one model and dataset; ``points``: literature points, each
    with ``number`` (its row in the report's table) and the x values it has."""
    colours = _colours([g for g in groups if g.label != "none"])
    dense = next((g for g in groups if g.label == "none" and g.n), None)
    written = {}
    for metric, (part, xlabel) in AXES.items():
        path = folder / f"{stem}_error-vs-{part}.png"
        _plot(metric, xlabel, groups, dense, points, colours, path)
        written[metric] = path
    return written


def _colours(groups: list[Group]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    methods = list(dict.fromkeys(g.method for g in groups))
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def _plot(metric: str, xlabel: str, groups: list[Group], dense: Group | None, points: list[dict[str, Any]],
          colours: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = list(dict.fromkeys(g.label for g in groups if g.label != "none"))
    for label in labels:
        line = sorted((g for g in groups if g.label == label and g.n and g.mean(metric) is not None),
                      key=lambda g: g.mean(metric))
        if not line:
            continue
        first = line[0]
        style, marker = VARIANT_STYLE[first.variant]
        if first.method in BASELINES and not first.variant:
            style = "--"
        x = np.array([g.mean(metric) for g in line])
        y = np.array([g.mean("error") for g in line])
        spread = np.array([g.std("error") for g in line])
        colour = colours[first.method]
        name = label + (" (baseline)" if first.method in BASELINES and not first.variant else "")
        axes.plot(x, y, style, marker=marker, markersize=4, color=colour, label=name)
        axes.fill_between(x, y - spread, y + spread, color=colour, alpha=0.12 if first.variant else 0.2,
                          linewidth=0)
    if dense is not None:
        mean, spread = dense.mean("error"), dense.std("error")
        seeds = f"{dense.n} seed" + ("s" if dense.n != 1 else "")
        axes.axhline(mean, color="0.3", linewidth=1, label=f"dense control ({seeds})")
        axes.axhspan(mean - spread, mean + spread, color="0.5", alpha=0.15, linewidth=0)
    key = {"sparsity": "sparsity", "compression": "compression_ratio", "flops": "flops_reduction"}.get(metric)
    starred = [p for p in points if key and p.get(key) is not None]
    for point in starred:
        colour = colours.get(point["method"], "black")
        axes.scatter([point[key]], [point["test_error_pct"]], marker="*", s=140, color=colour,
                     edgecolors="black", linewidths=0.5, zorder=4)
        axes.annotate(f"[{point['number']}]", (point[key], point["test_error_pct"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=7)
    if starred:
        axes.scatter([], [], marker="*", s=140, color="white", edgecolors="black", label="papers' numbers [n]")
    # the dense control is a horizontal line: no x of its own
    xs = [g.mean(metric) for g in groups if g.n and g.label != "none" and g.mean(metric) is not None]
    _x_scale(axes, metric, xs + [p[key] for p in starred])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("test error (%), mean ± std over seeds")
    _error_axis(axes)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


def _error_axis(axes) -> None:
    """A log error axis labelled at 1, 2 and 5 per decade, or at evenly spaced round values when the errors
    span less than one decade (0.7-1.7% would otherwise show a single labelled tick)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    axes.set_yscale("log")
    low, high = axes.get_ylim()
    if high > 10 * low:
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        axes.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def _x_scale(axes, metric: str, xs: list[float]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    if metric in ("sparsity", "effective"):
        # the interesting range is 0.9-0.999: spread it by the remaining fraction's logarithm
        forward = lambda s: -np.log10(np.clip(1 - np.asarray(s, dtype=float), 1e-6, None))  # noqa: E731
        inverse = lambda t: 1 - 10 ** (-np.asarray(t, dtype=float))  # noqa: E731
        axes.set_xscale("function", functions=(forward, inverse))
        low, high = forward(min(xs, default=0.5)), forward(max(xs, default=0.99))
        margin = 0.05 * max(high - low, 0.5)  # in the scale's own units: a linear margin would pass 1
        axes.set_xlim(inverse(low - margin), inverse(high + margin))
        axes.xaxis.set_major_locator(FixedLocator(SPARSITY_TICKS))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_locator(NullLocator())
    else:
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.xaxis.set_minor_formatter(NullFormatter())
