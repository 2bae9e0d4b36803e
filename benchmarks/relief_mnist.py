"""NNrelief on MNIST: LeNet-300-100 and LeNet-5-Caffe (with ReLU), iterative prune + rewind + retrain.

    OMP_NUM_THREADS=1 PRUNELAB_DATA=/path/to/datasets python benchmarks/relief_mnist.py \
        [--models lenet300-100 lenet5-caffe] [--iterations 5] [--epochs 60] [--seeds 0 1 2] [--no-keep-best]

The authors' LeNet recipe (docs/methods/relief.md): inputs scaled to [0, 1] only, Adam lr 1e-3, batch 120,
weight decay 5e-4, 60 epochs with lr x0.1 at epoch 30; then ``--iterations`` rounds of NNrelief
(alpha_fc 0.95, alpha_conv 0.9, 1000 pruning images drawn with the seed), each followed by rewinding
the surviving weights to their initial values and retraining with the same recipe. ``--epochs``
shortens pre-training and every retraining alike (the decay stays at half). Every round is a lab run
folder under runs/relief_mnist/ (checkpointed per epoch: an interrupted benchmark resumes).

Reported per round: remaining weights of the conv/fc layers (% of the original), per-layer remaining %,
remaining neurons/filters, test and validation error, mean +- std over the seeds. With ``--keep-best``
(default) every (re)training ends on its epoch with the lowest validation error: the authors' code kept the
best *test* checkpoint (docs/methods/relief.md); the test set here is only reported. Finished runs are read
back from their folders, so seeds can run in parallel processes and a last call collects them all. Writes
benchmarks/results/relief_mnist.json and .md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import prunelab
from prunelab import checkpoint, masking
from prunelab.criteria.relief import relief_masks
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPTIONS = {"lenet300-100": {}, "lenet5-caffe": {"relu": True}}


def config(model: str, iterations: int, epochs: int, seed: int, threads: int, keep_best: bool,
           rewind: str = "init") -> RunConfig:
    tag = ("_best" if keep_best else "") + ("" if rewind == "init" else "_finetune")
    return RunConfig(model=model, model_options=OPTIONS[model], method="relief", rounds=iterations, rewind=rewind,
                     normalize_inputs=False, epochs=epochs, optimizer="adam", lr=1e-3, batch_size=120,
                     weight_decay=5e-4, lr_schedule="multistep", milestones=[epochs // 2], seed=seed,
                     threads=threads, keep_best=keep_best,
                     init="vs-h",  # Kaiming-normal weights (biases start at 0 here, PyTorch's default there)
                     out=str(ROOT / "runs" / "relief_mnist" / f"{model}_i{iterations}_e{epochs}_s{seed}{tag}"))


def remaining_weights(event: dict) -> float:
    """Remaining weights of the conv/fc layers, % of the original."""
    kept = sum(layer["kept"] for layer in event["layers"])
    total = sum(layer["params"] for layer in event["layers"])
    return 100.0 * kept / total


def scoring_seconds(threads: int) -> float:
    """One NNrelief pruning step of LeNet-5-Caffe on 1000 MNIST images (best of 3)."""
    torch.set_num_threads(threads)
    train, _, _ = prunelab.load_dataset("mnist", val_fraction=0.1, seed=0, normalize_inputs=False)
    best = float("inf")
    for _ in range(3):
        model = prunelab.build_model("lenet5-caffe", relu=True, seed=0)
        params = masking.prunable_parameters(model, include_bias=True)
        start = time.perf_counter()
        relief_masks(model, params, data=train, generator=torch.Generator().manual_seed(0), examples=1000)
        best = min(best, time.perf_counter() - start)
    return best


def rounds_of(result: dict) -> list[dict]:
    rounds = []
    kept = {k["stage"]: k["val_error"] for k in result.get("kept_epochs", [])}
    for i, stage in enumerate(result["stage_results"]):
        event = result["prune_events"][i - 1] if i else None
        rounds.append({
            "iteration": i, "test_error": stage["test_error"], "val_error": kept.get(stage["stage"], stage["val_error"]),
            "weights_percent": 100.0 if event is None else remaining_weights(event),
            "layer_percent": ({layer["name"]: 100.0 * layer["kept"] / layer["params"] for layer in event["layers"]}
                              if event else None),
            "neurons": {k: v["alive"] for k, v in stage["units"].items()},
        })
    return rounds


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                        help="end each (re)training on its lowest-validation-error epoch (the authors chose on test)")
    parser.add_argument("--rewind", choices=["init", "none"], default="init",
                        help="init: rewind to the initial weights before retraining (the paper's LeNets); "
                             "none: fine-tune the pruned weights (its VGG/ResNet procedure)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    path = RESULTS / "relief_mnist.json"
    output = checkpoint.read_json(path) if path.exists() else {"benchmark": "relief_mnist", "variants": {}}
    output["scoring_seconds_lenet5_1000"] = scoring_seconds(args.threads)
    output["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "threads": args.threads, "cpu_count": os.cpu_count()}
    print(f"NNrelief step on LeNet-5-Caffe, 1000 images: {output['scoring_seconds_lenet5_1000']:.2f} s", flush=True)
    for model in args.models:
        key = (f"{model}_i{args.iterations}_e{args.epochs}" + ("_best" if args.keep_best else "")
               + ("" if args.rewind == "init" else "_finetune"))
        runs = {}
        for seed in args.seeds:
            result = lab_run.run(config(model, args.iterations, args.epochs, seed, args.threads, args.keep_best,
                                        args.rewind), progress=False)
            runs[str(seed)] = {"rounds": rounds_of(result), "structured": result.get("structured"),
                               "train_seconds": result["time_s"]["train"]}
        summary = []
        for i in range(args.iterations + 1):
            row = {"iteration": i}
            for field in ("weights_percent", "test_error", "val_error"):
                row[field] = mean_std([r["rounds"][i][field] for r in runs.values()])
            summary.append(row)
        output["variants"][key] = {"model": model, "iterations": args.iterations, "epochs": args.epochs,
                                   "keep_best": args.keep_best, "rewind": args.rewind, "seeds": runs, "summary": summary}
        checkpoint.write_json(path, output)
    write_markdown(output)


def write_markdown(output: dict) -> None:
    lines = ["# NNrelief on MNIST", "",
             "Adam lr 1e-3, batch 120, wd 5e-4, lr x0.1 at half of every (re)training; NNrelief iterations with "
             "alpha_fc 0.95, alpha_conv 0.9 and 1000 pruning images, each followed by retraining, after rewinding "
             "the survivors to their initial values (the paper's LeNet procedure) unless a section says it "
             "fine-tunes; inputs in [0, 1]; 1 CPU thread. "
             "Remaining = weights of the conv/fc layers, % of the original. keep_best: each (re)training ends on "
             "its epoch with the lowest validation error; the test error is only reported.",
             "", f"One NNrelief step on LeNet-5-Caffe with 1000 images: {output['scoring_seconds_lenet5_1000']:.2f} s.", ""]
    for key, data in output["variants"].items():
        seeds = data["seeds"]
        first = next(iter(seeds.values()))["rounds"]
        layers = list(first[-1]["layer_percent"] or {})
        units = list(first[0]["neurons"])
        retrain = "fine-tuning the pruned weights" if data.get("rewind") == "none" else "rewinding to init"
        lines += [f"## {data['model']}: {data['iterations']} iterations, {data['epochs']} epochs each, {retrain}, "
                  f"keep_best {str(data['keep_best']).lower()}, seeds {', '.join(seeds)}", "",
                  "| iteration | remaining % | test error % | val error % |", "|---|---|---|---|"]
        for row in data["summary"]:
            cells = [f"{row[f][0] * (100 if 'error' in f else 1):.2f} +- {row[f][1] * (100 if 'error' in f else 1):.2f}"
                     for f in ("weights_percent", "test_error", "val_error")]
            lines.append(f"| {row['iteration']} | " + " | ".join(cells) + " |")
        lines += ["", f"Seed {next(iter(seeds))}, per layer:", "",
                  "| iteration | " + " | ".join(f"{n} %" for n in layers) + " | neurons (" + ", ".join(units)
                  + ") | test error |", "|" + "---|" * (3 + len(layers))]
        for r in first:
            per = r["layer_percent"] or {}
            lines.append(f"| {r['iteration']} | " + " | ".join(f"{per.get(n, 100.0):.2f}" for n in layers)
                         + f" | {'-'.join(str(r['neurons'][u]) for u in units)} | {r['test_error']:.2%} |")
        st = next(iter(seeds.values())).get("structured")
        if st:
            lines += ["", f"Physically smaller model (seed {next(iter(seeds))}): {st['params_compact']:,} parameters, "
                          f"outputs equal to the masked model within {st['compact_max_abs_diff']:.1e}."]
        lines.append("")
    checkpoint.atomic_write(RESULTS / "relief_mnist.md", "\n".join(lines))


if __name__ == "__main__":
    main()
