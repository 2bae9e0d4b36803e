"""Is a PFP-pruned ResNet-56 really faster? Channel masks -> physically smaller model -> CPU latency.

    PRUNELAB_DATA=/path/to/datasets python benchmarks/pfp_resnet56_speed.py [--fr 0.5] [--threads 1 2] [--ratio R]

Builds ResNet-56 (option A) for CIFAR-10, prunes it with PFP channel masks (S drawn from the CIFAR-10
training split) at the prune ratio whose physically smaller model removes ``--fr`` of the FLOPs (found
by bisection), compacts it (``prunelab.compact``, outputs checked against the masked model; layers whose
masked input channels are still read elsewhere gather their used inputs) and times both models at batch
64 with ``torch.utils.benchmark`` for each thread count, in both memory layouts (contiguous NCHW and
channels-last), and reports each model in its faster layout. FLOPs and latency depend only on the
channel counts, but which channels PFP keeps depends on the weights: ``--train-epochs N`` trains the
network briefly first (a full CIFAR schedule does not fit this CPU). ``--round-to 8`` sets PFP's
round_to option. Writes benchmarks/results/pfp_resnet56_speed[_pfec][_roundN].json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

import prunelab
from prunelab import checkpoint, masking, structure

ROOT = Path(__file__).resolve().parents[1]


def trained_weights(train, epochs: int) -> dict | None:
    """ResNet-56 after ``epochs`` of SGD (lr 0.1, momentum 0.9, wd 1e-4, batch 128), cached in runs/."""
    if epochs == 0:
        return None
    path = ROOT / "runs" / "pfp_resnet56_speed" / f"resnet56_e{epochs}.safetensors"
    model = prunelab.build_model("resnet56", seed=0)
    if not path.exists():
        config = prunelab.TrainConfig(epochs=epochs, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4)
        trainer = prunelab.Trainer(model, train, config, seed=0, progress=True)
        for epoch in range(trainer.epochs):
            trainer.run_epoch(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        prunelab.save_model(path, model)
    prunelab.load_model(path, model)
    return model.state_dict()


def prune_to(ratio: float, train, example, weights=None, method: str = "pfp", round_to: int = 1) -> tuple:
    model = prunelab.build_model("resnet56", seed=0)
    if weights is not None:
        model.load_state_dict(weights)
    options = {"round_to": round_to, "sparsity": ratio} if method == "pfp" else {"channels": ratio}
    prunelab.prune(model, method, data=train, seed=0, **options)
    small, report = prunelab.compact(model, example[:16])
    costs = structure.structured_metrics(model, small, example[:1], latency=False)
    return model, small, report, costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fr", type=float, default=0.5, help="FLOP reduction to reach")
    parser.add_argument("--method", choices=["pfp", "pfec"], default="pfp",
                        help="pfec (uniform L1 filter pruning of each block's first conv) for comparison")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=None, help="PFP prune ratio to use (skips the search)")
    parser.add_argument("--round-to", type=int, default=1,
                        help="pfp option round_to: channel counts rounded to multiples of this (1 = the paper)")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="train ResNet-56 this long before pruning (PFP's choice of channels depends on it)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # training and pruning; the timing sets its own thread counts

    train, _, test = prunelab.load_dataset("cifar10", val_fraction=0.1, seed=0)
    example = test.inputs[:args.batch]
    weights = trained_weights(train, args.train_epochs)
    low, high, best = 0.5, 0.98, None  # PFP ratio 0.5 removes only about 21% of the FLOPs here
    for _ in range(1 if args.ratio else 12):  # bisection on PFP's prune ratio; FR grows with it
        ratio = args.ratio or (low + high) / 2
        model, small, report, costs = prune_to(ratio, train, example, weights, args.method, args.round_to)
        print(f"{args.method} ratio {ratio:.4f}: FR {costs['fr']:.2%}, PR {costs['pr']:.2%}", flush=True)
        if best is None or abs(costs["fr"] - args.fr) < abs(best[3]["fr"] - args.fr):
            best = (ratio, model, small, costs, report)
        if abs(costs["fr"] - args.fr) < 0.01:
            break
        low, high = (ratio, high) if costs["fr"] < args.fr else (low, ratio)
    ratio, model, small, costs, report = best
    timings = {}
    for threads in args.threads:
        for layout in ("contiguous", "channels_last"):
            timed = structure.structured_metrics(model, small, example, threads=threads, min_run_time=2.0,
                                                 channels_last=layout == "channels_last")
            timings[f"{threads}/{layout}"] = lat = timed["latency_ms"]
            print(f"{threads} thread(s), batch {args.batch}, {layout}: dense {lat['dense']:.1f} ms, "
                  f"compact {lat['small']:.1f} ms, speed-up {lat['speedup']:.2f}x", flush=True)
        fastest = {k: min(timings[f"{threads}/{layout}"][k] for layout in ("contiguous", "channels_last"))
                   for k in ("dense", "small")}
        timings[f"{threads}/fastest"] = {**fastest, "speedup": fastest["dense"] / fastest["small"]}
        print(f"{threads} thread(s), each model in its faster layout: dense {fastest['dense']:.1f} ms, "
              f"compact {fastest['small']:.1f} ms, speed-up {fastest['dense'] / fastest['small']:.2f}x",
              flush=True)
    widths = {n: [m.in_channels, m.out_channels] for n, m in small.named_modules()
              if isinstance(m, torch.nn.Conv2d)}
    result = {"benchmark": "pfp_resnet56_speed", "model": "resnet56", "train_epochs": args.train_epochs,
              "method": args.method, "round_to": args.round_to, "ratio": ratio, "fr": costs["fr"],
              "pr": costs["pr"], "params": costs["params"], "flops": costs["flops"],
              "compact_max_abs_diff": report.max_abs_diff, "gathered_layers": len(report.plan["gathered"]),
              "conv_channels_in_out": widths, "batch": args.batch, "latency_ms": timings,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}}
    suffix = ("" if args.method == "pfp" else f"_{args.method}") \
        + (f"_round{args.round_to}" if args.round_to > 1 else "")
    checkpoint.write_json(ROOT / "benchmarks" / "results" / f"pfp_resnet56_speed{suffix}.json", result)


if __name__ == "__main__":
    main()
