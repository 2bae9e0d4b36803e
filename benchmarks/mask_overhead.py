"""Epoch time of a masked model against the same dense model (issue: masks cost at most 10%).

Dense and masked epochs alternate (dense, masked, dense, masked, ...) on identical data so that any
drift in the machine's speed hits both; the figure is the ratio of the medians.

    python benchmarks/mask_overhead.py [--epochs 3] [--out benchmarks/results/mask_overhead.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

import prunelab
from prunelab.checkpoint import write_json
from prunelab.training import TrainConfig, Trainer

MODELS = {"lenet300-100": {}, "lenet5-caffe": {"relu": False}}


def epoch_times(name: str, options: dict, train, epochs: int) -> dict:
    config = TrainConfig(epochs=epochs, batch_size=100, lr=0.01, momentum=0.9, weight_decay=5e-4)
    dense = prunelab.build_model(name, seed=0, **options)
    masked = prunelab.build_model(name, seed=0, **options)
    prunelab.prune(masked, "random", sparsity=0.9, seed=0)
    trainers = {"dense": Trainer(dense, train, config, seed=0, progress=False),
                "masked": Trainer(masked, train, config, seed=0, progress=False)}
    times = {"dense": [], "masked": []}
    for epoch in range(epochs):
        for kind, trainer in trainers.items():
            times[kind].append(trainer.run_epoch(epoch)["seconds"])
    dense_s, masked_s = statistics.median(times["dense"]), statistics.median(times["masked"])
    return {"model": name, "options": options, "epochs_each": epochs, "dense_epoch_s": times["dense"],
            "masked_epoch_s": times["masked"], "dense_median_s": dense_s, "masked_median_s": masked_s,
            "overhead": masked_s / dense_s - 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/mask_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _, _ = prunelab.load_dataset("mnist")
    rows = []
    for name, options in MODELS.items():
        row = epoch_times(name, options, train, args.epochs)
        rows.append(row)
        print(f"{name:<14} dense {row['dense_median_s']:.2f} s/epoch, masked (90% random) "
              f"{row['masked_median_s']:.2f} s/epoch, overhead {row['overhead']:+.1%}", flush=True)
    write_json(args.out, {"benchmark": "mask_overhead", "threads": args.threads, "batch_size": 100,
                          "train_examples": len(train), "torch": torch.__version__,
                          "machine": platform.processor() or platform.machine(), "rows": rows})


if __name__ == "__main__":
    main()
