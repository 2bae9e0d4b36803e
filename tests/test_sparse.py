"""Sparse file format (prunelab.sparse) and sparse inference (prunelab.inference)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import prunelab
from prunelab import masking
from prunelab.inference import SparseLinear, sparsify
from prunelab.sparse import load_sparse, load_sparse_state, read_metadata, save_sparse


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern, -0.0 taken as +0.0 (pruned positions load as +0.0)."""
    t = t.detach() + 0 if t.is_floating_point() else t.detach()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def _lenet(sparsity: float, dtype=torch.float32) -> nn.Module:
    model = prunelab.build_model("lenet300-100", seed=0).to(dtype)
    prunelab.prune(model, "magnitude", sparsity)
    return model


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype
        assert torch.equal(_bits(sa[name]), _bits(sb[name])), name
    ma, mb = masking.masks(a), masking.masks(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        assert mb[name].dtype == torch.bool and torch.equal(ma[name], mb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_bitwise(tmp_path, dtype):
    model = _lenet(0.9, dtype)
    info = save_sparse(tmp_path / "m.safetensors", model, metadata={"note": "x"})
    assert set(info["encodings"].values()) <= {"csr", "bitmask", "dense"}
    fresh = prunelab.build_model("lenet300-100", seed=1).to(dtype)
    assert load_sparse(tmp_path / "m.safetensors", fresh) is fresh
    _assert_same(model, fresh)
    state, masks = load_sparse_state(tmp_path / "m.safetensors")
    assert set(masks) == set(masking.masks(model)) and state["fc1.weight"].dtype == dtype
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "prunelab-sparse" and meta["version"] == 1 and meta["user"] == {"note": "x"}
    x = torch.randn(5, 1, 28, 28, dtype=dtype)
    assert torch.equal(model(x), fresh(x))


def test_both_encodings_and_bias_masks_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5), nn.Conv2d(1, 4, 3))
    masks = {"0.weight": torch.rand(30, 40) < 0.02,  # very sparse: CSR is smaller
             "0.bias": torch.rand(30) < 0.5,          # 1-D mask
             "2.weight": torch.rand(5, 30) < 0.7,     # dense-ish: bitmask is smaller
             "3.weight": torch.rand(4, 1, 3, 3) < 0.1}
    masking.attach(model, masks)
    info = save_sparse(tmp_path / "m.safetensors", model)
    assert info["encodings"]["0.weight"] == "csr" and info["encodings"]["2.weight"] == "bitmask"
    fresh = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5), nn.Conv2d(1, 4, 3))
    load_sparse(tmp_path / "m.safetensors", fresh)
    _assert_same(model, fresh)


def test_fp16_values_smaller_and_within_rounding(tmp_path):
    model = _lenet(0.95)
    save_sparse(tmp_path / "full.safetensors", model)
    save_sparse(tmp_path / "half.safetensors", model, values_dtype=torch.float16)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.75 * (tmp_path / "full.safetensors").stat().st_size
    fresh = load_sparse(tmp_path / "half.safetensors", prunelab.build_model("lenet300-100", seed=1))
    for name, value in model.state_dict().items():
        loaded = fresh.state_dict()[name]
        assert loaded.dtype == value.dtype
        assert torch.allclose(loaded, value, rtol=2 ** -10, atol=1e-7), name
        assert torch.equal(loaded, value.half().float()), name
    assert all(torch.equal(a, b) for a, b in zip(masking.masks(model).values(), masking.masks(fresh).values()))


def test_size_target_at_95_percent(tmp_path):
    model = _lenet(0.95)
    prunelab.save_model(tmp_path / "dense.safetensors", model)
    save_sparse(tmp_path / "sparse.safetensors", model)
    dense = (tmp_path / "dense.safetensors").stat().st_size
    sparse = (tmp_path / "sparse.safetensors").stat().st_size
    assert sparse * 12 <= dense, (dense, sparse)


def test_corrupt_and_foreign_files_one_line_error(tmp_path):
    model = _lenet(0.9)
    path = tmp_path / "m.safetensors"
    save_sparse(path, model)
    raw = path.read_bytes()
    cases = {"truncated.safetensors": raw[: len(raw) // 2], "garbage.safetensors": b"not a file at all",
             "empty.safetensors": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    prunelab.save_model(tmp_path / "dense.safetensors", model)  # foreign: a dense checkpoint
    # a well-formed safetensors file whose metadata lies about a tensor
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    meta = json.loads(header["__metadata__"]["json"])
    meta["tensors"]["fc1.weight"]["nnz"] += 1
    header["__metadata__"]["json"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    (tmp_path / "lying.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + header_len:])
    for name in [*cases, "dense.safetensors", "lying.safetensors", "missing.safetensors"]:
        with pytest.raises(prunelab.PrunelabError) as info:
            load_sparse(tmp_path / name, prunelab.build_model("lenet300-100", seed=0))
        assert "\n" not in str(info.value) and str(tmp_path / name) in str(info.value), name


def test_wrong_model_one_line_error(tmp_path):
    save_sparse(tmp_path / "m.safetensors", _lenet(0.9))
    with pytest.raises(prunelab.PrunelabError, match="does not fit"):
        load_sparse(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(3, 3)))


def test_sparsify_outputs_equal_and_report(tmp_path):
    model = _lenet(0.95)
    x = torch.randn(16, 1, 28, 28)
    expected = model(x)
    fast, report = sparsify(model, x, rounds=2)
    assert torch.allclose(fast(x), expected, atol=1e-5, rtol=0)
    assert [layer["name"] for layer in report.layers] == ["fc1", "fc2", "fc3"]
    for layer in report.layers:
        assert {"name", "shape", "input", "sparsity", "dense_us", "sparse_us", "speedup", "choice", "reason"} <= set(layer)
        assert layer["choice"] in ("sparse", "dense") and layer["input"] == [16, layer["shape"][1]]
        replaced = isinstance(fast.get_submodule(layer["name"]), SparseLinear)
        assert replaced == (layer["choice"] == "sparse")
        if layer["choice"] == "sparse":
            assert layer["speedup"] >= report.margin
    assert masking.masks(model), "the original model keeps its masks"
    assert json.dumps(report.as_dict()) and str(report)


def test_sparsify_forced_modes_and_unpruned_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 8))
    masking.attach(model, {"0.weight": torch.rand(30, 20) < 0.3, "2.weight": torch.ones(8, 30, dtype=torch.bool)})
    x = torch.randn(4, 20)
    fast, report = sparsify(model, x, mode="sparse", rounds=1)
    assert isinstance(fast[0], SparseLinear) and type(fast[2]) is nn.Linear
    assert [layer["choice"] for layer in report.layers] == ["sparse", "dense"]
    assert report.layers[1]["sparsity"] == 0.0
    assert torch.allclose(fast(x), model(x), atol=1e-6, rtol=0)
    dense, report = sparsify(model, x, mode="dense", rounds=1)
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    with pytest.raises(prunelab.PrunelabError, match="unknown mode"):
        sparsify(model, x, mode="fast")


def test_sparse_linear_matches_batched_and_3d_input():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    masking.attach(layer, {"weight": torch.rand(7, 12) < 0.4})
    sparse = SparseLinear.from_linear(layer)
    for x in (torch.randn(12), torch.randn(3, 12), torch.randn(2, 5, 12)):
        with torch.no_grad():
            assert torch.allclose(sparse(x), layer(x), atol=1e-6)
