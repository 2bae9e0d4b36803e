"""SNIP (Lee et al., ICLR 2019) Table 1 on real MNIST, driven through the lab, plus the LSTM of Table 2.

Parts (``--part``, repeatable; each writes its rows into the same results, merged with earlier rows):

* ``lenet300``: LeNet-300-100 dense, SNIP 95% and 98% (paper: 1.7 / 1.6 / 2.4 % error).
* ``lenet5``:   LeNet-5-Caffe (no conv ReLU, as SNIP) dense, SNIP 98% and 99% (paper: 0.9 / 0.8 / 1.1 %).
* ``lstm``:     LSTM-s (128 units, row-by-row MNIST) dense and SNIP 95% (paper Table 2: 1.88 -> 1.57 %).
* ``init-study``: the paper's Table 3 for the LeNets: SNIP 90% scored at ``--init``, trained from a fresh
  VS-X draw with Adam lr 1e-3, no weight decay (paper, LeNet-300-100 / LeNet-5-Caffe: VS-X 1.91 / 0.88,
  VS-H 1.88 / 0.85 % error).
* ``timing``:   SNIP scoring of LeNet-5-Caffe on a batch of 100 against 5 training steps.

The paper's recipe (section 5): SGD, momentum 0.9, weight decay 5e-4, batch 100, lr 0.1 times 0.1 every
25k iterations, 10% of the training set held out for validation. (The dense LeNet-5-Caffe diverges at lr
0.1, so its reference trains at 0.01; see PARTS.) The total length is not stated; the default, 100k
iterations, is our choice (the schedule in docs/methods/snip.md). ``--iterations N`` shortens a part and
scales the decay with it (every N/4 iterations, so 4 equal phases at 0.1, 0.01, 0.001, 1e-4). Initialisation
"vs" = TensorFlow's ``variance_scaling_initializer()`` (fan-in, scale 1, truncated normal), the official
code's default; biases start at 0 (``--init-bias vs``: variance-scaled for scoring, as the official code
draws them). SNIP scores one batch of 100 with BatchNorm-free nets (bn_mode is moot here) and the
network is trained from the scored weights (``--reinit`` for the official code's fresh draw, whose biases
start at 0). Sparsity counts conv/linear weights only (``--include-bias`` to also prune the biases, as
the official code does; the paper's m then includes them). ``--include-bias --reinit --init-bias vs``
together are the official code's pipeline.

The LSTM part uses no SGD recipe from the paper (none is given for RNNs beyond the general one); it
trains with Adam lr 1e-3, no weight decay (the paper's setting for its RNN initialisation study,
Table 3), for ``--lstm-iterations`` steps with the lr x0.1 after 3/4 of them. The LSTM reads each
28-pixel row through a linear projection to 128 (``embed=True``), which reproduces the paper's
137k parameters (see prunelab/models/rnn.py; a reconstruction).

Every run is a lab run under ``--runs`` (default runs/snip_lenet/...): interrupted runs resume, finished
ones are read back from their result.json, and a seed whose training diverges is listed in its row (the
statistics are over the others) while the remaining seeds go on. Results: benchmarks/results/snip_lenet.json
and .md.

    python benchmarks/snip_lenet.py                                  # everything, full 100k schedules
    python benchmarks/snip_lenet.py --part lenet5 --iterations 8000  # a shortened part (decay every 2k)

What benchmarks/results/snip_lenet.* hold was run on the shared 2-core CPU with OMP_WAIT_POLICY=PASSIVE
and ``--threads 1`` (another job was using the other core):

    python benchmarks/snip_lenet.py --part timing
    python benchmarks/snip_lenet.py --threads 1 --part lenet300 --iterations 100000 [--keep-best]
    python benchmarks/snip_lenet.py --threads 1 --part lenet300 --iterations 100000 --include-bias --reinit --targets 0.95 0.98
    python benchmarks/snip_lenet.py --threads 1 --part lenet300 --include-bias --reinit --init-bias vs --targets 0.95 0.98 --keep-best
    python benchmarks/snip_lenet.py --threads 1 --part lenet5 --iterations 30000 --include-bias --reinit --init-bias vs --targets 0.99 --keep-best
    python benchmarks/snip_lenet.py --threads 1 --part lenet5 --iterations 6000 --targets 0
    python benchmarks/snip_lenet.py --threads 1 --part lenet5 --iterations 30000 --targets 0.98 0.99 [--keep-best]
    python benchmarks/snip_lenet.py --threads 1 --part lenet5 --targets 0.98 --keep-best --seeds K --results /tmp/K.json
        (K = 0, 1, 2 at once; then the same without --seeds/--results reads the finished runs back and writes the row)
    python benchmarks/snip_lenet.py --threads 1 --part lenet300 --targets 0.95 0.98 --keep-best --init vs-h
    python benchmarks/snip_lenet.py --threads 1 --part lenet5 --iterations 30000 --targets 0.99 --keep-best --init vs-h
    python benchmarks/snip_lenet.py --threads 1 --part lstm --lstm-iterations 32400 --targets 0.95 --keep-best
    python benchmarks/snip_lenet.py --threads 1 --part init-study --models lenet300-100 --keep-best --init vs-h   (and vs-x)
    python benchmarks/snip_lenet.py --threads 1 --part init-study --models lenet5-caffe --iterations 30000 --keep-best --init vs-h
    python benchmarks/snip_lenet.py --threads 1 --part lstm --lstm-iterations 32400 --targets 0 --reference-seeds 0 --keep-best
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunelab
from prunelab.checkpoint import atomic_write, write_json
from prunelab.errors import TrainingDiverged
from prunelab.lab.config import RunConfig
from prunelab.lab.run import run as lab_run

RESULTS = Path("benchmarks/results")
PAPER = {  # test error %, SNIP Table 1 / Table 2 (reference-results.md section 1)
    ("lenet300-100", 0.0): 1.7, ("lenet300-100", 0.95): 1.6, ("lenet300-100", 0.98): 2.4,
    ("lenet5-caffe", 0.0): 0.9, ("lenet5-caffe", 0.98): 0.8, ("lenet5-caffe", 0.99): 1.1,
    ("lstm", 0.0): 1.88, ("lstm", 0.95): 1.57,
}
PAPER_TABLE3 = {("lenet300-100", "vs-x"): 1.91, ("lenet300-100", "vs-h"): 1.88,  # SNIP 90%, by the scoring init
                ("lenet5-caffe", "vs-x"): 0.88, ("lenet5-caffe", "vs-h"): 0.85}
# Table 3's recipe (section 5.5): Adam lr 1e-3 without weight decay, and "for training VS-X initialization is
# used in all the cases": a fresh VS-X draw under the mask. Its length is not stated; the LeNet budget is used.
TABLE3 = {"tag": "table3", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant",
          "step_size": 0, "reinit": True, "reinit_init": "vs-x"}
# (model, model options, sparsity, training overrides). The dense LeNet-5-Caffe (no conv ReLU, vs init)
# diverges to NaN in its first epoch at lr 0.1, with or without momentum (seeds 0 and 1), while the SNIP
# networks train at 0.1; its reference therefore uses lr 0.01 (momentum 0.9), the same schedule otherwise.
PARTS = {
    "lenet300": [("lenet300-100", {}, 0.0, {}), ("lenet300-100", {}, 0.95, {}), ("lenet300-100", {}, 0.98, {})],
    "lenet5": [("lenet5-caffe", {"relu": False}, 0.0, {"lr": 0.01}), ("lenet5-caffe", {"relu": False}, 0.98, {}),
               ("lenet5-caffe", {"relu": False}, 0.99, {})],
    "lstm": [("lstm", {"hidden": 128, "embed": True}, 0.0, {}), ("lstm", {"hidden": 128, "embed": True}, 0.95, {})],
    "init-study": [("lenet300-100", {}, 0.9, TABLE3), ("lenet5-caffe", {"relu": False}, 0.9, TABLE3)],
}


def config_for(model: str, options: dict, sparsity: float, overrides: dict, seed: int, args) -> RunConfig:
    lstm = model == "lstm"
    iterations = args.lstm_iterations if lstm else args.iterations
    if args.init_bias != "zeros" and sparsity:
        options = {**options, "init_bias": args.init_bias}
    common = dict(model=model, model_options=dict(options), method="snip" if sparsity else "none",
                  sparsity=sparsity, init=args.init, include_bias=args.include_bias and bool(sparsity),
                  reinit=args.reinit and bool(sparsity), data_root=args.data_root, val_fraction=0.1,
                  epochs=None, iterations=iterations, batch_size=100, seed=seed, threads=args.threads,
                  latency=False, keep_best=args.keep_best)
    if lstm:
        common.update(optimizer="adam", lr=1e-3, weight_decay=0.0, lr_schedule="multistep",
                      milestones=[iterations * 3 // 4], gamma=0.1)
    else:
        common.update(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, lr_schedule="step",
                      step_size=max(iterations // 4, 1), gamma=0.1)
    overrides = dict(overrides)
    tag = overrides.pop("tag", None)  # names a part whose overrides are too many for the folder name
    common.update(overrides)
    name = f"{model}_{'dense' if not sparsity else f'snip{sparsity:g}'}_{iterations}it" \
           + (f"_{tag}" if tag else "".join(f"_{k}{v:g}" for k, v in overrides.items())) \
           + ("_bias" if common["include_bias"] else "") + ("_reinit" if common["reinit"] else "") \
           + (f"_b{options['init_bias']}" if "init_bias" in options else "") \
           + ("_best" if args.keep_best else "") + ("" if args.init == "vs" else f"_{args.init}") + f"_s{seed}"
    return RunConfig(**common, out=str(Path(args.runs) / name))


def run_one(config: RunConfig, verbose: bool = False) -> dict:
    out = Path(config.out)
    done = out / "result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        if saved.get("config", {}).get("iterations") == config.iterations:
            return saved
    started = time.perf_counter()
    try:
        name = Path(config.out).name
        result = lab_run(config, progress=False, echo=(lambda line: print(f"{name}: {line}", flush=True))
                         if verbose else None)
    except TrainingDiverged as error:  # a row records it; the other seeds still run
        return {"diverged": str(error)}
    result["benchmark_wall_s"] = time.perf_counter() - started
    return result


def summarise(model, sparsity, outcomes, configs) -> dict:
    """One row; the statistics are over the seeds that trained, and the diverged ones are listed apart."""
    diverged = [c.seed for c, r in zip(configs, outcomes) if "diverged" in r]
    finished, results = [c for c in configs if c.seed not in diverged], [r for r in outcomes if "diverged" not in r]
    errors = [100 * r["error"]["test"] for r in results]
    cfg = configs[0]
    row = {
        "model": model, "model_options": cfg.model_options, "method": cfg.method, "target_sparsity": sparsity,
        "include_bias": cfg.include_bias, "reinit": cfg.reinit, "reinit_init": cfg.reinit_init,
        "keep_best": cfg.keep_best, "init": cfg.init,
        "iterations": cfg.iterations, "optimizer": cfg.optimizer, "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule, "step_size": cfg.step_size, "milestones": cfg.milestones,
        "gamma": cfg.gamma, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
        "seeds": [c.seed for c in finished],
        "diverged_seeds": diverged,
        "test_error_pct": errors,
        "val_error_pct": [100 * r["error"]["val"] for r in results],
        "mean_pct": statistics.fmean(errors) if errors else None,
        "std_pct": statistics.stdev(errors) if len(errors) > 1 else 0.0,
        "sparsity_achieved": [r["sparsity"] for r in results],
        "prunable_kept": [r["params"]["prunable_kept"] for r in results],
        "params_total": results[0]["params"]["total"] if results else None,
        "train_s": [r["time_s"]["train"] for r in results],
        "prune_s": [r["time_s"]["prune"] for r in results],
        "wall_s": [r["time_s"]["wall_this_session"] for r in results],  # of the session that finished the run
        "paper_error_pct": PAPER_TABLE3.get((model, cfg.init)) if cfg.reinit_init else PAPER.get((model, sparsity)),
        "runs": [c.out for c in finished],
    }
    return row


def timing(args) -> dict:
    """Median seconds of SNIP scoring (batch 100) and of 5 SGD training steps, LeNet-5-Caffe."""
    train, _, _ = prunelab.load_dataset("mnist", root=args.data_root)
    model = prunelab.build_model("lenet5-caffe", init="vs", seed=0)
    trained = prunelab.build_model("lenet5-caffe", init="vs", seed=0)
    prunelab.prune(trained, "snip", 0.99, data=train)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batches = list(train.batches(100, shuffle=True, seed=1))[:5]

    def score():
        prunelab.scores(model, "snip", data=train, seed=0)

    def steps():
        trained.train()
        for inputs, targets in batches:
            loss = F.cross_entropy(trained(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    score(), steps()  # warm-up
    times = {"snip_scoring_s": [], "five_steps_s": []}
    for _ in range(args.timing_repeats):  # interleaved, so drift in the machine's speed hits both
        for key, fn in (("snip_scoring_s", score), ("five_steps_s", steps)):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    medians = {k + "_median": statistics.median(v) for k, v in times.items()}
    return {"model": "lenet5-caffe", "batch": 100, "threads": torch.get_num_threads(),
            "repeats": args.timing_repeats, **times, **medians,
            "ratio": medians["snip_scoring_s_median"] / medians["five_steps_s_median"],
            "note": "SNIP scoring = prunelab.scores(model, 'snip') incl. drawing the batch; 5 steps = "
                    "forward, cross-entropy, backward, SGD step on the SNIP-pruned (masked) model"}


def ours(row: dict) -> str:
    """Test error %: 'mean ± std (each seed)' (one seed: its error), with the seeds that diverged named."""
    errors = row["test_error_pct"]
    text = f"{row['mean_pct']:.2f} ± {row['std_pct']:.2f} ({', '.join(f'{e:.2f}' for e in errors)})" \
        if len(errors) > 1 else "".join(f"{e:.2f}" for e in errors)
    diverged = row.get("diverged_seeds")
    if diverged:
        text += f"{'; ' if errors else ''}seed{'s' * (len(diverged) > 1)} {', '.join(map(str, diverged))} diverged"
    return text


def markdown(data: dict) -> str:
    lines = ["# SNIP reproduction on MNIST (Lee et al. 2019, Tables 1 and 2)", "",
             "Generated by `benchmarks/snip_lenet.py`; test error in % (mean ± sample std over seeds).", "",
             "| Net | Sparsity | Ours: test error % | Seeds | Paper % | Iterations | Schedule | Train s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(data["configs"], key=lambda k: (data["configs"][k]["model"], data["configs"][k]["target_sparsity"])):
        row = data["configs"][key]
        if row["optimizer"] == "sgd":
            schedule = f"SGD 0.9, lr {row['lr']:g} x{row['gamma']:g}/{row['step_size']} it, wd {row['weight_decay']:g}"
        elif row["lr_schedule"] == "constant":
            schedule = f"Adam lr {row['lr']:g}, constant, wd {row['weight_decay']:g}"
        else:
            schedule = f"Adam lr {row['lr']:g}, x{row['gamma']:g} at {row['milestones']}"
        name = row["model"] + (" (embed)" if row["model_options"].get("embed") else "")
        fresh = f"fresh {row['reinit_init']} draw" if row.get("reinit_init") else "fresh draw"
        variant = [v for v, on in (("biases pruned", row["include_bias"]),
                                   ("biases vs at scoring", row["model_options"].get("init_bias") == "vs"),
                                   (fresh, row["reinit"]),
                                   ("best validation epoch", row.get("keep_best")),
                                   (f"scored at {row['init']}" if row.get("reinit_init") else f"init {row['init']}",
                                    row["init"] != "vs")) if on]
        name += f" ({', '.join(variant)})" if variant else ""
        target = "dense" if not row["target_sparsity"] else f"{100 * row['target_sparsity']:g}%"
        paper = "–" if row["paper_error_pct"] is None else f"{row['paper_error_pct']:g}"
        train_s = f"{statistics.fmean(row['train_s']):.0f}" if row["train_s"] else "–"
        lines.append(f"| {name} | {target} | {ours(row)} | {len(row['seeds'])} | {paper} "
                     f"| {row['iterations']:,} | {schedule} | {train_s} |")
    if "timing" in data:
        t = data["timing"]
        lines += ["", f"SNIP scoring of LeNet-5-Caffe on a batch of 100: {1000 * t['snip_scoring_s_median']:.1f} ms "
                      f"(median of {t['repeats']}); 5 training steps: {1000 * t['five_steps_s_median']:.1f} ms; "
                      f"ratio {t['ratio']:.2f} ({t['threads']} threads)."]
    lines += ["", "Notes:", "",
              "* Sparsity is over conv/linear weights (biases dense); init `vs` (TensorFlow's "
              "`variance_scaling_initializer()`, the SNIP code's default); 10% of the training set held out; "
              "SNIP scores one batch of 100; training starts from the scored weights. The test error is that "
              "of the final weights, or in rows marked \"best validation epoch\" of the epoch with the lowest "
              "validation error (`--keep-best`): the test set chooses nothing.",
              "* The LeNet parts use SGD momentum 0.9, lr 0.1 x0.1 every iterations/4, weight decay 5e-4, "
              "batch 100 (paper section 5). Exception: the dense LeNet-5-Caffe diverges (NaN in epoch 1) at "
              "lr 0.1 with or without momentum, so its reference uses lr 0.01; the SNIP nets train at 0.1.",
              "* Rows \"fresh vs-x draw, scored at ...\" are the paper's Table 3 (initialisation study): SNIP "
              "90% scored at that initialisation, trained from a fresh VS-X draw with Adam lr 1e-3, no weight "
              "decay (`--part init-study`); the paper gives no length: LeNet-300-100 ran the Table 1 budget "
              "(100k iterations), LeNet-5-Caffe 30k (the CPU budget).",
              "* The LSTM uses Adam lr 1e-3 (the paper's RNN initialisation study; no RNN recipe is given), "
              "hidden 128 with a 28->128 input projection (137k parameters, as the paper's LSTM-s).",
              "* Differences from the official code (namhoonlee/snip-public): its `test.py` reports the *best* "
              "test accuracy over the last saved checkpoints (not replicated: the test set chooses nothing "
              "here; `--keep-best` is the analogue with validation choosing); it trains a fresh draw of the "
              "weights (`weights_ap`) under the mask, not the scored ones (`--reinit`), and it scores and "
              "prunes the biases too (`--include-bias`): the rows marked "
              "\"biases pruned, fresh draw\" ran both; it initialises biases with variance scaling before "
              "pruning (`--initializer_b_bp vs`, its default) and with zeros for training: `--init-bias vs` "
              "does the same (rows marked \"biases vs at scoring\", so all three together are the official "
              "pipeline; without it our biases start at 0, so a pruned bias scores 0); its default optimizer is plain SGD "
              "(`--optimizer momentum` gives the paper's momentum 0.9).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=[*PARTS, "timing"],
                        help="what to run (repeatable); default: lenet300 lenet5 lstm timing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference-seeds", type=int, nargs="+", default=None,
                        help="seeds of the dense references (default: --seeds)")
    parser.add_argument("--iterations", type=int, default=100_000,
                        help="training iterations of the LeNet parts; lr x0.1 every iterations/4")
    parser.add_argument("--lstm-iterations", type=int, default=10_800, help="LSTM training iterations")
    parser.add_argument("--targets", type=float, nargs="+", default=None,
                        help="run only these sparsities of each part (0 = the dense reference)")
    parser.add_argument("--models", nargs="+", default=None,
                        choices=sorted({model for part in PARTS.values() for model, *_ in part}),
                        help="run only these networks of each part")
    parser.add_argument("--include-bias", action="store_true", help="prune biases too (official SNIP code)")
    parser.add_argument("--reinit", action="store_true", help="train from a fresh draw (official SNIP code)")
    parser.add_argument("--init-bias", default="zeros", choices=["zeros", "vs"],
                        help="biases of the scored network (official SNIP code: vs; a --reinit draw starts at 0)")
    parser.add_argument("--init", default="vs", choices=["vs", "vs-h", "vs-x"],
                        help="initialisation (vs: the official code's default; the paper's Table 3 found vs-h "
                             "marginally best)")
    parser.add_argument("--keep-best", action="store_true",
                        help="end on the epoch with the lowest validation error (the official code reports "
                             "its best test checkpoint; here validation chooses)")
    parser.add_argument("--verbose", action="store_true", help="print every run's log lines (one per epoch)")
    parser.add_argument("--runs", default="runs/snip_lenet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--results", default=str(RESULTS / "snip_lenet.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.part or [*PARTS, "timing"]

    results_path = Path(args.results)
    data = json.loads(results_path.read_text()) if results_path.exists() else {}
    data.setdefault("configs", {})
    data["schema"] = "prunelab.bench.snip_lenet/1"
    data["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": args.threads, "cpu": platform.processor() or platform.machine()}

    def save():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(results_path, data)
        atomic_write(results_path.with_suffix(".md"), markdown(data))

    for part in parts:
        if part == "timing":
            data["timing"] = timing(args)
            print(f"timing: SNIP scoring {data['timing']['snip_scoring_s_median'] * 1000:.1f} ms, "
                  f"5 steps {data['timing']['five_steps_s_median'] * 1000:.1f} ms", flush=True)
            save()
            continue
        for model, options, sparsity, overrides in PARTS[part]:
            if (args.targets is not None and sparsity not in args.targets) or \
                    (args.models is not None and model not in args.models):
                continue
            seeds = args.seeds if sparsity or args.reference_seeds is None else args.reference_seeds
            configs = [config_for(model, options, sparsity, overrides, seed, args) for seed in seeds]
            outcomes = []
            for config in configs:
                started = time.perf_counter()
                outcome = run_one(config, args.verbose)
                outcomes.append(outcome)
                said = outcome["diverged"] if "diverged" in outcome else \
                    f"test error {100 * outcome['error']['test']:.2f}% sparsity {outcome['sparsity']:.4f}"
                print(f"{Path(config.out).name}: {said} ({time.perf_counter() - started:.0f} s)", flush=True)
            row = summarise(model, sparsity, outcomes, configs)
            key = Path(configs[0].out).name.rsplit("_s", 1)[0]
            data["configs"][key] = row
            print(f"== {key}: test error % {ours(row)} (paper {row['paper_error_pct']})", flush=True)
            save()


if __name__ == "__main__":
    main()
