"""The lab: a real MNIST run end to end, result.json, resume equals uninterrupted, rewinding."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from prunelab import checkpoint, masking
from prunelab.errors import PrunelabError, TrainingDiverged
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig
from prunelab.models import build_model
from prunelab.training import Trainer, derive_seed

SHORT = dict(model="lenet300-100", method="magnitude", sparsity=0.9, epochs=2, finetune_epochs=1,
             lr=0.05, weight_decay=1e-4, latency=False)


def config(tmp_path, data_root, name="run", **overrides):
    return RunConfig(**{**SHORT, "data_root": str(data_root), "out": str(tmp_path / name), **overrides})


def test_run_writes_result_with_exact_sparsity(tmp_path, data_root):
    result = lab_run.run(config(tmp_path, data_root), echo=None)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["schema"] == "prunelab.result/1"
    assert saved["sparsity"] == pytest.approx(0.9, abs=1e-12)
    assert saved["params"]["prunable_kept"] == round(0.1 * 266200)
    assert saved["params"]["total"] == 266610
    assert saved["error"]["test"] < 0.05  # three short epochs on real MNIST
    assert saved["flops"]["dense"] == 2 * 266200 and saved["flops"]["effective"] == 2 * 26620
    assert [e["stage"] for e in saved["prune_events"]] == ["prune-1"]
    assert [h["stage_name"] for h in saved["history"]] == ["pretrain", "pretrain", "finetune-1"]
    assert {"name", "shape", "params", "nonzero", "sparsity", "flops"} <= set(saved["layers"][0])
    assert result["error"] == saved["error"]
    for name in ("config.toml", "state.json", "log.txt", "model.safetensors", "rewind.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert len(list((tmp_path / "run").glob("ckpt-*.safetensors"))) == 1  # only the latest is kept
    # the pruned model is also stored sparse: the same weights and masks, a fraction of the bytes
    sizes = saved["file_bytes"]
    assert sizes["dense"] == (tmp_path / "run" / "model.safetensors").stat().st_size
    assert sizes["sparse"] < sizes["dense"] / 4
    from prunelab import sparse
    dense_model, sparse_model = (build_model("lenet300-100") for _ in range(2))
    checkpoint.load_model(tmp_path / "run" / "model.safetensors", dense_model)
    sparse.load_sparse(tmp_path / "run" / "model.sparse.safetensors", sparse_model)
    assert all(torch.equal(a, b) for a, b in zip(dense_model.state_dict().values(), sparse_model.state_dict().values()))
    assert masking.masks(dense_model).keys() == masking.masks(sparse_model).keys()
    assert all(torch.equal(masking.masks(dense_model)[n], m) for n, m in masking.masks(sparse_model).items())


def test_resume_equals_uninterrupted(tmp_path, data_root, monkeypatch):
    whole = lab_run.run(config(tmp_path, data_root, "whole"), echo=None)

    calls = {"n": 0}
    original = Trainer.run_epoch

    def crash_on_second_epoch(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(config(tmp_path, data_root, "resumed"), echo=None)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (0, 1)  # stopped after the first pre-training epoch
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = lab_run.run(config(tmp_path, data_root, "resumed"), echo=None)

    assert resumed["error"] == whole["error"]
    a, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    b, _ = checkpoint.load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dense(tmp_path, data_root, name="dense", **overrides):
    """The dense run whose training is SHORT's pre-training."""
    keys = {k: v for k, v in SHORT.items() if k not in ("method", "sparsity", "finetune_epochs")}
    return RunConfig(**{**keys, "method": "none", "data_root": str(data_root), "out": str(tmp_path / name),
                        **overrides})


def test_pretrained_run_stands_in_for_the_same_pretraining(tmp_path, data_root, monkeypatch):
    lab_run.run(_dense(tmp_path, data_root), echo=None)
    whole = lab_run.run(config(tmp_path, data_root, "whole"), echo=None)
    epochs = {"n": 0}
    original = Trainer.run_epoch

    def counted(self, epoch):
        epochs["n"] += 1
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", counted)
    adopted = lab_run.run(config(tmp_path, data_root, "adopted", pretrained_run=str(tmp_path / "dense")), echo=None)
    assert epochs["n"] == 1  # the fine-tuning epoch alone: the two pre-training epochs were read
    assert adopted["pretrained"]["run"] == str(tmp_path / "dense") and whole["pretrained"] is None
    for key in ("error", "params", "stage_results", "kept_epochs"):
        assert adopted[key] == whole[key], key
    untimed = [[{k: v for k, v in e.items() if k != "seconds"} for e in r["prune_events"]] for r in (adopted, whole)]
    assert untimed[0] == untimed[1]
    assert [h["val_error"] for h in adopted["history"]] == [h["val_error"] for h in whole["history"]]
    assert [h["stage_name"] for h in adopted["history"]] == ["pretrain", "pretrain", "finetune-1"]
    a, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    b, _ = checkpoint.load_tensors(tmp_path / "adopted" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lab_run.resolve(config(tmp_path, data_root)).digest() == \
        lab_run.resolve(config(tmp_path, data_root, pretrained_run="x")).digest()  # where it reads: not hashed


def test_pretrained_run_must_be_the_same_finished_pretraining(tmp_path, data_root):
    lab_run.run(_dense(tmp_path, data_root, "other", lr=0.01, epochs=1), echo=None)
    with pytest.raises(PrunelabError, match="trained other settings"):
        lab_run.run(config(tmp_path, data_root, "a", pretrained_run=str(tmp_path / "other")), echo=None)
    with pytest.raises(PrunelabError, match="not a finished run folder"):
        lab_run.run(config(tmp_path, data_root, "b", pretrained_run=str(tmp_path / "nowhere")), echo=None)
    with pytest.raises(PrunelabError, match="when = 'trained'"):
        lab_run.run(config(tmp_path, data_root, "c", when="init", finetune_epochs=None,
                           pretrained_run=str(tmp_path / "other")), echo=None)


def test_resume_refuses_a_different_config(tmp_path, data_root):
    lab_run.run(config(tmp_path, data_root, epochs=1, finetune_epochs=0), echo=None)
    with pytest.raises(PrunelabError, match=r"different config \(sparsity 0.9 there, 0.5 here\)"):
        lab_run.run(config(tmp_path, data_root, epochs=1, finetune_epochs=0, sparsity=0.5), echo=None)


def test_resume_does_not_depend_on_where_the_data_is_read_from(tmp_path, data_root, monkeypatch):
    short = dict(iterations=2, epochs=None, finetune_epochs=0)
    first = lab_run.run(config(tmp_path, data_root, **short), echo=None)
    monkeypatch.setenv("PRUNELAB_DATA", str(data_root))  # the same data, found through the environment
    again = dataclasses.replace(config(tmp_path, data_root, **short), data_root=None)
    assert lab_run.run(again, echo=None)["error"] == first["error"]
    state_file = tmp_path / "run" / "state.json"
    state = json.loads(state_file.read_text())  # a folder written before data_root left the digest
    state["config_digest"] = lab_run.resolve(config(tmp_path, data_root, **short)).digest(legacy=True)
    state_file.write_text(json.dumps(state))
    assert lab_run.run(config(tmp_path, data_root, **short), echo=None)["error"] == first["error"]
    state["config_digest"] = "0badf00d"
    state_file.write_text(json.dumps(state))
    with pytest.raises(PrunelabError, match="different config"):
        lab_run.run(config(tmp_path, data_root, **short), echo=None)


def test_a_folder_that_holds_no_run_is_never_written(tmp_path, data_root):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# my own notes\n")
    with pytest.raises(PrunelabError, match="holds no prunelab run"):
        lab_run.run(config(tmp_path, data_root, "mine", iterations=2, epochs=None), echo=None)
    assert [p.name for p in mine.iterdir()] == ["config.toml"]
    assert (mine / "config.toml").read_text() == "# my own notes\n"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PrunelabError, match="is a file"):
        lab_run.run(config(tmp_path, data_root, "afile", iterations=2, epochs=None), echo=None)


def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, data_root, monkeypatch):
    cfg = config(tmp_path, data_root, "early_stop", iterations=3, epochs=None, method="none", sparsity=0.0)
    monkeypatch.setattr(lab_run.Run, "_train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(cfg, echo=None)
    assert json.loads((tmp_path / "early_stop" / "state.json").read_text())["checkpoint"] is None
    monkeypatch.undo()
    result = lab_run.run(cfg, echo=None)
    assert result["history"][-1]["steps"] == 3


def test_a_folder_in_use_by_another_process_is_refused(tmp_path, data_root):
    cfg = config(tmp_path, data_root, "busy", iterations=3, epochs=None, method="none", sparsity=0.0)
    folder = tmp_path / "busy"
    folder.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid()}  # a live process holds the folder
    (folder / "LOCK").write_text(json.dumps(me))
    with pytest.raises(PrunelabError, match=f"busy is in use by process {os.getpid()} on "):
        lab_run.run(cfg, echo=None)
    assert [p.name for p in folder.iterdir()] == ["LOCK"]  # nothing written, the owner's lock kept

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "LOCK").write_text(json.dumps({**me, "pid": int(gone.stdout)}))  # left by a process that ended
    assert lab_run.run(cfg, echo=None)["history"][-1]["steps"] == 3
    assert not (folder / "LOCK").exists()  # released at the end


def test_the_lock_is_released_when_a_run_stops(tmp_path, data_root, monkeypatch):
    cfg = config(tmp_path, data_root, "stops", iterations=3, epochs=None, method="none", sparsity=0.0)
    monkeypatch.setattr(Trainer, "run_epoch", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(cfg, echo=None)
    assert (tmp_path / "stops" / "state.json").exists() and not (tmp_path / "stops" / "LOCK").exists()


def test_a_diverging_run_says_so_in_its_log(tmp_path, data_root):
    cfg = config(tmp_path, data_root, "diverges", iterations=30, epochs=None, method="none", sparsity=0.0,
                 lr=1e6, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match="training diverged .* epoch 1"):
        lab_run.run(cfg, echo=None)
    log = (tmp_path / "diverges" / "log.txt").read_text()
    assert "train epoch   1/1  training diverged (loss is nan)" in log
    assert not (tmp_path / "diverges" / "result.json").exists()


def test_rewind_early_rewinds_to_the_given_step(tmp_path, data_root):
    common = dict(iterations=6, epochs=None, val_fraction=0.05, lr_schedule="constant")
    dense = lab_run.run(config(tmp_path, data_root, "three", method="none", sparsity=0.0,
                               **{**common, "iterations": 3}), echo=None)
    assert dense["history"][-1]["steps"] == 3
    lab_run.run(config(tmp_path, data_root, "early", rewind="early", rewind_iteration=3, **common), echo=None)
    after_three, _ = checkpoint.load_tensors(tmp_path / "three" / "model.safetensors")
    rewound, _ = checkpoint.load_tensors(tmp_path / "early" / "rewind.safetensors")
    assert torch.equal(rewound["fc1.weight"], after_three["fc1.weight"])


@pytest.mark.parametrize("overrides, message", [
    (dict(rewind="early"), "needs rewind_iteration >= 1"),
    (dict(rewind="init", rewind_iteration=5), "applies to rewind = 'early'"),
    (dict(rewind="early", rewind_iteration=7), "past the end of pre-training"),
])
def test_rewind_iteration_is_checked_before_training(tmp_path, data_root, overrides, message):
    with pytest.raises(PrunelabError, match=message):
        lab_run.run(config(tmp_path, data_root, "bad", iterations=6, epochs=None, **overrides), echo=None)
    assert not (tmp_path / "bad").exists()


def test_lottery_ticket_rewinds_to_init_and_keeps_masks(tmp_path, data_root):
    # no finetune_epochs: each retraining after a rewind gets the full training budget (LTH)
    cfg = config(tmp_path, data_root, "lth", iterations=30, epochs=None, rounds=2, rewind="init",
                 sparsity=0.75, val_fraction=0.05, finetune_epochs=None)
    stages = [s.name for s in lab_run.plan(lab_run.resolve(cfg))]
    assert stages == ["pretrain", "prune-1", "rewind-1", "retrain-1", "prune-2", "rewind-2", "retrain-2"]
    result = lab_run.run(cfg, echo=None)
    events = result["prune_events"]
    assert events[0]["sparsity"] == pytest.approx(0.5, abs=1e-5)  # geometric: sqrt(0.25) kept
    assert result["sparsity"] == pytest.approx(0.75, abs=1e-12)
    assert [h["steps"] for h in result["history"]] == [30, 30, 30]  # iteration budget, one short epoch each


def test_rewind_restores_initial_weights_under_masks(tmp_path, data_root):
    cfg = lab_run.resolve(config(tmp_path, data_root, "rw", iterations=5, epochs=None, rewind="init"))
    run = lab_run.Run(cfg, echo=None)
    run.out.mkdir(parents=True)
    import prunelab
    run.model = prunelab.build_model("lenet300-100", seed=0)
    initial = {k: v.clone() for k, v in run.model.state_dict().items()}
    checkpoint.save_model(run.out / "rewind.safetensors", run.model)
    with torch.no_grad():
        run.model.fc1.weight.add_(1.0)
    prunelab.prune(run.model, "random", sparsity=0.5, seed=0)
    mask = prunelab.masks(run.model)["fc1.weight"]
    run._rewind(lab_run.Stage("rewind", "rewind-1"), {})
    assert torch.equal(run.model.fc1.weight, initial["fc1.weight"] * mask)
    assert torch.equal(masking.masks(run.model)["fc1.weight"], mask)


def test_reinit_trains_a_fresh_draw_under_the_same_masks(tmp_path, data_root):
    base = dict(method="random", sparsity=0.5, iterations=0, epochs=None, val_fraction=0.05, finetune_epochs=None)
    scored = lab_run.run(config(tmp_path, data_root, "scored", **base), echo=None)
    fresh = lab_run.run(config(tmp_path, data_root, "fresh", reinit=True, **base), echo=None)
    assert [s.name for s in lab_run.plan(lab_run.resolve(config(tmp_path, data_root, reinit=True, **base)))] \
        == ["prune", "reinit", "train"]
    a, _ = checkpoint.load_tensors(tmp_path / "scored" / "model.safetensors")
    b, _ = checkpoint.load_tensors(tmp_path / "fresh" / "model.safetensors")
    assert torch.equal(a["mask::fc1.weight"], b["mask::fc1.weight"])
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])
    assert torch.equal(b["fc1.weight"] != 0, b["mask::fc1.weight"])
    assert scored["sparsity"] == fresh["sparsity"]
    # reinit_init: scored at one initialisation, trained from a fresh draw of another (SNIP Table 3)
    lab_run.run(config(tmp_path, data_root, "vs-x", reinit=True, init="vs-h", reinit_init="vs-x", **base), echo=None)
    c, _ = checkpoint.load_tensors(tmp_path / "vs-x" / "model.safetensors")
    expected = build_model("lenet300-100", init="vs-x", seed=derive_seed(0, "reinit") % 2**31).fc1.weight
    assert torch.equal(c["fc1.weight"], expected.detach() * c["mask::fc1.weight"])
    # init_bias = "vs" (the SNIP code's biases before pruning): scored with them, the fresh draw starts at 0
    options = {"model_options": {"init_bias": "vs"}}
    lab_run.run(config(tmp_path, data_root, "bias", init="vs", **options, **base), echo=None)
    lab_run.run(config(tmp_path, data_root, "bias-fresh", init="vs", reinit=True, **options, **base), echo=None)
    d, _ = checkpoint.load_tensors(tmp_path / "bias" / "model.safetensors")
    e, _ = checkpoint.load_tensors(tmp_path / "bias-fresh" / "model.safetensors")
    assert torch.count_nonzero(d["fc1.bias"]) == 300 and torch.count_nonzero(e["fc1.bias"]) == 0


def test_keep_best_ends_each_stage_on_its_lowest_validation_error(tmp_path, data_root):
    cfg = config(tmp_path, data_root, "best", iterations=None, epochs=3, finetune_epochs=2, keep_best=True, lr=0.3)
    result = lab_run.run(cfg, echo=None)
    for stage in ("pretrain", "finetune-1"):
        errors = [h["val_error"] for h in result["history"] if h["stage_name"] == stage]
        kept = next(k for k in result["kept_epochs"] if k["stage"] == stage)
        assert kept["val_error"] == min(errors) and errors[kept["epoch"] - 1] == min(errors)
    assert result["error"]["val"] == pytest.approx(min(errors), abs=1e-12)  # the final model is that epoch's
    assert result["stage_results"][-1]["val_error"] == min(errors)


def test_keep_best_needs_validation_data(tmp_path, data_root):
    with pytest.raises(PrunelabError, match="keep_best"):
        lab_run.resolve(config(tmp_path, data_root, keep_best=True, val_fraction=0.0))


def test_keep_best_survives_an_interruption(tmp_path, data_root, monkeypatch):
    """Epoch 1 is made the best one; a run stopped during epoch 2 must still end on epoch 1's weights."""
    original_evaluate, original_epoch = lab_run.evaluate, Trainer.run_epoch

    def scripted(val_errors):  # validation errors in call order (the val split holds 6,000 images)
        queue = iter(val_errors)

        def evaluate(model, data, **kwargs):
            result = original_evaluate(model, data, **kwargs)
            return {**result, "error": next(queue, 0.9)} if len(data) == 6000 else result
        return evaluate

    def cfg(name):
        return config(tmp_path, data_root, name, keep_best=True, finetune_epochs=0)

    monkeypatch.setattr(lab_run, "evaluate", scripted([0.01, 0.5]))
    whole = lab_run.run(cfg("whole"), echo=None)

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original_epoch(self, epoch)

    monkeypatch.setattr(lab_run, "evaluate", scripted([0.01]))
    monkeypatch.setattr(Trainer, "run_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(cfg("resumed"), echo=None)
    monkeypatch.setattr(Trainer, "run_epoch", original_epoch)
    monkeypatch.setattr(lab_run, "evaluate", scripted([0.5]))
    resumed = lab_run.run(cfg("resumed"), echo=None)

    assert whole["kept_epochs"] == resumed["kept_epochs"] == [{"stage": "pretrain", "epoch": 1, "val_error": 0.01}]
    a, _ = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")
    b, _ = checkpoint.load_tensors(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
