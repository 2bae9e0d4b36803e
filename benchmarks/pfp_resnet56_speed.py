"""Is a PFP-pruned ResNet-56 really faster? Channel masks -> physically smaller model -> CPU latency.

    PRUNELAB_DATA=/path/to/datasets python benchmarks/pfp_resnet56_speed.py [--fr 0.5] [--threads 1 2] [--ratio R]
    PRUNELAB_DATA=/path/to/datasets python benchmarks/pfp_resnet56_speed.py --structured [--train-epochs 2]

Builds ResNet-56 (option A) for CIFAR-10, prunes it with PFP channel masks (S drawn from the CIFAR-10
training split) at the prune ratio whose physically smaller model removes ``--fr`` of the FLOPs (found
by bisection), compacts it (``prunelab.compact``, outputs checked against the masked model; layers whose
masked input channels are still read elsewhere gather their used inputs) and times both models at batch
64 with ``torch.utils.benchmark`` for each thread count, in both memory layouts (contiguous NCHW and
channels-last), and reports each model in its faster layout. FLOPs and latency depend only on the
channel counts, but which channels PFP keeps depends on the weights: ``--train-epochs N`` trains the
network briefly first (a full CIFAR schedule does not fit this CPU). ``--round-to 8`` sets PFP's
round_to option. Writes benchmarks/results/pfp_resnet56_speed[_pfec|_softnet][_roundN].json.

``--structured`` measures every structured method in one run: PFP as in the paper (round_to 1), PFP with
``round_to`` 8 and ``"auto"`` (ours: the channel multiple probed on this CPU, ``prunelab.backend_probe``),
PFP with ``allocation="latency"`` (ours: per-layer error levels from measured layer latency), PFEC and
SoftNet, each at the ratio whose compact model removes ``--fr`` of the multiply-adds (PFP: one scoring
pass, the ratio searched with ``PFPPlan.at``). Batch 64, one thread, in NCHW and channels-last; in each of
``--rounds`` rounds (>= 7) the dense model and every compact one are timed in turn, whole and per ResNet
stage (layer1/2/3 on their own inputs; "other" = the stem conv and the pooling + classifier head), each
round's value being the fastest call of that round (at least 0.3 s of calls: other jobs only add time),
and the median round is reported. Writes benchmarks/results/structured_speed.json and .md.
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
from prunelab import backend_probe, checkpoint, masking, metrics, structure
from prunelab.criteria import pfp

STAGES = ("layer1", "layer2", "layer3")
PARTS = ("whole", "stem", *STAGES, "head")  # timed on their own inputs; other = stem + head

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


def prune_to(ratio: float, train, example, weights=None, method: str = "pfp", round_to: int | str = 1) -> tuple:
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
    parser.add_argument("--method", choices=["pfp", "pfec", "softnet"], default="pfp",
                        help="pfec / softnet (uniform L1 / L2 filter pruning of each block's first conv) for "
                             "comparison")
    parser.add_argument("--structured", action="store_true",
                        help="every structured method, per-stage timings: writes structured_speed.json/.md")
    parser.add_argument("--rounds", type=int, default=11, help="--structured: alternating timing rounds (>= 7)")
    parser.add_argument("--pfp", nargs="+", default=["1", "8", "auto", "1:latency", "auto:latency"],
                        metavar="ROUND_TO[:latency]",
                        help="--structured: the PFP variants to measure: round_to, and ':latency' for "
                             "allocation='latency'")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=None, help="PFP prune ratio to use (skips the search)")
    parser.add_argument("--round-to", default="1",
                        help="pfp option round_to: channel counts rounded to multiples of this (1 = the paper; "
                             "auto = the step probed on this CPU)")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="train ResNet-56 this long before pruning (PFP's choice of channels depends on it)")
    args = parser.parse_args()
    args.round_to = _round_to(args.round_to)
    torch.set_num_threads(1)  # training and pruning; the timing sets its own thread counts

    train, _, test = prunelab.load_dataset("cifar10", val_fraction=0.1, seed=0)
    example = test.inputs[:args.batch]
    weights = trained_weights(train, args.train_epochs)
    if args.structured:
        structured(args, train, example, weights)
        return
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
        + (f"_round{args.round_to}" if args.round_to != 1 else "")
    checkpoint.write_json(ROOT / "benchmarks" / "results" / f"pfp_resnet56_speed{suffix}.json", result)


def _round_to(text: str) -> int | str:
    return text if text == "auto" else int(text)


# --- --structured: every structured method, per-stage timings ---------------------------------------------

def _search(make, fr: float, low: float, high: float, steps: int = 14) -> tuple:
    """Bisection on a prune ratio for the compact model's FLOP reduction (it grows with the ratio);
    ``make(ratio)`` returns (masked model, compact model, report, costs). The closest ratio wins."""
    best = None
    for _ in range(steps):
        ratio = (low + high) / 2
        found = make(ratio)
        costs = found[3]
        if best is None or abs(costs["fr"] - fr) < abs(best[4]["fr"] - fr):
            best = (ratio, *found)
        if abs(costs["fr"] - fr) < 0.005:
            break
        low, high = (ratio, high) if costs["fr"] < fr else (low, ratio)
    return best


def _stage_inputs(model, x) -> dict[str, torch.Tensor]:
    seen = {}
    hooks = [model.get_submodule(s).register_forward_pre_hook(
        lambda _m, args, s=s: seen.setdefault(s, args[0].detach().clone())) for s in STAGES]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _ms(fn, min_time: float) -> float:
    """The fastest of as many calls of ``fn`` as fill ``min_time`` seconds (at least 3), in ms: other
    jobs on a shared machine only ever add time, so the fastest call is the least disturbed one."""
    fn()  # warm: oneDNN primitives, caches
    times = []
    spent = 0.0
    while len(times) < 3 or spent < min_time:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        spent += times[-1]
    return min(times) * 1e3


def _time_all(models: dict, example, channels_last: bool, rounds: int, min_time: float) -> dict:
    """Median over ``rounds`` of each model's whole and per-stage latency; the models take turns in
    every round, so a slow spell of the shared machine hits all of them."""
    prepared = {}
    for name, model in models.items():
        plain = masking.copy_model(model)
        masking.make_permanent(plain)
        plain.eval()
        x = example
        if channels_last:
            plain = plain.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        inputs = _stage_inputs(plain, x)
        if channels_last:
            inputs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in inputs.items()}
        with torch.no_grad():
            last = plain.layer3(inputs["layer3"])
        prepared[name] = {"whole": lambda plain=plain, x=x: plain(x),
                          "stem": lambda plain=plain, x=x: F.relu(plain.bn1(plain.conv1(x))),
                          **{s: lambda m=plain.get_submodule(s), xs=inputs[s]: m(xs) for s in STAGES},
                          "head": lambda plain=plain, h=last: plain.linear(plain.flatten(plain.pool(h)))}
    samples = {name: {part: [] for part in PARTS} for name in models}
    with torch.no_grad():
        for r in range(rounds):
            order = list(prepared) if r % 2 == 0 else list(reversed(prepared))
            for name in order:
                for part in PARTS:
                    samples[name][part].append(_ms(prepared[name][part], min_time))
    result = {}
    for name, parts in samples.items():
        medians = {part: statistics.median(values) for part, values in parts.items()}
        medians["other"] = medians["stem"] + medians["head"]
        medians["parts_sum"] = sum(medians[p] for p in PARTS if p != "whole")
        result[name] = {"median_ms": medians, "rounds_ms": parts}
    return result


def _stage_flops(model, example) -> dict[str, int]:
    total, per_module = metrics.module_flops(model, example[:1])
    flops = {stage: per_module.get(stage, 0) for stage in STAGES}
    flops["whole"] = total
    flops["other"] = total - sum(flops[s] for s in STAGES)
    return flops


def _widths(small) -> dict[str, list]:
    """Per stage: the residual-stream width and the inner widths of the blocks (conv1 outputs)."""
    out = {}
    for stage in STAGES:
        blocks = small.get_submodule(stage)
        inner = [block.conv1.out_channels for block in blocks]
        out[stage] = {"stream": blocks[-1].conv2.out_channels, "inner": inner,
                      "conv1_reads": [block.conv1.in_channels for block in blocks]}
    return out


def structured(args, train, example, weights) -> None:
    if args.rounds < 7:
        raise SystemExit("--rounds must be at least 7")
    probe_example = example[:16]
    load_before = list(os.getloadavg())  # 1/5/15-minute load: other jobs on the machine slow every contender

    def fresh():
        model = prunelab.build_model("resnet56", seed=0)
        if weights is not None:
            model.load_state_dict(weights)
        return model

    def finish(model):
        small, report = prunelab.compact(model, probe_example)
        return model, small, report, structure.structured_metrics(model, small, example[:1], latency=False)

    contenders = {}
    started = time.perf_counter()
    base = fresh()
    scored = pfp.plan(base, masking.prunable_parameters(base), train, 0.7,
                      generator=torch.Generator().manual_seed(0))
    scoring_s = time.perf_counter() - started
    print(f"pfp scored in {scoring_s:.1f} s", flush=True)
    for variant in args.pfp:
        value, _, allocation = variant.partition(":")
        round_to, allocation = _round_to(value), allocation or "paper"

        def make(ratio, round_to=round_to, allocation=allocation):
            model = fresh()
            masking.attach(model, scored.at(ratio, round_to=round_to, allocation=allocation).masks)
            return finish(model)

        started = time.perf_counter()
        ratio, model, small, report, costs = _search(make, args.fr, 0.5, 0.98)
        chosen = scored.at(ratio, round_to=round_to, allocation=allocation)
        multiple = chosen.round_to
        name = " ".join(["pfp"] + ([f"round_to={value}"] if round_to != 1 else [])
                        + ([f"allocation={allocation}"] if allocation != "paper" else []))
        contenders[name] = {"method": "pfp", "options": {"round_to": round_to, "allocation": allocation,
                                                         "sparsity": ratio},
                            "round_to_used": multiple, "model": model, "small": small, "report": report,
                            "costs": costs, "search_s": time.perf_counter() - started,
                            "eps_factor": {l["name"]: l["eps_factor"] for l in chosen.layers}}
        print(f"{name} (multiple {multiple}): ratio {ratio:.4f}, FR {costs['fr']:.2%}", flush=True)
    for method in ("pfec", "softnet"):
        def make(ratio, method=method):
            model = fresh()
            prunelab.prune(model, method, data=train, seed=0, channels=ratio)
            return finish(model)

        started = time.perf_counter()
        ratio, model, small, report, costs = _search(make, args.fr, 0.3, 0.7)
        contenders[method] = {"method": method, "options": {"channels": ratio}, "model": model, "small": small,
                              "report": report, "costs": costs, "search_s": time.perf_counter() - started}
        print(f"{method}: channels {ratio:.4f}, FR {costs['fr']:.2%}", flush=True)

    dense = fresh()
    flops = {"dense": _stage_flops(dense, example)}
    for name, c in contenders.items():
        flops[name] = _stage_flops(c["small"], example)
    timings = {}
    for layout in ("channels_last", "contiguous"):
        models = {"dense": dense, **{name: c["small"] for name, c in contenders.items()}}
        timings[layout] = _time_all(models, example, layout == "channels_last", args.rounds, min_time=0.3)
        for name in contenders:
            d, m = timings[layout]["dense"]["median_ms"], timings[layout][name]["median_ms"]
            print(f"{layout} {name}: dense {d['whole']:.1f} ms, compact {m['whole']:.1f} ms, "
                  f"speed-up {d['whole'] / m['whole']:.2f}x (MAC ratio "
                  f"{flops['dense']['whole'] / flops[name]['whole']:.2f})", flush=True)

    methods = {}
    for name, c in contenders.items():
        entry = {"method": c["method"], "options": c["options"], "fr": c["costs"]["fr"], "pr": c["costs"]["pr"],
                 "params": c["costs"]["params"], "flops": flops[name],
                 "mac_ratio": flops["dense"]["whole"] / flops[name]["whole"],
                 "stage_mac_ratio": {s: flops["dense"][s] / max(flops[name][s], 1) for s in (*STAGES, "other")},
                 "compact_max_abs_diff": c["report"].max_abs_diff,
                 "gathered_layers": len(c["report"].plan["gathered"]), "widths": _widths(c["small"]),
                 "search_s": c["search_s"]}
        if "round_to_used" in c:
            entry["round_to_used"] = c["round_to_used"]
            entry["eps_factor"] = c["eps_factor"]
        for layout, timed in timings.items():
            d, m = timed["dense"]["median_ms"], timed[name]["median_ms"]
            speedup = d["whole"] / m["whole"]
            entry[layout] = {"dense_ms": d, "compact_ms": m, "speedup": speedup,
                             "speedup_over_mac_ratio": speedup / entry["mac_ratio"],
                             "stage_speedup": {s: d[s] / m[s] for s in (*STAGES, "other")},
                             "dense_stage_share": {s: d[s] / d["whole"] for s in (*STAGES, "other")}}
        methods[name] = entry
    result = {"benchmark": "structured_speed", "model": "resnet56", "dataset": "cifar10",
              "train_epochs": args.train_epochs, "target_fr": args.fr, "batch": args.batch, "threads": 1,
              "rounds": args.rounds, "pfp_scoring_s": scoring_s,
              "probe": [r.as_dict() for r in backend_probe.results()],
              "methods": methods, "timings": timings,
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "date": time.strftime("%Y-%m-%d"), "load_before": load_before,
                              "load_after": list(os.getloadavg())}}
    out = ROOT / "benchmarks" / "results" / "structured_speed.json"
    checkpoint.write_json(out, result)
    out.with_suffix(".md").write_text(_table(result))
    print(out.with_suffix(".md").read_text())


def _table(result) -> str:
    probe = result["probe"]
    lines = [f"# Structured methods on ResNet-56 / CIFAR-10: measured speed-up against the MAC ratio",
             "",
             f"`python benchmarks/pfp_resnet56_speed.py --structured --train-epochs {result['train_epochs']}` "
             f"({result['environment']['date']}, torch {result['environment']['torch']}, "
             f"{result['environment']['cpu_capability']}, load average before/after "
             f"{result['environment']['load_before'][0]:.1f}/{result['environment']['load_after'][0]:.1f} on "
             f"{result['environment']['cpu_count']} cores). Batch {result['batch']}, 1 thread, median of "
             f"{result['rounds']} rounds in which the dense and compact models take turns; target "
             f"{result['target_fr']:.0%} fewer multiply-adds (FR). Speed-up = dense / compact latency; "
             f"per-stage columns: time ratio (MAC ratio) of that stage (each round: the fastest call of >= 0.3 s of "
             f"calls), dense share of time in the header (other = stem + pooling/classifier).",
             ""]
    if probe:
        p = probe[0]
        lines += [f"Backend probe (`round_to=auto`): {p['shape']} -> multiple **{p['multiple']}** "
                  f"({p['seconds']:.2f} s); time added by rounding up to g: {p['excess']}, "
                  f"multiply-adds added: {p['expected']}.", ""]
    for layout in ("channels_last", "contiguous"):
        dense = result["timings"][layout]["dense"]["median_ms"]
        share = {s: dense[s] / dense["whole"] for s in (*STAGES, "other")}
        lines += [f"## {'channels-last' if layout == 'channels_last' else 'NCHW (contiguous)'}: dense "
                  f"{dense['whole']:.1f} ms", "",
                  "| method | FR | MAC ratio | speed-up | speed-up / MAC ratio | "
                  + " | ".join(f"{s} ({share[s]:.0%})" for s in (*STAGES, "other")) + " |",
                  "|---|---|---|---|---|" + "---|" * 4]
        for name, m in result["methods"].items():
            e = m[layout]
            stages = " | ".join(f"{e['stage_speedup'][s]:.2f}x ({m['stage_mac_ratio'][s]:.2f})"
                                for s in (*STAGES, "other"))
            lines.append(f"| {name} | {m['fr']:.1%} | {m['mac_ratio']:.2f} | {e['speedup']:.2f}x | "
                         f"**{e['speedup_over_mac_ratio']:.2f}** | {stages} |")
        lines.append("")
    lines += ["## Where the time goes (channels-last)", "",
              "Milliseconds each part of the compact model takes beyond what its multiply-adds predict "
              "(dense time of the part / its MAC ratio); \"gap\" = whole-model time minus the sum of the parts "
              "timed alone. \"if proportional\" = the speed-up had every part followed its MAC ratio.", "",
              "| method | " + " | ".join(f"{s} ms" for s in (*STAGES, "other")) + " | gap ms | if proportional |",
              "|---|" + "---|" * 6]
    for name, m in result["methods"].items():
        dense, small = m["channels_last"]["dense_ms"], m["channels_last"]["compact_ms"]
        parts = (*STAGES, "other")
        over = {s: small[s] - dense[s] / m["stage_mac_ratio"][s] for s in parts}
        ideal = sum(dense[s] / m["stage_mac_ratio"][s] for s in parts) + (dense["whole"] - dense["parts_sum"])
        lines.append(f"| {name} | " + " | ".join(f"{over[s]:+.1f}" for s in parts)
                     + f" | {small['whole'] - small['parts_sum']:+.1f} | {dense['whole'] / ideal:.2f}x |")
    lines.append("")
    lines += ["## Widths of the compact models", "",
              "| method | " + " | ".join(f"{s} stream / inner / conv1 reads" for s in STAGES) + " |",
              "|---|" + "---|" * 3]
    for name, m in result["methods"].items():
        cells = []
        for s in STAGES:
            w = m["widths"][s]
            cells.append(f"{w['stream']} / {','.join(map(str, w['inner']))} / "
                         f"{','.join(map(str, w['conv1_reads']))}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
