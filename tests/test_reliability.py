"""A tampered or corrupted run folder loses nothing, and bad input gets one clear line."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import prunelab
from prunelab import checkpoint, cli, structure
from prunelab.criteria.lobster import find_threshold
from prunelab.criteria.synflow import _round_masks
from prunelab.errors import PrunelabError
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig

SHORT = dict(model="lenet300-100", method="magnitude", sparsity=0.9, iterations=30, epochs=None, finetune_epochs=1,
             batch_size=500, lr=0.05, latency=False, val_fraction=0.05)


def config(out, data_root, **overrides):
    return RunConfig(**{**SHORT, "data_root": str(data_root), "out": str(out), **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root):
    """One finished run folder; each test works on its own copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    lab_run.run(config(out, data_root), echo=None)
    return out


def copy_run(finished, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(finished, target)
    return target


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "log.txt"}


def one_line_error(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("prunelab: error: "), err
    return err[0]


# --- data loss ------------------------------------------------------------------------------------------

def test_a_checkpoint_path_outside_the_run_folder_is_refused(finished, tmp_path, data_root):
    a, b = copy_run(finished, tmp_path, "A"), copy_run(finished, tmp_path, "B")
    before = snapshot(a)
    state = json.loads((b / "state.json").read_text())
    state.update(stage=2, epoch=0, checkpoint="../A/model.safetensors")
    (b / "state.json").write_text(json.dumps(state))
    with pytest.raises(PrunelabError, match="state.json is corrupt .*checkpoint must be a ckpt-NNN-NNNN"):
        lab_run.run(config(b, data_root), echo=None)
    assert snapshot(a) == before  # the neighbour is untouched


def test_a_finished_run_is_not_finished_again_and_a_corrupt_checkpoint_is_never_trusted(finished, tmp_path,
                                                                                        data_root):
    run = copy_run(finished, tmp_path)
    result = json.loads((run / "result.json").read_text())
    ckpt = next(run.glob("ckpt-*.safetensors"))
    raw = bytearray(ckpt.read_bytes())
    raw[-64:] = b"\x7f" * 64  # NaN-like bytes over the last tensor
    ckpt.write_bytes(bytes(raw))
    good = snapshot(run)
    again = lab_run.run(config(run, data_root), echo=None)  # finished: its verified result stands
    assert again["error"] == result["error"] and snapshot(run) == good
    (run / "result.json").unlink()  # asked to finish again: from the corrupt checkpoint? refused
    with pytest.raises(PrunelabError, match=f"{ckpt.name} does not match the checksum"):
        lab_run.run(config(run, data_root), echo=None)
    assert (run / "model.safetensors").read_bytes() == good["model.safetensors"]


def test_a_changed_result_of_a_finished_run_is_refused(finished, tmp_path, data_root):
    run = copy_run(finished, tmp_path)
    result = json.loads((run / "result.json").read_text())
    result["error"]["test"] = 0.001
    (run / "result.json").write_text(json.dumps(result))
    with pytest.raises(PrunelabError, match="result.json does not match the checksum"):
        lab_run.run(config(run, data_root), echo=None)


# --- tracebacks that are now one line -------------------------------------------------------------------

def test_an_out_path_longer_than_the_system_allows(capsys, tmp_path, data_root):
    line = one_line_error(capsys, "run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.5",
                          "--iterations", "1", "--data-root", str(data_root), "--out", str(tmp_path / ("x" * 300)))
    assert "File name too long" in line


def test_a_full_disk_is_one_line_and_loses_nothing(finished, tmp_path, data_root, monkeypatch):
    run = copy_run(finished, tmp_path)
    state = json.loads((run / "state.json").read_text())
    state.update(stage=2, epoch=0)  # back to the fine-tuning stage: it will write a checkpoint
    (run / "state.json").write_text(json.dumps(state))
    (run / "result.json").unlink()
    before = snapshot(run)

    calls = {"n": 0}
    real_fsync = os.fsync

    def no_space(fd):  # config.toml is written, then the disk fills up under the next checkpoint
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", no_space)
    with pytest.raises(PrunelabError, match="No space left on device"):
        lab_run.run(config(run, data_root), echo=None)
    after = snapshot(run)
    after.pop("config.toml"), before.pop("config.toml")  # rewritten at every start: it names this --out
    assert calls["n"] >= 2 and after == before  # every other file as it was
    assert not checkpoint.leftover_temporaries(run)
    state = json.loads((run / "state.json").read_text())
    assert checkpoint.file_digest(run / state["checkpoint"]) == state["digests"][state["checkpoint"]]


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(stage="x"), "stage must be an integer"),
    (lambda s: s.pop("history"), "history must be a list"),
    (lambda s: s.clear(), "no config_digest"),
])
def test_a_malformed_state_is_one_line(finished, tmp_path, data_root, change, message):
    run = copy_run(finished, tmp_path)
    state = json.loads((run / "state.json").read_text())
    change(state)
    (run / "state.json").write_text(json.dumps(state))
    with pytest.raises(PrunelabError, match=f"state.json is corrupt \\({message}"):
        lab_run.run(config(run, data_root), echo=None)


def test_a_seed_beyond_64_bits_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, "run", "--model", "lenet300-100", "--seed", "1180591620717411303424",
                          "--out", str(tmp_path / "r"))
    assert "seed must be an integer in [0, 2**63)" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("input_shape"), "input_shape must be a list"),
    (lambda p: p.update(history=[["fc1", True]]), "each history step is"),
    (lambda p: p.update(history=5), "history must be a list"),
])
def test_load_compact_refuses_a_corrupt_plan(tmp_path, change, message):
    model = prunelab.build_model("lenet300-100", seed=0)
    batch = torch.randn(8, 1, 28, 28)
    prunelab.prune(model, "pfec", channels=0.5, data=(batch, torch.zeros(8, dtype=torch.long)))
    small, report = structure.compact(model, batch, name="lenet300-100")
    plan = dict(report.plan)
    change(plan)
    checkpoint.save_tensors(tmp_path / "c.safetensors", checkpoint.model_tensors(small), {"compact": plan})
    with pytest.raises(PrunelabError, match=f"corrupt compaction plan \\({message}"):
        structure.load_compact(tmp_path / "c.safetensors")


# --- accepted although they should not be ----------------------------------------------------------------

def test_a_target_that_keeps_no_weight_is_refused(capsys, tmp_path, data_root):
    with pytest.raises(PrunelabError, match="sparsity 0.999999 keeps none of the 266,200 prunable weights"):
        prunelab.prune(prunelab.build_model("lenet300-100"), "magnitude", sparsity=0.999999)
    line = one_line_error(capsys, "run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity",
                          "0.999999", "--data-root", str(data_root), "--out", str(tmp_path / "r"))
    assert "keeps none" in line and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--momentum", "nan"), ("--finetune-lr", "inf")])
def test_non_finite_numbers_are_refused_before_any_work(capsys, tmp_path, flag, value):
    line = one_line_error(capsys, "run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.5",
                          flag, value, "--out", str(tmp_path / "r"))
    assert "must be a finite number" in line and not (tmp_path / "r").exists()


def test_evaluate_refuses_non_finite_outputs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(PrunelabError, match="outputs are not finite"):
        prunelab.evaluate(model, (x, torch.zeros(10, dtype=torch.long)))


def test_a_zero_budget_is_refused_unless_pruning_at_initialisation(capsys, tmp_path, data_root):
    line = one_line_error(capsys, "run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.5",
                          "--epochs", "0", "--out", str(tmp_path / "r"))
    assert "a training budget of 0 trains nothing" in line
    lab_run.resolve(config(tmp_path / "init", data_root, method="snip", when="init", iterations=0,
                           finetune_epochs=None))


# --- housekeeping -----------------------------------------------------------------------------------------

def test_leftovers_of_a_killed_process_are_removed_on_resume(finished, tmp_path, data_root):
    run = copy_run(finished, tmp_path)
    state = json.loads((run / "state.json").read_text())
    state.update(stage=2, epoch=0)
    (run / "state.json").write_text(json.dumps(state))
    (run / "result.json").unlink()
    (run / ".state.json.abc123.tmp").write_bytes(b"half")
    (run / "ckpt-001-0001.safetensors").write_bytes(b"orphan")
    lab_run.run(config(run, data_root), echo=None)
    assert not checkpoint.leftover_temporaries(run)
    assert [p.name for p in run.glob("ckpt-*")] == [json.loads((run / "state.json").read_text())["checkpoint"]]
    assert "left by an interrupted process" in (run / "log.txt").read_text()


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


# --- method details compared with the authors' code ------------------------------------------------------

def test_lobster_bracket_comes_from_the_weights_even_when_a_bias_is_larger():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(0.1, 1.2, 12).view(3, 4))
        model.bias.copy_(torch.tensor([5.0, 0.05, 0.2]))  # a bias larger than every weight
    params = dict(model.named_parameters())
    search = find_threshold(model, params, lambda: 1.0, twt=0.1)  # every threshold is within the bound
    largest = model.weight.abs().max().item()
    assert 0.9 * largest < search.threshold <= largest  # bisected up to the largest weight, never to the bias
    assert search.evaluations > 4  # the upper end is not taken at once: its loss starts at infinity
    assert torch.equal(model.bias, torch.tensor([5.0, 0.05, 0.2]))


def test_synflow_intermediate_count_follows_the_option():
    scores = {"w": torch.arange(10, dtype=torch.float64)}
    current = {"w": torch.ones(10, dtype=torch.bool)}
    assert int(_round_masks(scores, 0.35, current)["w"].sum()) == 6           # round(0.65 * 10) = 6 (6.5 -> 6)
    assert int(_round_masks(scores, 0.35, current, "ceil")["w"].sum()) == 7   # 10 - int(3.5) = 7 = ceil(6.5)
    assert prunelab.get_method("synflow").options.intermediate_count == "round"


# --- kill -9 at random points resumes bit for bit ---------------------------------------------------------

def test_kill_9_at_random_points_resumes_bit_identical(tmp_path, data_root):
    args = ["run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.8", "--rounds", "2",
            "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "200", "--no-latency",
            "--data-root", str(Path(data_root).resolve()), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prunelab_cli = [sys.executable, "-m", "prunelab.cli"]
    started = time.perf_counter()
    whole = subprocess.run([*prunelab_cli, *args, "--out", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=600)
    seconds = time.perf_counter() - started  # kill points scale with this machine's speed
    assert whole.returncode == 0, whole.stderr
    rng = random.Random(0)
    killed = tmp_path / "killed"
    kills = 0
    for _ in range(3):
        process = subprocess.Popen([*prunelab_cli, *args, "--out", str(killed)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 0.7) * seconds)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    final = subprocess.run([*prunelab_cli, *args, "--out", str(killed)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr
    a, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    b, _ = checkpoint.load_tensors(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "result.json").read_text()) for f in (tmp_path / "whole", killed))
    assert ra["error"] == rb["error"] and ra["prune_events"][-1]["kept"] == rb["prune_events"][-1]["kept"]
    assert not checkpoint.leftover_temporaries(killed)
    assert kills >= 1  # at least one kill landed mid-run
