"""What one score-and-prune call of each method costs, in training steps of the same network.

    PRUNELAB_DATA=/path/to/datasets python benchmarks/scoring_cost.py [--models lenet300-100 resnet56]
        [--methods pfp relief] [--rounds 3] [--val 1000] [--out benchmarks/results/scoring_cost]

For each model and method: the CPU time of ``prunelab.prune`` (drawing its data, scoring, selecting,
attaching the masks) on a freshly built network, divided by the CPU time of one SGD training step at
batch 128 (forward, backward, update) of the same network. One thread (``torch.set_num_threads(1)``); each
round measures a training step (median of two, after a warm-up step) right before every method, so that
every ratio pairs two measurements taken moments apart, and the reported ratio is the median over rounds.
CPU time of the process (``time.process_time``) rather than wall time: on a shared machine it does not
count the time other jobs hold the core (wall times are recorded too).

Methods run with their defaults and a 50% target (``sparsity`` or ``channels``; ``relief`` sets its own).
"lobster-phase" is one LOBSTER pruning phase as the lab runs it: one
``prunelab.criteria.lobster.find_threshold`` with the early exit, on the first ``--val`` validation images
in batches of ``--eval-batch`` (100, set in the lab by ``eval_batch_size``, default 1000: large batches of
a CNN's activations run slower on this CPU); its cost is linear in the number of images (the lab uses the
whole validation split). The network is trained for ``--lobster-steps`` SGD steps first (cached in
runs/scoring_cost/): at initialisation every threshold keeps the loss near log(10), and the bisection runs
to its width limit (34 trials) instead of the 5-12 of a trained network. isparse and nisp refuse residual
networks: recorded as "refused" with the reason. The other methods score networks at initialisation (only
relief's sparsity depends on training).
Writes OUT.json, OUT.md and OUT.png (ratio against parameter count).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunelab
from prunelab import PrunelabError, checkpoint
from prunelab.criteria.lobster import covered_parameters, find_threshold
from prunelab.training import evaluate

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["lenet300-100", "lenet5-caffe", "resnet20", "resnet56"]
METHODS = {  # method -> target of the call
    "magnitude": {"sparsity": 0.5}, "random": {"sparsity": 0.5}, "snip": {"sparsity": 0.5},
    "grasp": {"sparsity": 0.5}, "synflow": {"sparsity": 0.5}, "pfp": {"sparsity": 0.5},
    "pfec": {"channels": 0.5}, "softnet": {"channels": 0.5}, "relief": {}, "isparse": {"sparsity": 0.5},
    "retrain-free": {"sparsity": 0.5}, "nisp": {"channels": 0.5}, "lobster-phase": None,
}
BATCH = 128


def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def train_step_seconds(name: str, batch) -> tuple[float, float]:
    """CPU and wall seconds of one SGD step at batch 128 (median of two, after a warm-up step)."""
    model = prunelab.build_model(name, seed=0)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = batch
    times = []
    for step in range(3):
        cpu, wall = clock()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step:  # the first step allocates the optimizer state and warms the kernels
            times.append((time.process_time() - cpu, time.perf_counter() - wall))
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def trained_briefly(name: str, train, steps: int) -> dict:
    """The network's weights after ``steps`` SGD steps at batch 128 (lr 0.01, momentum 0.9: LeNet-5-Caffe
    without ReLU diverges at 0.05), cached."""
    path = ROOT / "runs" / "scoring_cost" / f"{name}_sgd{steps}_lr0.01.safetensors"
    if path.exists():
        return checkpoint.load_tensors(path)[0]
    model = prunelab.build_model(name, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        batch = order[(step * BATCH) % len(order):][:BATCH]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(train.inputs[batch]), train.targets[batch]).backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(path, state)
    return state


def prune_seconds(name: str, method: str, splits, val_images: int, trained: dict | None = None,
                  eval_batch: int = 100) -> tuple[float, float, dict]:
    """CPU and wall seconds of one score-and-prune call on a fresh network, and what it did."""
    model = prunelab.build_model(name, seed=0)
    train, val = splits.train, splits.val
    if method == "lobster-phase":
        model.load_state_dict(trained)
        data = (val.inputs[:val_images], val.targets[:val_images])
        params = covered_parameters(model)
        stopped = []

        def loss_at(stop_above=None):
            result = evaluate(model, data, eval_batch, stop_above=stop_above)
            stopped.append(bool(result.get("stopped")))
            return result["loss"]

        cpu, wall = clock()
        search = find_threshold(model, params, loss_at, twt=0.05, early_exit=True)
        spent = time.process_time() - cpu, time.perf_counter() - wall
        return (*spent, {"evaluations": search.evaluations, "stopped_early": sum(stopped),
                         "val_images": val_images, "eval_batch": eval_batch})
    cpu, wall = clock()
    report = prunelab.prune(model, method, data=train, seed=0, **METHODS[method])
    spent = time.process_time() - cpu, time.perf_counter() - wall
    return (*spent, {"sparsity": round(report.sparsity, 4)})


def measure(name: str, methods: list[str], rounds: int, val_images: int, lobster_steps: int,
            eval_batch: int) -> dict:
    info = {m.name: m for m in prunelab.list_models()}[name]
    splits = prunelab.load_dataset(info.default_dataset, val_fraction=0.1, seed=0)
    trained = trained_briefly(name, splits.train, lobster_steps) if "lobster-phase" in methods else None
    batch = (splits.train.inputs[:BATCH], splits.train.targets[:BATCH])
    model = prunelab.build_model(name, seed=0)
    result = {"params": sum(p.numel() for p in model.parameters()), "dataset": info.default_dataset,
              "methods": {}}
    refused = {}
    runs = {m: [] for m in methods}
    for r in range(rounds):
        for method in methods:
            if method in refused:
                continue
            step_cpu, step_wall = train_step_seconds(name, batch)
            try:
                cpu, wall, what = prune_seconds(name, method, splits, val_images, trained, eval_batch)
            except PrunelabError as error:
                refused[method] = str(error)
                continue
            runs[method].append({"seconds": cpu, "wall_seconds": wall, "step_seconds": step_cpu,
                                 "step_wall_seconds": step_wall, "ratio": cpu / step_cpu, **what})
            print(f"{name} round {r + 1} {method}: {cpu:.2f} s CPU = {cpu / step_cpu:.2f} steps "
                  f"(step {step_cpu:.3f} s)", flush=True)
    for method in methods:
        if method in refused:
            result["methods"][method] = {"status": "refused", "reason": refused[method]}
            continue
        rows = runs[method]
        result["methods"][method] = {
            "status": "ok", "ratio": statistics.median(x["ratio"] for x in rows),
            "seconds": statistics.median(x["seconds"] for x in rows),
            "step_seconds": statistics.median(x["step_seconds"] for x in rows), "rounds": rows}
    return result


def table(results: dict, models: list[str], methods: list[str]) -> str:
    head = "| method | " + " | ".join(f"{m} ({results[m]['params']:,} params)" for m in models) + " |"
    lines = [head, "|---" * (len(models) + 1) + "|"]
    for method in methods:
        cells = []
        for m in models:
            entry = results[m]["methods"].get(method)
            cells.append("" if entry is None else "refused" if entry["status"] == "refused"
                         else f"{entry['ratio']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail(results: dict, model: str, methods: list[str]) -> str:
    lines = [f"| method | steps of batch 128 | CPU s | step CPU s | rounds |", "|---|---|---|---|---|"]
    for method in methods:
        entry = results[model]["methods"].get(method)
        if entry is None:
            continue
        if entry["status"] == "refused":
            lines.append(f"| {method} | refused: {entry['reason']} | | | |")
        else:
            lines.append(f"| {method} | {entry['ratio']:.2f} | {entry['seconds']:.2f} | {entry['step_seconds']:.3f}"
                         f" | {len(entry['rounds'])} |")
    return "\n".join(lines)


def plot(results: dict, methods: list[str], path: Path) -> None:
    """Ratio against parameter count: one colour per method, ResNets joined by solid lines, the MLP and
    LeNet by dashed ones (two families: a line across them would suggest a trend that is not there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    colours = plt.get_cmap("tab20").colors
    markers = "osD^v<>pPX*hd"
    models = sorted(results, key=lambda m: results[m]["params"])
    for i, method in enumerate(methods):
        label = method  # on the first line drawn for the method only
        for family, style in (([m for m in models if m.startswith("resnet")], "-"),
                              ([m for m in models if not m.startswith("resnet")], "--")):
            points = [(results[m]["params"], results[m]["methods"][method]["ratio"]) for m in family
                      if results[m]["methods"].get(method, {}).get("status") == "ok"]
            if points:
                ax.plot(*zip(*points), linestyle=style, marker=markers[i % len(markers)],
                        color=colours[i % len(colours)], label=label)
                label = None
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="10 steps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = {}
    for m in models:  # models of nearly equal size share a tick
        near = next((t for t in ticks if abs(t / results[m]["params"] - 1) < 0.05), None)
        ticks.setdefault(near or results[m]["params"], []).append(m)
    ax.set_xticks(list(ticks), ["\n".join(names) for names in ticks.values()], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("parameters (log scale; solid: ResNets, dashed: LeNet-300-100 and LeNet-5-Caffe)")
    ax.set_ylabel("score-and-prune CPU time / one training step (batch 128)")
    ax.set_title("Pruning cost in training steps, 1 CPU thread (refused: isparse and nisp on ResNets)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--val", type=int, default=1000, help="validation images of the LOBSTER phase")
    parser.add_argument("--lobster-steps", type=int, default=100, help="SGD steps before the LOBSTER phase")
    parser.add_argument("--eval-batch", type=int, default=100,
                        help="the LOBSTER phase's evaluation batch (the lab's eval_batch_size)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scoring_cost"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    results = {}
    if out.with_suffix(".json").exists():  # models and methods measured before (another invocation) are kept
        results = checkpoint.read_json(out.with_suffix(".json")).get("models", {})
    if args.report_only:
        write(results, args, out)
        return
    for name in args.models:
        measured = measure(name, args.methods, args.rounds, args.val, args.lobster_steps, args.eval_batch)
        if name in results:  # a rerun of some methods keeps the others' entries
            measured["methods"] = {**results[name]["methods"], **measured["methods"]}
        results[name] = measured
        write(results, args, out)


def write(results: dict, args, out: Path) -> None:
    models = sorted(results, key=lambda m: results[m]["params"])
    methods = list(METHODS)
    payload = {"benchmark": "scoring_cost", "unit": "CPU time of prunelab.prune / CPU time of one SGD step at "
               "batch 128, same network, 1 thread, median over rounds", "target": "sparsity or channels 0.5",
               "lobster_val_images": args.val, "lobster_train_steps": args.lobster_steps,
               "lobster_eval_batch": args.eval_batch, "models": results,
               "environment": {"torch": torch.__version__, "python": platform.python_version(),
                               "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                               "date": time.strftime("%Y-%m-%d")}}
    checkpoint.write_json(out.with_suffix(".json"), payload)
    text = ["# Score-and-prune cost in training steps", "",
            "`python benchmarks/scoring_cost.py` (see its docstring). Each entry: CPU time of one "
            "`prunelab.prune` call (50% target; relief sets its own) divided by the CPU time of one SGD step "
            f"at batch 128 of the same network, 1 thread, median over rounds. lobster-phase: one threshold "
            f"search with the early exit on {args.val} validation images in batches of {args.eval_batch}, after "
            f"{args.lobster_steps} SGD steps (trials and early stops in its section). Other networks at "
            "initialisation.", "",
            table(results, models, methods), ""]
    for m in models:
        text += [f"## {m}", "", detail(results, m, methods), ""]
    out.with_suffix(".md").write_text("\n".join(text))
    plot(results, methods, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
