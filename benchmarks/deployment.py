"""Deployment of pruned models: file sizes and inference latency (issue 18).

For each sparsity (global magnitude pruning): the dense checkpoint (``save_model``), the sparse file
(``prunelab.sparse.save_sparse``), the same with float16 values, and gzip of the sparse file (for
reference); then, per thread count and batch size, the latency of the plain dense model (masks made
permanent), the masked model (hooks and all) and the ``sparsify``'d model, timed in alternating rounds in
one run; the figures are medians and their ratios. ONNX Runtime (one thread): the masked model exported
with its masks folded (``prunelab.export.export``) against the unpruned model, at batch 1 and 64.

ResNet-56 (random init, structured pruning to about 50% fewer multiply-adds, FR from
``structured_metrics``): PFEC with the channel fraction and PFP with the ``sparsity`` target chosen so that
the compact model's FR is closest to 0.5; file sizes of the masked model (``save_model``), its sparse
file (``save_sparse``) and the compact model (``save_compact``); latency at batch 1 and 64 of the dense
model (masks folded) against the compact model, in PyTorch and in ONNX Runtime, alternating rounds.

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
from prunelab.export import deployable, export
from prunelab.structure import save_compact, structured_metrics
from prunelab.inference import sparsify, time_alternating
from prunelab.sparse import save_sparse

SPARSITIES = (0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 64, 100)
ORT_BATCHES = (1, 64)
RESNET_BATCHES = (1, 64)
FR_TARGET = 0.5


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


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_files(model: torch.nn.Module, dense: torch.nn.Module, example: torch.Tensor, folder: Path,
               stem: str) -> tuple[dict, dict]:
    """ONNX files (dynamic batch, checked against PyTorch by ``export``) of ``model`` (masks folded) and
    of ``dense``; returns their sessions and sizes."""
    sessions, info = {}, {}
    for kind, net in (("pruned", model), ("dense", dense)):
        report = export(net, example, folder / f"{stem}_{kind}.onnx", latency=False)
        if not report.dynamic_batch:
            raise RuntimeError(f"{stem} {kind}: ONNX export without a dynamic batch")
        sessions[kind] = _ort_session(Path(report.path))
        info[f"{kind}_onnx_bytes"] = report.bytes
        info[f"{kind}_max_abs_diff"] = report.max_abs_diff
    return sessions, info


def _ort_times(sessions: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    feed = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    return time_alternating({k: (lambda s=s, f=feed[k]: s.run(None, f)) for k, s in sessions.items()}, rounds)


def lenet_onnxruntime(model: torch.nn.Module, base: torch.nn.Module, folder: Path, sparsity: float,
                      rounds: int) -> dict:
    """ONNX Runtime, one thread: the masked model exported with its masks folded (zeros in dense weights)
    against the unpruned model, batch 1 and 64."""
    example = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    sessions, info = _ort_files(model, base, example, folder, f"lenet_{sparsity}")
    out = {**info, "latency": []}
    for batch in ORT_BATCHES:
        x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        t = _ort_times(sessions, x, rounds)
        out["latency"].append({"batch": batch, "threads": 1, "dense_us": round(t["dense"] * 1e6, 2),
                               "folded_us": round(t["pruned"] * 1e6, 2),
                               "speedup_vs_dense": round(t["dense"] / t["pruned"], 3)})
    return out


def _structured(base: torch.nn.Module, method: str, target: str, amount: float, data, example):
    model = copy.deepcopy(base)
    prunelab.prune(model, method, data=data, **{target: amount})
    model.eval()
    small, report = prunelab.compact(model, example, name="resnet56")
    metrics = structured_metrics(model, small, example, latency=False)
    return model, small, report, metrics


def tune(base: torch.nn.Module, method: str, target: str, low: float, high: float, data, example,
         steps: int) -> tuple[float, list[dict], tuple]:
    """Bisection of the target amount (FR grows with it) for FR closest to FR_TARGET; every try is kept."""
    tries, best = [], None
    for _ in range(steps):
        amount = round((low + high) / 2, 4)
        result = _structured(base, method, target, amount, data, example)
        fr = result[3]["fr"]
        tries.append({target: amount, "fr": round(fr, 4), "pr": round(result[3]["pr"], 4)})
        if best is None or abs(fr - FR_TARGET) < abs(best[1][3]["fr"] - FR_TARGET):
            best = (amount, result)
        if fr < FR_TARGET:
            low = amount
        else:
            high = amount
    return best[0], tries, best[1]


@torch.no_grad()
def resnet_row(base: torch.nn.Module, method: str, target: str, low: float, high: float, steps: int, data,
               folder: Path, rounds: int, ort_rounds: int) -> dict:
    example = data[0][:8]
    amount, tries, (model, small, report, metrics) = tune(base, method, target, low, high, data, example, steps)
    paths = {k: folder / f"resnet56_{method}_{k}.safetensors" for k in ("dense", "sparse", "compact")}
    prunelab.save_model(paths["dense"], model)
    save_sparse(paths["sparse"], model)
    save_compact(paths["compact"], small, report.plan, name="resnet56")
    unpruned = folder / "resnet56_unpruned.safetensors"
    prunelab.save_model(unpruned, base)
    size = {k: p.stat().st_size for k, p in paths.items()}
    row = {"method": method, target: amount, "tuning": tries,
           "fr": round(metrics["fr"], 4), "pr": round(metrics["pr"], 4), "params": metrics["params"],
           "flops": metrics["flops"], "compact_max_abs_diff": report.max_abs_diff,
           "unpruned_bytes": unpruned.stat().st_size,
           "dense_bytes": size["dense"], "sparse_bytes": size["sparse"], "compact_bytes": size["compact"],
           "dense_over_sparse": round(size["dense"] / size["sparse"], 2),
           "dense_over_compact": round(size["dense"] / size["compact"], 2)}
    dense_net, small_net = deployable(model), deployable(small)  # masks folded, no hooks, eval
    row["latency_torch"] = []
    for batch in RESNET_BATCHES:
        torch.set_num_threads(1)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        t = time_alternating({"dense": lambda: dense_net(x), "compact": lambda: small_net(x)}, rounds)
        row["latency_torch"].append({"batch": batch, "threads": 1, "dense_ms": round(t["dense"] * 1e3, 3),
                                     "compact_ms": round(t["compact"] * 1e3, 3),
                                     "speedup": round(t["dense"] / t["compact"], 3)})
    sessions, info = _ort_files(small, model, example[:2], folder, f"resnet56_{method}")
    row["onnx"] = {"compact_onnx_bytes": info["pruned_onnx_bytes"], "dense_onnx_bytes": info["dense_onnx_bytes"],
                   "compact_max_abs_diff": info["pruned_max_abs_diff"]}
    row["latency_onnxruntime"] = []
    for batch in RESNET_BATCHES:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        t = _ort_times({"dense": sessions["dense"], "compact": sessions["pruned"]}, x, ort_rounds)
        row["latency_onnxruntime"].append({"batch": batch, "threads": 1, "dense_ms": round(t["dense"] * 1e3, 3),
                                           "compact_ms": round(t["compact"] * 1e3, 3),
                                           "speedup": round(t["dense"] / t["compact"], 3)})
    return row


def resnet56(rounds: int, ort_rounds: int, folder: Path) -> dict:
    base = prunelab.build_model("resnet56", seed=0).eval()
    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = (x, torch.zeros(128, dtype=torch.long))
    rows = [resnet_row(base, "pfec", "channels", 0.4, 0.6, 5, data, folder, rounds, ort_rounds),
            resnet_row(base, "pfp", "sparsity", 0.5, 0.95, 7, data, folder, rounds, ort_rounds)]
    return {"model": "resnet56", "weights": "random init (seed 0); no training: sizes and timings only "
                                             "(which channels go depends on the weights, how many on the target)",
            "data": "128 seeded standard-normal images (seed 0), zero labels (PFP's sensitivity sample; "
                    "PFEC needs none)",
            "fr_target": FR_TARGET, "target_search": "bisection of the method's target; the try with FR "
                                                       "closest to the target is kept (all tries listed)",
            "dense": "the masked model with its masks folded (same architecture, zeros in the weights)",
            "rounds_torch": rounds, "rounds_onnxruntime": ort_rounds, "threads": 1,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--resnet-rounds", type=int, default=11)
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
            torch.set_num_threads(1)
            row["onnxruntime"] = lenet_onnxruntime(model, base, Path(tmp), sparsity, args.rounds)
            rows.append(row)
        resnet = resnet56(args.resnet_rounds, args.resnet_rounds, Path(tmp))
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
    print(f"\nonnxruntime, 1 thread: {'sparsity':>8} {'batch':>5} {'dense us':>9} {'folded us':>9} {'x dense':>7}")
    for row in rows:
        for lat in row["onnxruntime"]["latency"]:
            print(f"{'':22}{row['sparsity']:8.2f} {lat['batch']:5d} {lat['dense_us']:9.1f} {lat['folded_us']:9.1f} "
                  f"{lat['speedup_vs_dense']:7.2f}")
    print(f"\nresnet56 {'method':>6} {'FR':>6} {'PR':>6} {'dense B':>9} {'sparse B':>9} {'compact B':>9}")
    for row in resnet["rows"]:
        print(f"{'':9}{row['method']:>6} {row['fr']:6.3f} {row['pr']:6.3f} {row['dense_bytes']:9d} "
              f"{row['sparse_bytes']:9d} {row['compact_bytes']:9d}")
        for engine in ("torch", "onnxruntime"):
            for lat in row[f"latency_{engine}"]:
                print(f"{'':16}{engine:>12} batch {lat['batch']:3d}: dense {lat['dense_ms']:9.3f} ms, compact "
                      f"{lat['compact_ms']:9.3f} ms, x{lat['speedup']:.2f}")
    write_json(args.out, {"benchmark": "deployment", "model": "lenet300-100", "method": "magnitude (global)",
                          "weights": weights, "rounds": args.rounds, "threads": args.threads,
                          "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                          "note": "machine shared with other jobs (2 cores); latencies are medians of "
                                  "alternating rounds, ratios within one run",
                          "onnxruntime_version": _ort_version(),
                          "rows": rows, "resnet56": resnet})


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
