"""Deployment of an unstructured-pruned LeNet-300-100: file sizes and inference latency (issue 18).

For each sparsity (global magnitude pruning): the dense checkpoint (``save_model``), the sparse file
(``prunelab.sparse.save_sparse``), the same with float16 values, and gzip of the sparse file (for
reference); then, per thread count and batch size, the latency of the plain dense model (masks made
permanent), the masked model (hooks and all) and the ``sparsify``'d model, timed in alternating rounds in
one run; the figures are medians and their ratios.

    PRUNELAB_DATA=/work/shared/datasets python benchmarks/deployment.py [--train-epochs 1] [--threads 1 2]

With ``--train-epochs 0`` the weights are the random initialisation (sizes and timings barely depend on
the values; which layer gets how much sparsity does, under global pruning).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import platform
import tempfile
from pathlib import Path

import torch

import prunelab
from prunelab import masking
from prunelab.checkpoint import write_json
from prunelab.inference import sparsify, time_alternating
from prunelab.sparse import save_sparse

SPARSITIES = (0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 64, 100)


def base_model(train_epochs: int) -> tuple[torch.nn.Module, str]:
    model = prunelab.build_model("lenet300-100", seed=0)
    if train_epochs <= 0:
        return model, "random init (seed 0)"
    from prunelab.training import TrainConfig, Trainer
    train, _, _ = prunelab.load_dataset("mnist")
    config = TrainConfig(epochs=train_epochs, batch_size=100, lr=0.01, momentum=0.9, weight_decay=5e-4)
    trainer = Trainer(model, train, config, seed=0, progress=False)
    for epoch in range(train_epochs):
        trainer.run_epoch(epoch)
    return model, f"trained {train_epochs} epoch(s) on MNIST (SGD lr 0.01, momentum 0.9, batch 100, seed 0)"


def sizes(model: torch.nn.Module, folder: Path, sparsity: float) -> dict:
    dense_path, sparse_path, half_path = (folder / f"{kind}_{sparsity}.safetensors"
                                          for kind in ("dense", "sparse", "sparse16"))
    prunelab.save_model(dense_path, model)
    info = save_sparse(sparse_path, model)
    save_sparse(half_path, model, values_dtype=torch.float16)
    dense, sparse, half = (p.stat().st_size for p in (dense_path, sparse_path, half_path))
    gz = len(gzip.compress(sparse_path.read_bytes(), compresslevel=9))
    return {"dense_bytes": dense, "sparse_bytes": sparse, "sparse_fp16_bytes": half, "sparse_gzip_bytes": gz,
            "dense_over_sparse": round(dense / sparse, 2), "dense_over_sparse_fp16": round(dense / half, 2),
            "encodings": info["encodings"]}


@torch.no_grad()
def latency(masked: torch.nn.Module, batch: int, threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    dense = copy.deepcopy(masked).eval()
    masking.make_permanent(dense)
    masked = masked.eval()
    fast, report = sparsify(masked, x, threads=threads, rounds=rounds)
    times = time_alternating({"dense": lambda: dense(x), "masked": lambda: masked(x),
                              "sparsified": lambda: fast(x)}, rounds)
    return {"batch": batch, "threads": threads,
            "dense_us": round(times["dense"] * 1e6, 2), "masked_us": round(times["masked"] * 1e6, 2),
            "sparsified_us": round(times["sparsified"] * 1e6, 2),
            "speedup_vs_dense": round(times["dense"] / times["sparsified"], 3),
            "speedup_vs_masked": round(times["masked"] / times["sparsified"], 3),
            "sparse_layers": report.replaced,
            "layers": [{k: layer[k] for k in ("name", "sparsity", "dense_us", "sparse_us", "speedup", "choice")}
                       for layer in report.layers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--out", default="benchmarks/results/deployment.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, weights = base_model(args.train_epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in SPARSITIES:
            model = copy.deepcopy(base)
            prunelab.prune(model, "magnitude", sparsity)
            row = {"sparsity": sparsity,
                   "layer_sparsity": {n: round(1 - float(m.float().mean()), 4) for n, m in prunelab.masks(model).items()},
                   **sizes(model, Path(tmp), sparsity), "latency": []}
            for threads in args.threads:
                for batch in BATCHES:
                    row["latency"].append(latency(model, batch, threads, args.rounds))
            rows.append(row)
    torch.set_num_threads(1)
    print(f"{'sparsity':>8} {'dense B':>9} {'sparse B':>9} {'fp16 B':>8} {'gzip B':>8} {'ratio':>6} {'ratio16':>7}")
    for row in rows:
        print(f"{row['sparsity']:8.2f} {row['dense_bytes']:9d} {row['sparse_bytes']:9d} "
              f"{row['sparse_fp16_bytes']:8d} {row['sparse_gzip_bytes']:8d} {row['dense_over_sparse']:6.1f} "
              f"{row['dense_over_sparse_fp16']:7.1f}")
    print(f"\n{'sparsity':>8} {'thr':>3} {'batch':>5} {'dense us':>9} {'masked us':>9} {'sparse us':>9} "
          f"{'x dense':>7} {'x masked':>8}  sparse layers")
    for row in rows:
        for lat in row["latency"]:
            print(f"{row['sparsity']:8.2f} {lat['threads']:3d} {lat['batch']:5d} {lat['dense_us']:9.1f} "
                  f"{lat['masked_us']:9.1f} {lat['sparsified_us']:9.1f} {lat['speedup_vs_dense']:7.2f} "
                  f"{lat['speedup_vs_masked']:8.2f}  {','.join(lat['sparse_layers']) or '-'}")
    write_json(args.out, {"benchmark": "deployment", "model": "lenet300-100", "method": "magnitude (global)",
                          "weights": weights, "rounds": args.rounds, "threads": args.threads,
                          "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                          "note": "machine shared with other jobs (2 cores); latencies are medians of "
                                  "alternating rounds, ratios within one run",
                          "rows": rows})


if __name__ == "__main__":
    main()
