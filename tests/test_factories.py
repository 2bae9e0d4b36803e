"""A user's model and data in the lab: factories "module.path:callable" in a run config, their one-line
refusals, resuming, zoo digests unchanged; compact models of any architecture saved and loaded back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunelab
from prunelab import checkpoint, cli, structure
from prunelab.errors import PrunelabError
from prunelab.lab import run as lab_run
from prunelab.lab.config import CONFIGS, RunConfig, make_config, read_toml
from prunelab.training import Trainer

import families

TESTS = Path(__file__).resolve().parent
RUN = dict(model="user_models:build", dataset="user_models:data", method="magnitude", sparsity=0.5, epochs=1,
           lr=0.1, batch_size=32, latency=False)


def config(tmp_path, name="run", **overrides):
    return RunConfig(**{**RUN, "out": str(tmp_path / name), **overrides})


def test_a_factory_model_trains_and_prunes_on_factory_data(tmp_path):
    result = lab_run.run(config(tmp_path), echo=None)
    assert result["model"] == "user_models:build" and result["dataset"] == "user_models:data"
    assert result["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [h["stage_name"] for h in result["history"]] == ["pretrain", "finetune-1"]
    assert result["error"]["val"] is not None and 0 <= result["error"]["test"] <= 1
    assert result["layers"][-1]["shape"] == [3, 32]  # num_classes inferred from the targets: max + 1
    recorded = read_toml(tmp_path / "run" / "config.toml")
    assert recorded["model"] == "user_models:build" and recorded["dataset"] == "user_models:data"
    # the folder's own config.toml runs it again: the finished run stands
    again = lab_run.run(make_config(recorded), echo=None)
    assert again["error"] == result["error"]


def test_a_stopped_factory_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    whole = lab_run.run(config(tmp_path, "whole"), echo=None)
    original, calls = Trainer.run_epoch, {"n": 0}

    def stop_in_the_second_stage(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:  # pretrain done, pruned: stopped at fine-tuning's first epoch
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", stop_in_the_second_stage)
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(config(tmp_path, "resumed"), echo=None)
    assert not (tmp_path / "resumed" / "result.json").exists()
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = lab_run.run(make_config(read_toml(tmp_path / "resumed" / "config.toml")), echo=None)
    assert resumed["error"] == whole["error"] and resumed["history"] == [
        {**h, "seconds": r["seconds"]} for h, r in zip(whole["history"], resumed["history"])]
    a = checkpoint.load_tensors(tmp_path / "whole" / "model.safetensors")[0]
    b = checkpoint.load_tensors(tmp_path / "resumed" / "model.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_dict_form_gives_the_class_count_and_no_validation_split(tmp_path):
    result = lab_run.run(config(tmp_path, model="user_models:fixed", dataset="user_models:data_dict",
                                method="snip", when="init", epochs=1), echo=None)
    assert result["error"]["val"] is None and result["layers"][-1]["shape"] == [3, 16]


def test_a_factory_model_on_a_zoo_dataset(tmp_path, data_root):
    result = lab_run.run(config(tmp_path, model="user_models:build_mnist", dataset="mnist", method="none",
                                sparsity=0.0, epochs=None, iterations=3, data_root=str(data_root)), echo=None)
    assert result["layers"][-1]["shape"] == [10, 16] and result["error"]["test"] < 1


def test_the_cli_runs_a_factory_config(tmp_path):
    (tmp_path / "user.toml").write_text('model = "user_models:build"\ndataset = "user_models:data"\n'
                                        'method = "magnitude"\nsparsity = 0.5\nepochs = 1\nlatency = false\n'
                                        'out = "runs/user"\n\n[model_options]\nwidth = 16\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "prunelab", "run", "user.toml", "--quiet"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "runs" / "user" / "result.json").read_text())
    assert result["model"] == "user_models:build" and result["layers"][0]["shape"] == [16, 8]


@pytest.mark.parametrize("overrides, message", [
    (dict(model="no_such_module_x:build"),
     "cannot import module 'no_such_module_x' for model 'no_such_module_x:build': No module named"),
    (dict(model="user_models:nothing"), "module 'user_models' has no attribute 'nothing'"),
    (dict(model="user_models:not_callable"), "model factory 'user_models:not_callable' is not callable (it is a int)"),
    (dict(dataset="user_models:nothing"), "module 'user_models' has no attribute 'nothing' (the dataset factory"),
    (dict(model="user_models:"), "invalid model factory 'user_models:': expected 'module.path:callable'"),
    (dict(dataset=None), "model 'user_models:build' is a factory: give the dataset"),
    (dict(model_options={"depth": 3}), "unknown option 'depth' for model factory 'user_models:build'; its options: width"),
])
def test_bad_factory_names_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(PrunelabError) as error:
        lab_run.run(config(tmp_path, **overrides), echo=None)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(model="user_models:not_a_module"), "model factory 'user_models:not_a_module' returned a list, not a torch nn.Module"),
    (dict(dataset="user_models:two_splits"), "dataset factory 'user_models:two_splits' returned a tuple of 2 items, not (train, val, test)"),
    (dict(model="lenet300-100", dataset="user_models:data"), "model lenet300-100 expects inputs of shape (1, 28, 28), dataset user_models:data gives (8,)"),
])
def test_factories_returning_the_wrong_thing_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(PrunelabError) as error:
        lab_run.run(config(tmp_path, **overrides), echo=None)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_bad_factory_in_one_line(capsys, tmp_path):
    code = cli.main(["run", "--model", "no_such_module_x:build", "--dataset", "user_models:data",
                     "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot import module 'no_such_module_x'" in err[0]


def test_zoo_config_digests_are_unchanged():
    """Digests computed by the code before factories existed (commit 81fa86d): zoo run folders resume."""
    for name, digest, legacy in [("quickstart", "72870d95", "5d98b212"), ("relief_lenet300-100", "4e905979", "c80a1eb7")]:
        resolved = lab_run.resolve(make_config(read_toml(CONFIGS / f"{name}.toml")))
        assert (resolved.digest(), resolved.digest(legacy=True)) == (digest, legacy), name
    short = lab_run.resolve(RunConfig(model="lenet300-100", method="magnitude", sparsity=0.9, epochs=2,
                                      finetune_epochs=1, lr=0.05))
    assert (short.digest(), short.digest(legacy=True)) == ("0d5511db", "2d5a01ed")
    assert lab_run.resolve(RunConfig(model="resnet20", method="pfec", channels=0.5)).digest() == "f7c56432"


# --- compact models of architectures outside the zoo ------------------------------------------------------

@pytest.mark.parametrize("family", ["conv1d", "mobilenet"])
def test_a_compact_model_outside_the_zoo_saves_and_loads(tmp_path, family):
    model, data = getattr(families, family)(seed=0)
    prunelab.prune(model, "pfec", channels=0.25, data=data)
    x = data.tensors[0]
    small, report = prunelab.compact(model, x[:1])
    small.eval()
    with torch.no_grad():
        expected = small(x)
    fresh = lambda: getattr(families, family)(seed=1)[0]  # noqa: E731  (other weights: all are loaded)

    structure.save_compact(tmp_path / "anonymous.safetensors", small, report.plan)  # no name: allowed
    with pytest.raises(PrunelabError, match="names no model to rebuild: pass model="):
        structure.load_compact(tmp_path / "anonymous.safetensors")
    loaded = structure.load_compact(tmp_path / "anonymous.safetensors", model=fresh())
    structure.save_compact(tmp_path / "named.safetensors", small, report.plan, name=f"user_models:{family}")
    rebuilt = structure.load_compact(tmp_path / "named.safetensors")
    with torch.no_grad():
        for again in (loaded, rebuilt):
            assert (again(x) - expected).abs().max() <= 1e-6
            assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in small.parameters())


def test_a_name_load_compact_cannot_rebuild_is_refused_at_save_time(tmp_path):
    model, data = families.conv1d(seed=0)
    prunelab.prune(model, "pfec", channels=0.25, data=data)
    small, report = prunelab.compact(model, data.tensors[0][:1])
    for name, message in [("ResCNN", "cannot record model name 'ResCNN': load_compact could not rebuild it"),
                          ("user_models:nothing", "module 'user_models' has no attribute 'nothing'"),
                          ("no_such_module_x:f", "cannot import module 'no_such_module_x'")]:
        with pytest.raises(PrunelabError) as error:
            structure.save_compact(tmp_path / "c.safetensors", small, report.plan, name=name)
        assert message in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "c.safetensors").exists()
    with pytest.raises(PrunelabError, match="the plan does not fit model MobileNetLike"):
        structure.save_compact(tmp_path / "c.safetensors", small, report.plan)
        structure.load_compact(tmp_path / "c.safetensors", model=families.MobileNetLike())


def test_a_structured_run_of_a_factory_model_writes_a_compact_model_that_reloads(tmp_path):
    result = lab_run.run(config(tmp_path, method="pfec", sparsity=0.0, channels=0.25), echo=None)
    assert result["structured"]["compact_max_abs_diff"] <= 1e-5
    small = structure.load_compact(tmp_path / "run" / "compact.safetensors")  # rebuilt by the factory
    assert small.body[1].out_features == 24
    x = torch.randn(4, 8)
    assert small(x).shape == (4, 3)
