"""iSparse (Garg & Candan, ICMR 2020) LeNet-5 experiment on real MNIST: sparsify-with against its competitors.

    OMP_NUM_THREADS=1 PRUNELAB_DATA=/path/to/datasets python benchmarks/isparse_lenet.py [--epochs 15]

The paper's Figs. 1/5/7 use LeNet-5 on MNIST and compare iSparse with PFEC, NISP, DropConnect and
Retrain-free at sparsification factors 5%..50% (docs/methods/isparse.md); its figures give no numbers we can
read, so the only quantitative claim to hold against is the headline (VGG-16 / ImageNet: 50% costs <= 6%
top-1 with iSparse, ~16% with Retrain-free; the abstract: 30-50% "without impacting" accuracy).

1. Train LeNet-5-Caffe (ReLU after the convs) once, through the lab (run folder ``<runs>/dense``, reused
   when it exists): SGD momentum 0.9, lr 0.01 with a cosine decay, weight decay 5e-4, batch 100,
   ``--epochs`` epochs, 10% of the training set held out for validation (seeded), no augmentation.
2. For every factor s in 5%, 10%, ..., 50% (the paper's range) and, beyond it, 60%..90% (``--extra-factors``:
   on LeNet-5 the methods barely separate below 50%), prune a copy of the same trained weights with each
   method and evaluate it WITHOUT retraining (sparsify-with): test and validation accuracy.
   * ``isparse``, ``retrain-free``, ``dropconnect``: the fraction s of the edges of every layer (all conv and
     fc weights, the classifier included); iSparse and Retrain-free score on 1000 training examples.
   * references outside the paper's comparison: ``isparse`` with one global ranking (``isparse-global``) and
     per-layer magnitude |w| (``magnitude-layer``).
   * ``nisp``, ``pfec`` remove whole neurons/filters: a channel ratio r removes round(r n) of the n channels
     of every hidden layer and, with them, the readers' input slices. They are compared at equal *edge*
     sparsity: r is the value on a grid of step 0.001 whose removed fraction of the prunable weights is
     closest to s (ties: the smaller r); the edge sparsity actually reached is reported beside it.
3. Time iSparse scoring of LeNet-5-Caffe on 1000 images (``prunelab.scores``, best and median of 5).
4. Train-with at 50%: the same recipe from scratch with iSparse masks recomputed after every epoch (a lab
   run, ``<runs>/train-with-50``). Masks never revive, so the first recomputation fixes them (see
   ``prunelab.schedules.Periodic``).

Writes benchmarks/results/isparse_lenet.json, .png (accuracy against factor) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import prunelab
from prunelab import masking, structure
from prunelab.checkpoint import atomic_write, write_json
from prunelab.lab.config import RunConfig
from prunelab.lab.run import run as lab_run

RESULTS = Path("benchmarks/results")
METHODS = ("isparse", "retrain-free", "dropconnect", "nisp", "pfec")  # the paper's comparison
STRUCTURED = ("nisp", "pfec")
# references beyond the paper's comparison: {column: (method, prune options)}
EXTRAS = {"isparse-global": ("isparse", {"scope": "global"}), "magnitude-layer": ("magnitude", {"scope": "layer"})}
COLUMNS = METHODS + tuple(EXTRAS)
MODEL, MODEL_OPTIONS = "lenet5-caffe", {"relu": True}


def recipe(args) -> dict:
    return dict(model=MODEL, model_options=dict(MODEL_OPTIONS), dataset="mnist", epochs=args.epochs,
                batch_size=100, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4,
                lr_schedule="cosine", val_fraction=0.1, seed=args.seed, threads=args.threads,
                data_root=args.data_root, latency=False)


def train_dense(args) -> tuple[torch.nn.Module, dict]:
    out = Path(args.runs) / "dense"
    print(f"[1/4] dense LeNet-5-Caffe (relu) -> {out}", flush=True)
    result = lab_run(RunConfig(**recipe(args), method="none", out=str(out)), progress=False, echo=print)
    model = prunelab.build_model(MODEL, seed=args.seed, **MODEL_OPTIONS)
    prunelab.load_model(out / "model.safetensors", model)
    return model, result


def edge_sparsity_of_ratio(model, graph, safe, total, ratio, cache):
    """Fraction of the prunable weights that a channel ratio removes (the pfec / nisp rule: round(r n),
    at least one channel kept per layer). Depends only on the counts, so any channels will do."""
    counts = tuple(min(int(round(ratio * graph.groups[g].size)), graph.groups[g].size - 1) for g in safe)
    if counts not in cache:
        masks = structure.channel_masks(model, graph, {g: range(c) for g, c in zip(safe, counts)})
        pruned = sum(int((~m).sum()) for n, m in masks.items() if n.endswith("weight"))
        cache[counts] = pruned / total
    return cache[counts]


def channel_ratios(model, example, factors, step=0.001):
    """For each factor: the grid channel ratio whose edge sparsity is closest to it, and that sparsity."""
    graph = structure.channel_graph(model, example)
    safe = [g for g, group in enumerate(graph.groups) if group.safe]
    total = sum(p.numel() for p in masking.prunable_parameters(model).values())
    cache: dict = {}
    grid = [i * step for i in range(int(round(0.99 / step)) + 1)]
    reached = [(r, edge_sparsity_of_ratio(model, graph, safe, total, r, cache)) for r in grid]
    choice = {}
    for s in factors:
        r, e = min(reached, key=lambda pair: (abs(pair[1] - s), pair[0]))
        choice[s] = {"channel_ratio": round(r, 6), "predicted_edge_sparsity": e}
    return choice


def evaluate_pruned(model, val, test):
    return {"test_accuracy": 1.0 - prunelab.evaluate(model, test)["error"],
            "val_accuracy": 1.0 - prunelab.evaluate(model, val)["error"]}


def sweep(dense, splits, factors, args):
    train_set, val, test = splits
    ratios = channel_ratios(dense, test.inputs[:1], factors)
    rows = []
    print(f"[2/4] sparsify-with sweep: {len(factors)} factors x {len(COLUMNS)} methods, no retraining", flush=True)
    for s in factors:
        for method in COLUMNS:
            name, options = EXTRAS.get(method, (method, {}))
            model = masking.copy_model(dense)
            target = ratios[s]["channel_ratio"] if method in STRUCTURED else s
            if name in ("isparse", "retrain-free"):
                options = {**options, "examples": args.examples}
            amount = {"channels" if name in STRUCTURED else "sparsity": target}
            report = prunelab.prune(model, name, data=train_set, seed=args.seed, **amount, **options)
            row = {"method": method, "factor": s, "target": target, "edge_sparsity": report.sparsity,
                   "prune_seconds": report.seconds, **evaluate_pruned(model, val, test)}
            if method in STRUCTURED:
                row["channel_ratio"] = target
                assert abs(report.sparsity - ratios[s]["predicted_edge_sparsity"]) < 1e-12
            rows.append(row)
            extra = f" (channel ratio {target:.3f})" if method in STRUCTURED else ""
            print(f"  factor {s:.2f} {method:<12} edge sparsity {report.sparsity:.4f}{extra}  "
                  f"test acc {row['test_accuracy']:.2%}  val acc {row['val_accuracy']:.2%}", flush=True)
    return rows


def time_scoring(dense, train_set, args, repeats=5):
    print("[3/4] timing iSparse scoring of LeNet-5-Caffe on 1000 images", flush=True)
    times = []
    for r in range(repeats):
        started = time.perf_counter()
        prunelab.scores(dense, "isparse", train_set, seed=args.seed + r, examples=1000)
        times.append(time.perf_counter() - started)
    print(f"  best {min(times):.3f} s, median {statistics.median(times):.3f} s", flush=True)
    return {"examples": 1000, "repeats": repeats, "best_s": min(times), "median_s": statistics.median(times),
            "all_s": times, "threads": torch.get_num_threads()}


def train_with(args):
    out = Path(args.runs) / "train-with-50"
    print(f"[4/4] train-with at 50% from scratch -> {out}", flush=True)
    result = lab_run(RunConfig(**recipe(args), method="isparse", sparsity=0.5,
                               method_options={"mode": "train-with", "examples": args.examples}, out=str(out)),
                     progress=False, echo=print)
    return {"sparsity": result["sparsity"], "test_accuracy": 1.0 - result["error"]["test"],
            "val_accuracy": 1.0 - result["error"]["val"], "train_seconds": result["time_s"]["train"],
            "prune_seconds": result["time_s"]["prune"], "recomputations": result["prune_events"],
            "run": str(out)}


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = 100 * results["dense"]["test_accuracy"]
    tw = results.get("train_with")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    # left: every method on the full range; right: zoom on the top 3 points below the dense accuracy
    for ax, zoom in zip(axes, (False, True)):
        for method in COLUMNS:
            rows = [r for r in results["sweep"] if r["method"] == method]
            extra = method in EXTRAS
            ax.plot([100 * r["factor"] for r in rows], [100 * r["test_accuracy"] for r in rows], marker="o", ms=4,
                    ls=":" if extra else "-", alpha=0.7 if extra else 1.0,
                    label=method + (" (equal edge sparsity)" if method in STRUCTURED else "")
                    + (" (reference)" if extra else ""))
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.2f}%")
        if tw:
            ax.plot([50], [100 * tw["test_accuracy"]], marker="*", ms=12, ls="none", color="C0",
                    label=f"isparse train-with 50%: {100 * tw['test_accuracy']:.2f}%")
        low = dense - 3 if zoom else max(0, min(100 * r["test_accuracy"] for r in results["sweep"]) - 2)
        ax.set_ylim(low, dense + 0.4 if zoom else 100)
        if max(r["factor"] for r in results["sweep"]) > 0.5:
            ax.axvline(50, color="grey", ls=":", lw=1)
            ax.text(51, low, " beyond the paper's range", fontsize=7, color="grey", va="bottom")
        ax.set_xlabel("sparsification factor (% of edges removed)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("zoom" if zoom else "LeNet-5-Caffe on MNIST, sparsify-with (no retraining)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(results) -> str:
    dense = results["dense"]
    factors = sorted({r["factor"] for r in results["sweep"]})
    paper_range = set(results["settings"]["factors"])
    by = {(r["method"], r["factor"]): r for r in results["sweep"]}
    header = ["| factor | " + " | ".join(METHODS) + " | best of these | " + " | ".join(EXTRAS) + " |",
              "|---|" + "---|" * (len(COLUMNS) + 1)]
    lines = ["# iSparse on LeNet-5-Caffe / MNIST: sparsify-with (no retraining)", "",
             f"Dense LeNet-5-Caffe (ReLU after convs), {results['settings']['epochs']} epochs SGD: test accuracy "
             f"**{dense['test_accuracy']:.2%}**, validation {dense['val_accuracy']:.2%}.", "",
             "Test accuracy (%) after removing the factor's share of edges, no retraining. NISP and PFEC remove "
             "whole channels; they run at the channel ratio whose edge sparsity is closest to the factor "
             "(grid step 0.001), and the edge sparsity reached is in brackets. Factors marked * are beyond the "
             "paper's 5-50% range. The last two columns are references outside the paper's comparison: "
             "iSparse with one global ranking, and per-layer magnitude |w|.", "", *header]

    def row(s, key, brackets):
        cells = []
        for m in METHODS:
            r = by[(m, s)]
            cell = f"{100 * r[key]:.2f}"
            if brackets and m in STRUCTURED:
                cell += f" [{100 * r['edge_sparsity']:.1f}%]"
            cells.append(cell)
        top = max(by[(m, s)][key] for m in METHODS)
        best = ", ".join(m for m in METHODS if by[(m, s)][key] == top)
        mark = "" if s in paper_range else "*"
        extras = " | ".join(f"{100 * by[(m, s)][key]:.2f}" for m in EXTRAS)
        return f"| {100 * s:.0f}%{mark} | " + " | ".join(cells) + f" | {best} | {extras} |"

    lines += [row(s, "test_accuracy", True) for s in factors]
    lines += ["", "Validation accuracy (%), same runs:", "", *header]
    lines += [row(s, "val_accuracy", False) for s in factors]
    t = results["scoring_time"]
    lines += ["", f"iSparse scoring of LeNet-5-Caffe on 1000 images: best {t['best_s']:.3f} s, median "
                  f"{t['median_s']:.3f} s ({t['threads']} thread)."]
    tw = results.get("train_with")
    if tw:
        sw = by.get(("isparse", 0.5))
        lines += ["", f"Train-with, 50%, from scratch with masks recomputed every epoch: test accuracy "
                      f"**{tw['test_accuracy']:.2%}** (validation {tw['val_accuracy']:.2%}), sparsity "
                      f"{tw['sparsity']:.4f}" + (f"; sparsify-with iSparse at 50%: {sw['test_accuracy']:.2%}."
                                                 if sw else ".")]
    timing = f"Benchmark wall time {results['wall_seconds'] / 60:.1f} min"
    if results.get("reused_runs"):
        timing += f" (reused the finished runs {', '.join(results['reused_runs'])}: their training is not included)"
    lines += ["", timing + f"; dense training {dense['train_seconds'] / 60:.1f} min. Paper (VGG-16, ImageNet): "
                  "50% costs <= 6% top-1 with iSparse, ~16% with Retrain-free. The iSparse score is our "
                  "reconstruction (docs/methods/isparse.md)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--factors", nargs="+", type=float, default=[i / 20 for i in range(1, 11)])
    parser.add_argument("--extra-factors", nargs="*", type=float, default=[0.6, 0.7, 0.8, 0.9],
                        help="factors beyond the paper's 5-50%% range")
    parser.add_argument("--examples", type=int, default=1000, help="iSparse / Retrain-free scoring examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", default="runs/isparse_lenet")
    parser.add_argument("--skip-train-with", action="store_true")
    parser.add_argument("--data-root", default=os.environ.get("PRUNELAB_DATA"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    reused = [name for name in ("dense", "train-with-50") if (Path(args.runs) / name / "result.json").exists()]
    dense, dense_result = train_dense(args)
    splits = prunelab.load_dataset("mnist", root=args.data_root, val_fraction=0.1, seed=args.seed)  # the lab's split
    dense_acc = evaluate_pruned(dense, splits[1], splits[2])
    print(f"  dense test acc {dense_acc['test_accuracy']:.2%}, val acc {dense_acc['val_accuracy']:.2%}", flush=True)
    results = {
        "benchmark": "isparse_lenet",
        "settings": {**{k: v for k, v in recipe(args).items() if k not in ("data_root", "threads")},
                     "factors": args.factors, "extra_factors": args.extra_factors, "scoring_examples": args.examples,
                     "structured_matching": "channel ratio on a 0.001 grid whose removed fraction of prunable "
                                            "weights is closest to the factor (ties: smaller ratio)"},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "dense": {**dense_acc, "train_seconds": dense_result["time_s"]["train"], "run": str(Path(args.runs) / "dense")},
    }
    results["sweep"] = sweep(dense, splits, list(args.factors) + list(args.extra_factors), args)
    results["scoring_time"] = time_scoring(dense, splits[0], args)
    if not args.skip_train_with:
        results["train_with"] = train_with(args)
    results["wall_seconds"] = time.perf_counter() - started
    results["reused_runs"] = [r for r in reused if r != "train-with-50" or not args.skip_train_with]

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "isparse_lenet.json", results)  # atomic: temporary file, then os.replace
    plot(results, RESULTS / "isparse_lenet.png")
    atomic_write(RESULTS / "isparse_lenet.md", markdown(results))
    print(markdown(results))
    print(f"wrote {RESULTS}/isparse_lenet.json, .png, .md in {results['wall_seconds'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
