"""Studies (docs/studies.md): grid expansion, bad study files, reuse and resumption, failed runs recorded,
the report's checklist, effective sparsity, the shuffle sanity check, and Ray giving the local results."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunelab import cli, checkpoint
from prunelab.errors import PrunelabError, TrainingDiverged
from prunelab.lab import run as lab_run
from prunelab.lab.config import defaults, make_config
from prunelab.study import expand, load_spec, run_study, write_report
from prunelab.study.expand import shared_pretraining
from prunelab.study.effective import effective_sparsity
from prunelab.study.sanity import shuffle_mask
from prunelab.training import Trainer

TINY = 'iterations = 2\nlatency = false\nval_fraction = 0.05\nlr = 0.05\n'


def study_file(tmp_path, study: str, recipe: str = TINY, extra: str = "", name: str = "s.toml",
               data_root=None) -> Path:
    root = f'data_root = "{data_root}"\n' if data_root else ""
    path = tmp_path / name
    path.write_text(f"[study]\nmodels = [\"lenet300-100\"]\n{study}\n[recipe]\n{recipe}{root}\n{extra}")
    return path


def read(folder: Path) -> dict:
    return json.loads((folder / "study.json").read_text())


def counting_lab_runs(monkeypatch):
    """Wrap the lab's run(): the configs each study session actually executes, in order."""
    calls = []
    original = lab_run.run

    def counted(config, **kwargs):
        calls.append(config)
        return original(config, **kwargs)

    monkeypatch.setattr(lab_run, "run", counted)
    return calls


# -- the grid ---------------------------------------------------------------------------------------

def test_a_grid_expands_into_digest_named_runs(tmp_path):
    path = study_file(tmp_path, 'methods = ["snip", "pfec"]\ntargets = [0.5, 0.9]\nseeds = [0, 1]\n'
                                'sanity = ["shuffle", "reinit"]\n',
                      extra='[methods.snip]\nwhen = "init"\nmethod_options = { batches = 2 }\n\n'
                            '[methods.magnitude]\nfinetune_epochs = 1\n')
    spec = load_spec(path)
    assert spec.methods == ("snip", "pfec", "random", "magnitude")  # the baselines are added
    runs = expand(spec)
    per_seed = 1 + 2 * 3 + 2 + 2 + 2  # dense; snip and its two checks; pfec, random, magnitude at 2 targets
    assert len(runs) == 2 * per_seed
    by = lambda **kv: [r for r in runs if all(getattr(r, k) == v for k, v in kv.items())]  # noqa: E731
    assert {r.kind for r in by(method="pfec")} == {"channels"} and {r.kind for r in by(method="snip")} == {"sparsity"}
    assert [r.config["channels"] for r in by(method="pfec", seed=0)] == [0.5, 0.9]
    assert len(by(label="none")) == 2 and all(r.config["method_options"] == {} for r in by(label="none"))
    assert all(r.config["method_options"] == {"batches": 2} for r in by(method="snip"))
    assert all(r.config["finetune_epochs"] == 1 for r in by(method="magnitude"))
    assert {r.config["method"] for r in by(variant="shuffle")} == {"snip+shuffle"}
    assert all(r.config["reinit"] for r in by(variant="reinit"))
    assert not by(method="random", variant="shuffle")  # a shuffle of random masks is random masks
    for run in runs:  # named by the lab's own digest of the resolved config
        config = lab_run.resolve(make_config({**defaults(), **run.config}))
        assert run.folder == f"runs/{run.label}_{config.digest()}" and run.id == config.digest()
    assert len({r.id for r in runs}) == len(runs)
    assert [r.id for r in expand(load_spec(path))] == [r.id for r in runs]  # stable


def test_control_false_leaves_the_dense_control_out(tmp_path):
    """A long study whose dense control exists elsewhere (studies/lobster_lenet300_long.toml) skips it."""
    path = study_file(tmp_path, 'methods = ["lobster"]\nbaselines = false\ncontrol = false\nseeds = [0, 1]\n')
    runs = expand(load_spec(path))
    assert [r.label for r in runs] == ["lobster", "lobster"]
    with_control = expand(load_spec(study_file(tmp_path, 'methods = ["lobster"]\nbaselines = false\n', name="c.toml")))
    assert [r.label for r in with_control] == ["none", "lobster"]


def test_a_step_budget_names_one_run_whether_or_not_epochs_are_given():
    """iterations override epochs, so a study's run (epochs at their default) and a script's run of the same
    config (epochs=None) share a digest, and the study can adopt the script's folder."""
    values = {**defaults(), "model": "lenet300-100", "method": "snip", "sparsity": 0.9, "iterations": 100}
    with_epochs = lab_run.resolve(make_config(values))
    assert with_epochs.epochs is None
    assert with_epochs.digest() == lab_run.resolve(make_config({**values, "epochs": None})).digest()
    assert with_epochs.digest() != lab_run.resolve(make_config({**values, "iterations": 101})).digest()


def test_the_dense_control_takes_its_own_overrides(tmp_path):
    path = study_file(tmp_path, 'methods = ["snip"]\ntargets = [0.5]\nbaselines = false\n',
                      extra="[methods.none]\nlr = 0.01\n")
    control, snip = expand(load_spec(path))
    assert (control.label, control.config["lr"], snip.config["lr"]) == ("none", 0.01, 0.05)


@pytest.mark.parametrize("study, extra, message", [
    ('methods = ["snip"]\ntargets = [0.5]\ncolour = "red"\n', "", "invalid key 'colour' in [study]"),
    ('methods = ["snip"]\ntargets = [0.5]\n', "[recipe2]\n", "unknown table or key 'recipe2'"),
    ('methods = ["snap"]\ntargets = [0.5]\n', "", "unknown method 'snap'"),
    ('methods = ["snip"]\ntargets = [0.5, 1.5]\n', "", "1.5 is out of range"),
    ('methods = ["snip"]\ntargets = [0.5]\n', '[methods.snip]\ntarget = "channels"\n', "aims at sparsity"),
    ('methods = ["snip"]\ntargets = [0.5]\n', '[methods.snip]\nlrr = 0.1\n',
     "[methods.snip]: invalid config key 'lrr'"),
    ('methods = ["snip"]\ntargets = [0.5]\n', '[methods.grasp]\nlr = 0.1\n', "[methods.grasp] configures a method"),
    ('methods = ["snip"]\ntargets = [0.5]\nsanity = ["invert"]\n', "", "unknown check 'invert'"),
    ('methods = ["snip"]\ntargets = [0.5]\ncontrol = "no"\n', "", "control must be true or false"),
    ('methods = ["snip"]\ntargets = [0.5]\n', '[methods.none]\ntargets = [0.5]\n', "the dense control prunes nothing"),
    ('methods = ["snip"]\ntargets = [0.5]\n', '[methods.snip]\nwhen = "sometime"\n', "invalid when 'sometime'"),
])
def test_bad_study_files_end_in_one_line_before_any_run(tmp_path, capsys, study, extra, message):
    path = study_file(tmp_path, study, extra=extra)
    assert cli.main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunelab: error: ") and message in err[0], err
    assert not (tmp_path / "s").exists()  # nothing written


def test_a_grid_key_in_the_recipe_is_refused(tmp_path):
    path = study_file(tmp_path, 'methods = ["snip"]\ntargets = [0.5]\n', recipe=TINY + "sparsity = 0.9\n")
    with pytest.raises(PrunelabError, match=r"\[recipe\] sets 'sparsity', which the grid decides: use \[study\] "
                                            "targets"):
        load_spec(path)


def test_ray_engine_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    path = study_file(tmp_path, 'methods = ["random"]\ntargets = [0.5]\nbaselines = false\n')
    assert cli.main(["study", str(path), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'prunelab[ray]'" in err[0] and not (tmp_path / "s").exists()


# -- running: reuse, resumption, failures ----------------------------------------------------------------

def test_an_interrupted_study_completes_only_the_missing_runs(tmp_path, data_root, monkeypatch):
    path = study_file(tmp_path, 'methods = ["random"]\nbaselines = false\ntargets = [0.5, 0.9]\nseeds = [0]\n',
                      data_root=data_root)
    original, epochs = Trainer.run_epoch, {"n": 0}

    def interrupted_in_the_second_run(self, epoch):
        epochs["n"] += 1
        if epochs["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the CLI turns into one)
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", interrupted_in_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, progress=False)
    record = read(tmp_path / "s")
    assert [r["status"] for r in record["runs"]] == ["done", "pending", "pending"]
    assert record["counts"] == {"done": 1, "diverged": 0, "failed": 0, "pending": 2}
    assert (tmp_path / "s" / record["runs"][1]["folder"] / "state.json").exists()  # started, will resume

    monkeypatch.setattr(Trainer, "run_epoch", original)
    calls = counting_lab_runs(monkeypatch)
    record = run_study(path, progress=False)
    assert [Path(c.out).name for c in calls] == [Path(r["folder"]).name for r in record["runs"][1:]]
    assert [r["status"] for r in record["runs"]] == ["done"] * 3
    assert [r["reused"] for r in record["runs"]] == [True, False, False]

    calls.clear()
    again = run_study(path, progress=False)  # everything finished: nothing runs
    assert calls == [] and [r["status"] for r in again["runs"]] == ["done"] * 3
    assert [r["summary"] for r in again["runs"]] == [r["summary"] for r in record["runs"]]


def test_runs_pruning_a_trained_model_start_from_the_dense_controls_weights(tmp_path, data_root, monkeypatch):
    path = study_file(tmp_path, 'methods = ["magnitude", "random"]\nbaselines = false\ntargets = [0.5, 0.9]\n'
                                'seeds = [0]\n', data_root=data_root,
                      extra="[methods.magnitude]\nfinetune_epochs = 1\n\n[methods.random]\nlr = 0.01\n")
    planned = expand(load_spec(path))
    control = next(r for r in planned if r.method == "none")
    assert shared_pretraining(planned) == \
        {r.id: control.id for r in planned if r.method == "magnitude"}  # random: at init, another recipe
    calls = counting_lab_runs(monkeypatch)
    record = run_study(path, progress=False)
    assert [r["status"] for r in record["runs"]] == ["done"] * 5
    # the control first, beside it the runs that train their own (random, at init); then the rest from its weights
    assert [c.method for c in calls] == ["none", "random", "random", "magnitude", "magnitude"]
    source = str((tmp_path / "s" / control.folder).resolve())
    assert [c.pretrained_run for c in calls[1:]] == [source if c.method == "magnitude" else None for c in calls[1:]]
    result = json.loads((tmp_path / "s" / planned[1].folder / "result.json").read_text())
    assert result["pretrained"]["run"] == source and result["history"][0]["stage_name"] == "pretrain"


def test_finished_runs_from_elsewhere_are_adopted_not_retrained(tmp_path, data_root, monkeypatch, capsys):
    """A benchmark's lab run of the same config (any folder name) is copied in; only the rest trains."""
    path = study_file(tmp_path, 'methods = ["random"]\nbaselines = false\ntargets = [0.5]\nseeds = [0]\n',
                      data_root=data_root)
    dense, pruned = expand(load_spec(path))
    lab_run.run(make_config({**defaults(), **pruned.config, "out": str(tmp_path / "bench" / "random_s0")}),
                progress=False, echo=None)
    (tmp_path / "bench" / "unfinished").mkdir()  # not a run: ignored
    calls = counting_lab_runs(monkeypatch)
    assert cli.main(["study", str(path), "--quiet", "--no-report", "--adopt", str(tmp_path / "bench")]) == 0
    assert [Path(c.out).name for c in calls] == [Path(dense.folder).name]  # the random run was not retrained
    record = read(tmp_path / "s")
    assert [(r["label"], r["status"], r["reused"]) for r in record["runs"]] == \
        [("none", "done", False), ("random", "done", True)]
    assert record["runs"][1]["summary"]["test_error"] is not None
    assert (tmp_path / "bench" / "random_s0" / "result.json").exists()  # copied, not moved
    assert "adopted" in capsys.readouterr().out
    assert cli.main(["study", str(path), "--adopt", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adopt" in err[0] and "no such folder" in err[0]


def test_diverged_runs_are_recorded_and_kept_until_retried(tmp_path, data_root, monkeypatch, capsys):
    path = study_file(tmp_path, 'methods = ["random"]\nbaselines = false\ntargets = [0.5]\nseeds = [0]\n',
                      data_root=data_root, extra="[methods.random]\nlr = 1e6\niterations = 30\nweight_decay = 0.0\n")
    assert cli.main(["study", str(path), "--quiet"]) == 0
    record = read(tmp_path / "s")
    dense, diverged = record["runs"]
    assert dense["status"] == "done" and diverged["status"] == "diverged"
    assert "training diverged" in diverged["error"] and "\n" not in diverged["error"]
    assert record["counts"] == {"done": 1, "diverged": 1, "failed": 0, "pending": 0}
    out, err = capsys.readouterr()
    assert "1 done (0 reused), 1 diverged, 0 failed" in out
    assert "random lenet300-100/mnist sparsity 0.5 seed 0: diverged" in err
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| diverged | random | lenet300-100 | sparsity 0.5 | 0 | training diverged" in report

    calls = counting_lab_runs(monkeypatch)
    run_study(path, progress=False)
    assert calls == []  # a divergence is a result: not run again by default
    run_study(path, progress=False, retry_failed=True)
    assert [Path(c.out).name for c in calls] == [Path(diverged["folder"]).name]


def test_a_study_folder_has_one_driver(tmp_path, data_root):
    path = study_file(tmp_path, 'methods = ["random"]\nbaselines = false\ntargets = [0.5]\nseeds = [0]\n',
                      data_root=data_root)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "LOCK").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(PrunelabError, match="in use by process 1 on elsewhere"):
        run_study(path, progress=False)


# -- the report ------------------------------------------------------------------------------------------

REFERENCES = '''
[[point]]
model = "lenet300-100"
dataset = "mnist"
method = "magnitude"
sparsity = 0.92
compression_ratio = 12.0
test_error_pct = 1.59
source = "Han et al., NeurIPS 2015, Table 1"

[[point]]
model = "lenet300-100"
dataset = "mnist"
method = "none"
sparsity = 0.0
test_error_pct = 1.64
source = "Han et al., NeurIPS 2015, Table 1 (dense reference)"

[[point]]
model = "lenet5-caffe"
dataset = "mnist"
method = "magnitude"
sparsity = 0.92
test_error_pct = 0.77
source = "another model: not in this study's report"
'''


@pytest.fixture(scope="module")
def reported(tmp_path_factory, data_root):
    """A tiny study through the CLI: magnitude (random added as a baseline) at 5 sparsities, 2 seeds, one
    run failing; its folder and report.md."""
    tmp_path = tmp_path_factory.mktemp("report")
    (tmp_path / "refs.toml").write_text(REFERENCES)
    path = study_file(tmp_path, 'methods = ["magnitude"]\ntargets = [0.5, 0.8, 0.9, 0.95, 0.98]\nseeds = [0, 1]\n'
                                'references = "refs.toml"\ndescription = "A tiny study for the tests."\n',
                      data_root=data_root, extra="[methods.magnitude]\nfinetune_epochs = 0\n")
    original = lab_run.run

    def one_diverges(config, **kwargs):
        if config.method == "random" and config.sparsity == 0.98 and config.seed == 1:
            raise TrainingDiverged("training diverged (loss is nan) in stage 1, epoch 1: lower the learning rate")
        return original(config, **kwargs)

    lab_run.run = one_diverges
    try:
        assert cli.main(["study", str(path), "--quiet"]) == 0
    finally:
        lab_run.run = original
    return tmp_path / "s", (tmp_path / "s" / "report.md").read_text()


def test_the_report_has_every_item_of_the_checklist(reported):
    folder, report = reported
    record = read(folder)
    assert len(record["runs"]) == 2 + 2 * 5 * 2 and record["counts"]["diverged"] == 1
    tables = [line for line in report.splitlines() if line.startswith("### sparsity ")]
    assert tables == [f"### sparsity {t}" for t in ("0.5", "0.8", "0.9", "0.95", "0.98")]
    assert "| method | test error % (mean ± std) | n | sparsity | effective sparsity | compression | " \
           "multiply-add reduction | not finished |" in report
    rows = [line for line in report.splitlines() if line.startswith("| magnitude (baseline) |")]
    assert len(rows) == 5 and all(" ± " in row and "| 2 |" in row and row.count("x |") == 2 for row in rows)
    assert report.count("| dense control |") == 5
    assert "random (baseline)" in report and "seed 1 diverged" in report
    effective = [row.split("|")[5].strip() for row in rows]
    assert all(value != "n/a" and 0.5 <= float(value) <= 1 for value in effective)
    assert "## Effective sparsity" in report and "Vysogorets & Kempe" in report
    # the papers' numbers, each with its source; another model's are left out
    assert "| [1] | magnitude | lenet300-100 | 1.59 | 0.92 | 12.00x | Han et al., NeurIPS 2015, Table 1 |" in report
    assert "| [2] | dense | lenet300-100 | 1.64 |" in report and "another model" not in report
    # recipe, seeds, version, machine; failed runs listed
    assert "| iterations | 2 |" in report and "seeds 0, 1" in report and "prunelab 0.2.0" in report
    assert "* machine: " in report and "A tiny study for the tests." in report
    assert "| diverged | random | lenet300-100 | sparsity 0.98 | 1 | training diverged" in report
    for part in ("sparsity", "effective-sparsity", "compression", "multiply-adds"):
        png = folder / "plots" / f"lenet300-100_mnist_error-vs-{part}.png"
        assert f"(plots/{png.name})" in report and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_reads_the_numbers_of_each_run(reported):
    folder, report = reported
    record = read(folder)
    errors = [100 * r["summary"]["test_error"] for r in record["runs"]
              if r["label"] == "magnitude" and r["target"] == 0.9]
    mean, std = sum(errors) / 2, abs(errors[0] - errors[1]) / 2 ** 0.5
    assert f"| magnitude (baseline) | {mean:.2f} ± {std:.2f} | 2 |" in report
    assert write_report(folder) == folder / "report.md" and (folder / "report.md").read_text() == report


def test_the_report_shows_each_round_of_an_iterative_method(tmp_path, data_root):
    path = study_file(tmp_path, 'methods = ["relief"]\nbaselines = false\ncontrol = false\nseeds = [0, 1]\n',
                      data_root=data_root, extra="[methods.relief]\nrounds = 2\nmethod_options = { examples = 50 }\n")
    record = run_study(path, progress=False)
    report = write_report(tmp_path / "s").read_text()
    assert "### Rounds of relief (2 seed(s))" in report
    stages = [json.loads((tmp_path / "s" / r["folder"] / "result.json").read_text())["stage_results"]
              for r in record["runs"]]
    assert [s["stage"] for s in stages[0]] == ["pretrain", "finetune-1", "finetune-2"]
    for i, stage in enumerate(s["stage"] for s in stages[0]):
        remaining = [100 * (1 - seed[i]["sparsity"]) for seed in stages]
        mean, std = sum(remaining) / 2, abs(remaining[0] - remaining[1]) / 2 ** 0.5
        assert f"| {stage} | {mean:.2f} ± {std:.2f} |" in report
    assert stages[0][2]["sparsity"] > stages[0][1]["sparsity"] > 0  # the second round prunes further


def test_report_of_a_folder_without_a_study_says_so(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "is not a study folder (no study.json)" in capsys.readouterr().err


@pytest.mark.parametrize("errors, labelled", [((0.8, 1.6), {"0.8", "1", "1.2", "1.4", "1.6"}),  # within a decade
                                               ((0.5, 60.0), {"1", "2", "5", "10", "20", "50"})])
def test_the_error_axis_is_labelled_within_one_decade_too(errors, labelled):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from prunelab.study.plots import _error_axis

    figure = Figure()
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0.0, 1.0], errors)
    _error_axis(axes)
    figure.canvas.draw()
    low, high = axes.get_ylim()
    shown = {tick.get_text() for tick, value in zip(axes.get_yticklabels(), axes.get_yticks())
             if low <= value <= high}
    assert labelled <= shown
    if errors[1] > 10 * errors[0]:
        assert "3" not in shown  # 1, 2 and 5 per decade when the errors span decades


# -- effective sparsity, the shuffle check ---------------------------------------------------------------

def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 2))


def test_effective_sparsity_of_a_conv_chain():
    model = small_cnn()  # 1x10x10 -> conv 4x8x8 -> pool 4x4x4 -> conv 3x2x2 -> flatten 12 -> 5 -> 2
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()
             if name.endswith("weight")}
    masks["0.weight"][1] = False              # conv channel 1 gets no input
    masks["3.weight"][:, 2] = False           # conv channel 2 feeds nothing
    masks["6.weight"][:, 4:8] = False         # conv2 channel 1's four features feed nothing
    masks["8.weight"][:, 3] = False           # hidden unit 3 reaches nothing
    result = effective_sparsity(model, masks, torch.zeros(1, 1, 10, 10))
    layers = result["layers"]
    # conv1: channel 1 masked, channel 2 reaches nothing -> channels 0 and 3 effective (9 taps each)
    assert layers["0.weight"] == {"total": 36, "kept": 27, "effective": 18}
    # conv2: inputs 1 (no input) and 2 (masked) dead, output channel 1 feeds nothing -> 2 outputs x 2 inputs x 9
    assert layers["3.weight"] == {"total": 108, "kept": 81, "effective": 36}
    # linear 12 -> 5: features of conv2 channels 0 and 2 live (8), row 3 reaches nothing -> 4 rows x 8
    assert layers["6.weight"] == {"total": 60, "kept": 40, "effective": 32}
    assert layers["8.weight"] == {"total": 10, "kept": 8, "effective": 8}
    assert result["effective"] == 18 + 36 + 32 + 8 and result["kept"] == 27 + 81 + 40 + 8
    assert result["sparsity"] == pytest.approx(1 - 94 / 214) and result["nominal"] == pytest.approx(1 - 156 / 214)


def test_effective_sparsity_is_none_beyond_chains():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(x + self.a(x))

    model = Residual()
    assert effective_sparsity(model, {"a.weight": torch.ones(4, 4, dtype=torch.bool)}, torch.zeros(1, 4)) is None


def test_the_shuffle_check_keeps_each_layers_count_at_random_positions():
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[:5] = True
    alive = torch.ones_like(mask)
    alive[:, 0] = False
    shuffled = shuffle_mask(mask & alive, alive, torch.Generator().manual_seed(0))
    assert int(shuffled.sum()) == int((mask & alive).sum()) and not torch.equal(shuffled, mask & alive)
    assert not shuffled[:, 0].any()  # a pruned entry never comes back


# -- Ray gives the local engine's results ---------------------------------------------------------------

def test_ray_gives_the_local_results_bit_for_bit(tmp_path, data_root):
    ray = pytest.importorskip("ray")
    path = study_file(tmp_path, 'methods = ["snip"]\nbaselines = false\ntargets = [0.9]\nseeds = [0]\n'
                                'sanity = ["shuffle"]\n', data_root=data_root)
    local = run_study(path, tmp_path / "local", workers=2, threads=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="warning")
    try:
        remote = run_study(path, tmp_path / "ray", engine="ray", threads=1, progress=False)
    finally:
        ray.shutdown()
    assert [r["status"] for r in local["runs"]] == [r["status"] for r in remote["runs"]] == ["done"] * 3
    assert [r["label"] for r in remote["runs"]] == ["none", "snip", "snip+shuffle"]
    for a, b in zip(local["runs"], remote["runs"]):
        assert a["folder"] == b["folder"] and a["summary"] == b["summary"] and a["effective"] == b["effective"]
        ra = json.loads((tmp_path / "local" / a["folder"] / "result.json").read_text())
        rb = json.loads((tmp_path / "ray" / b["folder"] / "result.json").read_text())
        for key in ("error", "sparsity", "compression_ratio", "flops", "layers", "params"):
            assert ra[key] == rb[key], key
        ta, _ = checkpoint.load_tensors(tmp_path / "local" / a["folder"] / "model.safetensors")
        tb, _ = checkpoint.load_tensors(tmp_path / "ray" / b["folder"] / "model.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert remote["engine"]["engine"] == "ray"


COMMITTED = sorted(p for p in (Path(__file__).resolve().parents[1] / "studies").glob("*.toml")
                   if p.name != "references.toml")


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_every_committed_study_file_expands_into_runs_the_lab_accepts(path):
    spec = load_spec(path)
    runs = expand(spec)  # each run's config through the lab's resolve
    assert len(runs) >= len(spec.seeds) and all(run.folder.startswith("runs/") for run in runs)
