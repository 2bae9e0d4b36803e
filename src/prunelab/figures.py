"""Figures: SNIP's interpretability figure (Lee, Ajanthan & Torr, ICLR 2019, section 5.4, Figs. 2 and 3).

SNIP scores connections on one mini-batch, so the retained connections of LeNet-300-100's first layer
show which input pixels matter for that batch. The figure: compute the SNIP mask at a sparsity on a batch
of one class, take the first layer's mask c_1 (300 x 784), average it over the 300 neurons and reshape
the 784 values to 28 x 28. Bright = many retained connections from that pixel. One image per class
(a batch of that class only) and one for a mixed batch; one row per sparsity.

    from prunelab.figures import snip_pixel_map, save_snip_figure
    image = snip_pixel_map(model, inputs, targets, sparsity=0.9)      # Tensor (28, 28)
    save_snip_figure("snip.png", train, sparsity=(0.5, 0.9))          # PNG grid

    python -m prunelab.figures snip --out snip.png [--sparsity 0.5 0.9] [--dataset fashion-mnist]

Scoring never changes the model (see prunelab.criteria.snip); the figure is written atomically.
Matplotlib is used through its Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from . import masking, selection
from .checkpoint import output_file
from .criteria.snip import snip_scores
from .errors import PrunelabError


def snip_pixel_map(model: nn.Module, inputs: Tensor, targets: Tensor, sparsity: float, *,
                   layer: str | None = None, bn_mode: str = "eval") -> Tensor:
    """Fraction of each input pixel's first-layer connections that SNIP keeps, as an image (H, W).

    The SNIP mask is computed on ``(inputs, targets)`` as one batch with a global top-k at ``sparsity``
    over the model's prunable weights (masks already on the model are respected, the model is not
    changed). ``layer`` names the fully connected layer fed by the flattened input (default: the first
    prunable parameter); its mask (out, C*H*W) is averaged over the output neurons and over channels.
    """
    params = masking.prunable_parameters(model)
    name = layer or next(iter(params))
    if name not in params:
        raise PrunelabError(f"unknown layer {name!r}; prunable parameters: {', '.join(params)}")
    shape = tuple(inputs.shape[1:])
    weight = params[name]
    if weight.dim() != 2 or weight.shape[1] != math.prod(shape) or len(shape) != 3:
        raise PrunelabError(f"{name} of shape {tuple(weight.shape)} is not a fully connected layer on the "
                            f"flattened input of shape {shape}; pass layer= the first such layer")
    scores = snip_scores(model, params, data=(inputs, targets), generator=torch.Generator(), bn_mode=bn_mode)
    alive = masking.masks(model)
    mask = selection.global_topk(scores, sparsity, alive or None)[name]
    return mask.to(torch.float32).mean(0).view(shape).mean(0)


def class_batches(dataset, classes: Sequence[int], batch_size: int, seed: int,
                  mixed: bool = True) -> list[tuple[str, Tensor, Tensor]]:
    """(label, inputs, targets): ``batch_size`` examples of each class, then (``mixed``) of all classes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    names = getattr(dataset, "classes", None)
    result = []
    for c in classes:
        rows = order[dataset.targets[order] == c][:batch_size]
        if len(rows) == 0:
            raise PrunelabError(f"class {c} has no examples in the dataset")
        label = str(names[c]) if names is not None and c < len(names) else str(c)
        result.append((label, dataset.inputs[rows], dataset.targets[rows]))
    if mixed:
        rows = order[:batch_size]
        result.append(("all classes", dataset.inputs[rows], dataset.targets[rows]))
    return result


def snip_class_maps(dataset, sparsities: Sequence[float] = (0.9,), classes: Sequence[int] | None = None, *,
                    seed: int = 0, batch_size: int = 100, model: str = "lenet300-100", init: str = "vs",
                    mixed: bool = True) -> tuple[list[str], Tensor]:
    """Column labels and maps (len(sparsities), columns, H, W) of one network (built with ``seed``)."""
    from .models import build_model

    classes = list(range(len(dataset.classes))) if classes is None else [int(c) for c in classes]
    net = build_model(model, num_classes=len(dataset.classes), init=init, seed=seed)
    batches = class_batches(dataset, classes, batch_size, seed, mixed)
    maps = torch.stack([torch.stack([snip_pixel_map(net, x, y, s) for _, x, y in batches])
                        for s in sparsities])
    return [label for label, _, _ in batches], maps


def save_snip_figure(path: str | os.PathLike, dataset, sparsity: float | Sequence[float] = 0.9,
                     classes: Sequence[int] | None = None, seed: int = 0, *, batch_size: int = 100,
                     model: str = "lenet300-100", init: str = "vs", dpi: int = 100) -> Tensor:
    """Write SNIP's first-layer figure as a PNG grid (rows: sparsities; columns: classes, then a mixed
    batch) to ``path`` atomically, and return the maps (rows, columns, H, W)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = output_file(path, ".png")  # checked before any work
    sparsities = [sparsity] if isinstance(sparsity, (int, float)) else list(sparsity)
    for s in sparsities:
        selection.check_sparsity(s)
    if batch_size < 1:
        raise PrunelabError(f"batch_size must be >= 1, got {batch_size}")
    if dpi < 1:
        raise PrunelabError(f"dpi must be >= 1, got {dpi}")
    labels, maps = snip_class_maps(dataset, sparsities, classes, seed=seed, batch_size=batch_size,
                                   model=model, init=init)
    rows, cols = maps.shape[:2]
    figure = Figure(figsize=figure_size(rows, cols), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image = maps[r, c]
            ax.imshow(image.numpy(), cmap="gray", vmin=0.0, vmax=max(float(image.max()), 1e-12))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{100 * sparsities[r]:g}%", fontsize=8)
    figure.suptitle(f"SNIP: retained first-layer connections per input pixel ({model}, batch {batch_size})",
                    fontsize=9)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return maps


def figure_size(rows: int, cols: int) -> tuple[float, float]:
    """Figure size in inches of a grid (the PNG is this times dpi pixels)."""
    return 1.1 * cols + 0.4, 1.2 * rows + 0.5


# --- command line -------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The figure sub-commands (used by ``python -m prunelab.figures`` and ``prunelab figure``)."""
    kinds = parser.add_subparsers(dest="figure", metavar="{snip}", required=True)
    snip = kinds.add_parser("snip", help="SNIP's first-layer pixel maps per class (Lee et al. 2019, Fig. 2)")
    snip.add_argument("--out", required=True, help="PNG file to write")
    snip.add_argument("--sparsity", type=float, nargs="+", default=[0.9], help="one row each (default 0.9)")
    snip.add_argument("--classes", type=int, nargs="+", default=None, help="default: every class")
    snip.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist (default mnist)")
    snip.add_argument("--data-root", default=None, help="default: $PRUNELAB_DATA")
    snip.add_argument("--batch-size", type=int, default=100, help="examples per scoring batch (default 100)")
    snip.add_argument("--init", default="vs", help="initialisation scheme (default vs)")
    snip.add_argument("--seed", type=int, default=0)
    snip.add_argument("--dpi", type=int, default=100)


def run_cli(args: argparse.Namespace) -> int:
    from .data import dataset_info, load_dataset

    shape = tuple(dataset_info(args.dataset).input_shape)
    if shape != (1, 28, 28):
        raise PrunelabError(f"figure snip maps LeNet-300-100's 28x28 input pixels; dataset {args.dataset!r} "
                            f"has inputs of shape {shape} (use mnist or fashion-mnist)")
    train, _, _ = load_dataset(args.dataset, root=args.data_root)
    maps = save_snip_figure(args.out, train, args.sparsity, args.classes, args.seed,
                            batch_size=args.batch_size, init=args.init, dpi=args.dpi)
    print(f"wrote {args.out} ({maps.shape[0]} x {maps.shape[1]} maps)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prunelab.figures", description="Paper figures.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cli(args)
    except PrunelabError as error:
        print(f"prunelab: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
