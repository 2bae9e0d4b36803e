"""NNrelief on MNIST: LeNet-300-100 and LeNet-5-Caffe (with ReLU), iterative prune + rewind + retrain.

    OMP_NUM_THREADS=1 PRUNELAB_DATA=../shared/datasets python benchmarks/relief_mnist.py \
        [--models lenet300-100 lenet5-caffe] [--iterations 5] [--epochs 60] [--seed 0] [--threads 1]

The authors' LeNet recipe (methods.md 3.3 / 3.5): inputs scaled to [0, 1] only, Adam lr 1e-3, batch 120,
weight decay 5e-4, 60 epochs with lr x0.1 at epoch 30; then ``--iterations`` rounds of NNrelief
(alpha_fc 0.95, alpha_conv 0.9, 1000 pruning images drawn with the seed), each followed by rewinding
the surviving weights to their initial values and retraining with the same recipe. ``--epochs``
shortens pre-training and every retraining alike (the decay stays at half). Every round is a lab run
folder under runs/relief_mnist/ (checkpointed per epoch: an interrupted benchmark resumes).

Reported per round: remaining weights + biases of conv/fc layers (% of the original, NNrelief's count),
per-layer remaining %, remaining neurons/filters, test and validation error. The test set is only
reported, never used to choose anything (the authors' code selected on it; methods.md 3.6).
Writes benchmarks/results/relief_mnist.json and .md.
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


def config(model: str, iterations: int, epochs: int, seed: int, threads: int) -> RunConfig:
    return RunConfig(model=model, model_options=OPTIONS[model], method="relief", rounds=iterations, rewind="init",
                     normalize_inputs=False, epochs=epochs, optimizer="adam", lr=1e-3, batch_size=120,
                     weight_decay=5e-4, lr_schedule="multistep", milestones=[epochs // 2], seed=seed,
                     threads=threads, init="vs-h",  # Kaiming-normal weights (biases start at 0 here)
                     out=str(ROOT / "runs" / "relief_mnist" / f"{model}_i{iterations}_e{epochs}_s{seed}"))


def layer_percent(result: dict) -> dict[str, float]:
    return {row["name"]: 100.0 * row["nonzero"] / row["params"] for row in result["layers"]}


def weights_and_biases(event: dict) -> float:
    """Remaining weights + biases of conv/fc layers, % of the original (NNrelief's figure)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    output = {"benchmark": "relief_mnist", "iterations": args.iterations, "epochs": args.epochs, "seed": args.seed,
              "scoring_seconds_lenet5_1000": scoring_seconds(args.threads), "models": {},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "threads": args.threads, "cpu_count": os.cpu_count()}}
    print(f"NNrelief step on LeNet-5-Caffe, 1000 images: {output['scoring_seconds_lenet5_1000']:.2f} s", flush=True)
    previous = RESULTS / "relief_mnist.json"
    if previous.exists():  # keep the other models' figures when only some are rerun
        output["models"] = checkpoint.read_json(previous).get("models", {})
    for model in args.models:
        cfg = config(model, args.iterations, args.epochs, args.seed, args.threads)
        started = time.perf_counter()
        result = lab_run.run(cfg, progress=False)
        rounds = []
        for i, stage in enumerate(result["stage_results"]):
            event = result["prune_events"][i - 1] if i else None
            rounds.append({
                "iteration": i, "test_error": stage["test_error"], "val_error": stage["val_error"],
                "weights_and_biases_percent": 100.0 if event is None else weights_and_biases(event),
                "layer_percent": ({layer["name"]: 100.0 * layer["kept"] / layer["params"] for layer in event["layers"]}
                                  if event else None),
                "neurons": {k: v["alive"] for k, v in stage["units"].items()},
                "neurons_total": {k: v["total"] for k, v in stage["units"].items()},
            })
        output["models"][model] = {"config": result["config"], "rounds": rounds,
                                   "final_layers_percent": layer_percent(result),
                                   "structured": result.get("structured"), "wall_seconds": time.perf_counter() - started,
                                   "train_seconds": result["time_s"]["train"]}
        checkpoint.write_json(RESULTS / "relief_mnist.json", output)
    write_markdown(output)


def write_markdown(output: dict) -> None:
    lines = ["# NNrelief on MNIST", "",
             f"Adam lr 1e-3, batch 120, wd 5e-4, {output['epochs']} epochs per (re)training with lr x0.1 at half; "
             f"{output['iterations']} NNrelief iterations (alpha_fc 0.95, alpha_conv 0.9, 1000 pruning images), "
             "rewinding to the initial weights after each (the paper's LeNet procedure); inputs in [0, 1]; "
             f"seed {output['seed']}, {output['environment']['threads']} CPU thread(s). "
             "Remaining = weights + biases of conv/fc layers, % of the original. Test error is reported only.",
             "", f"One NNrelief step on LeNet-5-Caffe with 1000 images: {output['scoring_seconds_lenet5_1000']:.2f} s.", ""]
    for model, data in output["models"].items():
        rounds = data["rounds"]
        layers = list(rounds[-1]["layer_percent"] or {})
        units = list(rounds[0]["neurons"])
        lines += [f"## {model}", "", f"Wall time {data['wall_seconds'] / 60:.1f} min.", "",
                  "| iteration | remaining % | " + " | ".join(f"{n} %" for n in layers) + " | neurons ("
                  + ", ".join(units) + ") | test error | val error |",
                  "|" + "---|" * (5 + len(layers))]
        for r in rounds:
            per = r["layer_percent"] or {}
            lines.append(f"| {r['iteration']} | {r['weights_and_biases_percent']:.2f} | "
                         + " | ".join(f"{per.get(n, 100.0):.2f}" for n in layers)
                         + f" | {'-'.join(str(r['neurons'][u]) for u in units)} | {r['test_error']:.2%} | "
                         + (f"{r['val_error']:.2%} |" if r["val_error"] is not None else "n/a |"))
        if data.get("structured"):
            st = data["structured"]
            lines += ["", f"Physically smaller model: {st['params_compact']:,} parameters, outputs equal to the "
                          f"masked model within {st['compact_max_abs_diff']:.1e}."]
        lines.append("")
    checkpoint.atomic_write(RESULTS / "relief_mnist.md", "\n".join(lines))


if __name__ == "__main__":
    main()
