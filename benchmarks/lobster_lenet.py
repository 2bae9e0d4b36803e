"""LOBSTER reproduction on MNIST (preprint Tables 2 and 3) and the regulariser's cost per step.

    python benchmarks/lobster_lenet.py overhead
    python benchmarks/lobster_lenet.py lenet300 [--epochs 1000]
    python benchmarks/lobster_lenet.py lenet5   [--epochs 1000]

Runs go through the lab (`prunelab run --method lobster`), so they checkpoint every epoch and resume when
started again. Settings of the paper's LeNet experiments (docs/methods/lobster.md): SGD lr 0.1 without
momentum, lambda 1e-4, PWE 20, TWT 0.05, batch 100, a 5,000-image validation set from the training set. The
trajectory (every pruning phase) goes to benchmarks/results/lobster_<model>.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prunelab
from prunelab.checkpoint import write_json
from prunelab.lab.config import RunConfig
from prunelab.lab.run import run
from prunelab.criteria.lobster import Regulariser, covered_parameters

PAPER = {"lenet300-100": [{"compression_ratio": 50.04, "test_error": 0.0165},
                          {"compression_ratio": 114.92, "test_error": 0.0195}],
         "lenet5-caffe": [{"compression_ratio": 230.0, "test_error": 0.0079}]}


def overhead(steps: int = 300, blocks: int = 6) -> dict:
    """Time per training step, plain SGD against SGD + LOBSTER, in interleaved blocks."""
    train, _, _ = prunelab.load_dataset("mnist")
    x, y = train.inputs[:100], train.targets[:100]
    rows = {}
    for name, options in (("lenet300-100", {}), ("lenet5-caffe", {"relu": True})):
        times = {"sgd": [], "lobster": []}
        models = {k: prunelab.build_model(name, seed=0, **options) for k in times}
        optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
        Regulariser(covered_parameters(models["lobster"]), 1e-4).attach(optimizers["lobster"])
        for _ in range(blocks):
            for kind, model in models.items():
                start = time.perf_counter()
                for _ in range(steps if name == "lenet300-100" else steps // 10):
                    optimizers[kind].zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    optimizers[kind].step()
                times[kind].append((time.perf_counter() - start) / (steps if name == "lenet300-100" else steps // 10))
        sgd, lob = statistics.median(times["sgd"]), statistics.median(times["lobster"])
        rows[name] = {"sgd_step_ms": sgd * 1e3, "lobster_step_ms": lob * 1e3, "overhead": lob / sgd - 1}
        print(f"{name:<14} SGD {sgd * 1e3:.3f} ms/step, SGD+LOBSTER {lob * 1e3:.3f} ms/step, "
              f"overhead {lob / sgd - 1:+.1%}", flush=True)
    return rows


def reproduce(model: str, epochs: int, seed: int, tolerance: float, tag: str) -> dict:
    options = {"relu": True} if model == "lenet5-caffe" else {}
    config = RunConfig(model=model, model_options=options, method="lobster", epochs=epochs, batch_size=100,
                       optimizer="sgd", lr=0.1, momentum=0.0, val_fraction=5000 / 60000, seed=seed,
                       method_options={"lambda": 1e-4, "pwe": 20, "twt": 0.05, "plateau_tolerance": tolerance},
                       out=f"runs/lobster/{model}-s{seed}{tag}")
    started = time.perf_counter()
    result = run(config)
    phases = result["prune_events"]
    best_at = lambda limit: max((p for p in phases if p["test_error"] <= limit),
                                key=lambda p: p["compression_ratio"], default=None)
    return {"model": model, "seed": seed, "epoch_budget": epochs, "plateau_tolerance": tolerance, "epochs_run": len(result["history"]),
            "final": {"compression_ratio": result["compression_ratio"], "test_error": result["error"]["test"]},
            "best_within": {f"{limit:.4f}": best_at(limit) for limit in (0.0165, 0.018, 0.0195, 0.0079, 0.01)},
            "paper": PAPER[model], "trajectory": phases, "wall_s_this_session": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["overhead", "lenet300", "lenet5"])
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plateau-tolerance", type=float, default=0.01,
                        help="an epoch is good if val loss < best x (1 + this); the authors' code uses +0.01, "
                             "-0.01 is the ReduceLROnPlateau-style reading (improve by 1%%)")
    parser.add_argument("--tag", default="", help="suffix of the run folder and results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "overhead":
        write_json("benchmarks/results/lobster_overhead.json", {"threads": args.threads, "batch_size": 100,
                                                                "rows": overhead()})
    else:
        model = "lenet300-100" if args.part == "lenet300" else "lenet5-caffe"
        result = reproduce(model, args.epochs, args.seed, args.plateau_tolerance, args.tag)
        write_json(f"benchmarks/results/lobster_{model}{args.tag}.json", result)


if __name__ == "__main__":
    main()
