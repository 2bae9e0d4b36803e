"""Pickle-free checkpoints: masks survive save and load, optimizer state round-trips, writes are atomic."""

import json

import pytest
import torch

import prunelab
from prunelab import checkpoint, masking


def pruned_lenet(seed=0):
    model = prunelab.build_model("lenet300-100", seed=seed)
    prunelab.prune(model, "random", sparsity=0.8, seed=seed)
    return model


def test_masks_survive_save_and_load(tmp_path):
    model = pruned_lenet()
    prunelab.save_model(tmp_path / "m.safetensors", model, {"note": "hello"})
    fresh = prunelab.build_model("lenet300-100", seed=1)
    meta = prunelab.load_model(tmp_path / "m.safetensors", fresh)
    assert meta == {"note": "hello"}
    saved, loaded = prunelab.masks(model), prunelab.masks(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    # the loaded masks are live: training keeps the pruned weights at zero
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        fresh(torch.randn(8, 1, 28, 28)).sum().backward()
        opt.step()
    assert torch.count_nonzero(fresh.fc1.weight[~loaded["fc1.weight"]]) == 0


def test_file_holds_no_pickle_and_loads_with_safetensors_alone(tmp_path):
    from safetensors.torch import load_file
    prunelab.save_model(tmp_path / "m.safetensors", pruned_lenet())
    tensors = load_file(tmp_path / "m.safetensors")
    assert tensors["mask::fc1.weight"].dtype == torch.bool
    assert "fc1.weight" in tensors and b"\x80\x02" not in (tmp_path / "m.safetensors").read_bytes()[:8]


def test_make_permanent_then_save_has_no_masks(tmp_path):
    model = pruned_lenet()
    kept = int(prunelab.masks(model)["fc1.weight"].sum())
    prunelab.make_permanent(model)
    prunelab.save_model(tmp_path / "p.safetensors", model)
    tensors, _ = checkpoint.load_tensors(tmp_path / "p.safetensors")
    assert not any(k.startswith("mask::") for k in tensors)
    assert int(torch.count_nonzero(tensors["fc1.weight"])) == kept


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    prunelab.save_model(path, pruned_lenet())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(prunelab.PrunelabError, match="cannot read checkpoint"):
        prunelab.load_model(path, prunelab.build_model("lenet300-100"))
    prunelab.save_model(path, pruned_lenet())
    with pytest.raises(prunelab.PrunelabError, match="does not fit this model"):
        prunelab.load_model(path, prunelab.build_model("lenet5-caffe"))


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
                                  lambda p: torch.optim.Adam(p, lr=1e-3)], ids=["sgd", "adam"])
def test_optimizer_state_round_trips(tmp_path, make):
    model = pruned_lenet()
    opt = make(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
    tensors, rest = checkpoint.optimizer_tensors(opt)
    checkpoint.save_tensors(tmp_path / "o.safetensors", tensors, rest)
    loaded, meta = checkpoint.load_tensors(tmp_path / "o.safetensors")
    other = make(model.parameters())
    checkpoint.restore_optimizer(other, loaded, meta)
    a, b = opt.state_dict(), other.state_dict()
    as_json = lambda groups: json.loads(json.dumps(groups))  # tuples (Adam's betas) become lists
    assert as_json(a["param_groups"]) == as_json(b["param_groups"])
    assert set(a["state"]) == set(b["state"]) == set(range(6))  # 3 weights + 3 biases
    for index, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), key


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    checkpoint.write_json(path, {"old": True})

    def broken_replace(*_):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError):
        checkpoint.write_json(path, {"new": True})
    assert checkpoint.read_json(path) == {"old": True}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_masking_copy_keeps_masks_independent():
    model = pruned_lenet()
    clone = masking.copy_model(model)
    assert torch.equal(prunelab.masks(clone)["fc1.weight"], prunelab.masks(model)["fc1.weight"])
