"""Time to load MNIST and CIFAR-10 in a new process, without and with the decoded-data cache.

Each round runs, per dataset, a cold load (its cache entry removed first: MD5 check, decode, cache
write) then a warm load (from the entry), each in a fresh Python process so nothing is reused in
memory; the figures are medians over the rounds. Only load_dataset() is timed, not the imports.
A third process per round times just allocating and filling float32 tensors of the size the load
returns: no load can be faster than that, so it shows how much of a warm load is the cache itself.

The cache goes to a temporary folder ($PRUNELAB_CACHE), so the data root and the user cache are
never written to and the cold runs can delete entries safely.

    python benchmarks/data_load.py [--root ../shared/datasets] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch
from prunelab.data import load_dataset
name, root, mode = sys.argv[1:4]
start = time.perf_counter()
if mode == "load":
    splits = load_dataset(name, root=root, download=False)
    shape = [sum(len(s) for s in splits), *splits.train.inputs.shape[1:]]
else:  # "alloc": the unavoidable part, the float32 outputs alone
    shape = json.loads(sys.argv[4])
    torch.empty(shape, dtype=torch.float32).fill_(0.5)
print(json.dumps({"seconds": time.perf_counter() - start, "shape": shape, "threads": torch.get_num_threads()}))
"""


def child(name: str, root: Path, mode: str, env: dict, shape: list | None = None) -> dict:
    """Run one timed load (or allocation) in a fresh interpreter and return its JSON report."""
    args = [sys.executable, "-c", CHILD, name, str(root), mode] + ([json.dumps(shape)] if shape else [])
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    """Alternate cold and warm loads per dataset, print the medians and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("PRUNELAB_DATA", "../shared/datasets"))
    parser.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/data_load.json")
    args = parser.parse_args()
    root = Path(args.root).expanduser().resolve()
    cache_dir = Path(tempfile.mkdtemp(prefix="prunelab-decoded-"))
    env = {**os.environ, "PRUNELAB_CACHE": str(cache_dir), "OMP_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    rows = []
    try:
        for name in args.datasets:
            cold, warm, alloc = [], [], []
            for _ in range(args.rounds):
                for entry in cache_dir.glob(f"{name}-*.safetensors"):
                    entry.unlink()
                cold.append(child(name, root, "load", env))
                warm.append(child(name, root, "load", env))
                alloc.append(child(name, root, "alloc", env, warm[-1]["shape"]))
            [entry] = cache_dir.glob(f"{name}-*.safetensors")
            row = {"dataset": name, "cold_s": [r["seconds"] for r in cold], "warm_s": [r["seconds"] for r in warm],
                   "output_alloc_s": [r["seconds"] for r in alloc],
                   "output_shape": warm[-1]["shape"], "entry_bytes": entry.stat().st_size}
            for kind in ("cold", "warm", "output_alloc"):
                row[f"{kind}_median_s"] = statistics.median(row[f"{kind}_s"])
            rows.append(row)
            print(f"{name:<8} cold {row['cold_median_s']:.3f} s  warm {row['warm_median_s']:.3f} s  "
                  f"(allocating the outputs alone: {row['output_alloc_median_s']:.3f} s; entry "
                  f"{row['entry_bytes'] / 1e6:.0f} MB)", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    import torch  # only for the machine facts; the timed loads ran in their own processes
    from prunelab.checkpoint import write_json
    write_json(args.out, {
        "benchmark": "data_load", "target_warm_s": 0.5, "rounds": args.rounds, "root": str(root),
        "threads": warm[-1]["threads"], "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "date": time.strftime("%Y-%m-%d"), "rows": rows,
    })


if __name__ == "__main__":
    main()
