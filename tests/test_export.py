"""Export of pruned models: ONNX checked with ONNX Runtime, torch.export archives, and `prunelab export`."""

import sys

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import prunelab  # noqa: E402
from prunelab import cli, masking  # noqa: E402
from prunelab.errors import PrunelabError  # noqa: E402
from prunelab.export import ONNX_EXTRA, export  # noqa: E402
from prunelab.models import model_info  # noqa: E402


def ort_outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_close(path, model, x):
    with torch.no_grad():
        expected = model.eval()(x)
    got = torch.from_numpy(ort_outputs(path, x))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


@pytest.fixture(scope="module")
def lenet():
    model = prunelab.build_model("lenet300-100", seed=0)
    prunelab.prune(model, "magnitude", 0.95)
    return model


def test_masked_lenet_onnx_has_masks_folded_in(lenet, tmp_path):
    x = torch.randn(4, *model_info("lenet300-100").input_shape, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    report = export(lenet, x, tmp_path / "lenet.onnx", latency=False)
    assert report.max_abs_diff <= 1e-4 * report.scale and report.folded_masks and report.format == "onnx"
    assert masking.is_masked(lenet)  # the model itself is untouched
    assert all(torch.equal(before[k], v) for k, v in lenet.state_dict().items())
    assert_close(tmp_path / "lenet.onnx", lenet, x)
    if report.dynamic_batch:  # another batch size runs too
        assert_close(tmp_path / "lenet.onnx", lenet, x[:1])

    graph = onnx.load(str(tmp_path / "lenet.onnx")).graph
    assert "Mul" not in {n.op_type for n in graph.node}  # no mask multiply
    dense = prunelab.build_model("lenet300-100", seed=0)
    export(dense, x, tmp_path / "dense.onnx", latency=False)
    assert len(graph.node) == len(onnx.load(str(tmp_path / "dense.onnx")).graph.node)
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in graph.initializer)
    pruned = sum(int((~m.bool()).sum()) for m in prunelab.masks(lenet).values())
    assert zeros >= pruned > 0  # the pruned weights are zeros in the initializers


def test_compact_resnet56_onnx_and_latency_ratio(tmp_path):
    assert "resnet56" in [m.name for m in prunelab.list_models()]
    model = prunelab.build_model("resnet56", seed=0)
    batch = (torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
             torch.zeros(16, dtype=torch.long))
    prunelab.prune(model, "pfec", channels=0.5, data=batch)
    small, _ = prunelab.compact(model, batch[0])
    x = batch[0][:2]
    report = export(small, x, tmp_path / "r56.onnx", dense=model, rounds=3, latency_seconds=0.3)
    assert report.max_abs_diff <= 1e-4 * report.scale
    assert_close(tmp_path / "r56.onnx", small, x)
    assert report.params < report.dense_params
    assert report.ratio is not None and report.ratio > 0  # measured; no timing assertion
    assert report.line().startswith(f"wrote {tmp_path / 'r56.onnx'} (onnx,")


def test_torch_format_roundtrips(lenet, tmp_path):
    x = torch.randn(3, *model_info("lenet300-100").input_shape)
    report = export(lenet, x, tmp_path / "lenet.pt2", format="torch")
    assert report.format == "torch" and report.max_abs_diff <= 1e-4 * report.scale
    loaded = torch.export.load(str(tmp_path / "lenet.pt2")).module()
    with torch.no_grad():
        assert torch.allclose(loaded(x), lenet.eval()(x), atol=1e-5)


def test_missing_extra_is_one_line(lenet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(PrunelabError) as error:
        export(lenet, torch.randn(1, 1, 28, 28), tmp_path / "m.onnx")
    assert str(error.value) == ONNX_EXTRA


def test_cli_export_of_a_run_folder(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    code = cli.main(["run", "--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.9",
                     "--iterations", "10", "--finetune-epochs", "0", "--no-latency",
                     "--data-root", str(data_root), "--out", str(run), "--quiet"])
    assert code == 0
    capsys.readouterr()
    assert cli.main(["export", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"wrote {run / 'model.onnx'} (onnx,") and "max abs diff" in out[0]
    assert (run / "model.onnx").stat().st_size > 0
    assert cli.main(["export", str(run), "--format", "torch", "--out", str(tmp_path / "m.pt2")]) == 0
    assert (tmp_path / "m.pt2").exists() and len(capsys.readouterr().out.strip().splitlines()) == 1
    assert cli.main(["export", str(run), "--format", "sparse", "--out", str(tmp_path / "m.sparse")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    from prunelab import sparse
    weights, masks = sparse.load_sparse_state(tmp_path / "m.sparse")
    assert 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) == \
        pytest.approx(0.9, abs=1e-9)


@pytest.mark.parametrize("make", ["missing", "unfinished"])
def test_cli_export_errors_are_one_line(tmp_path, capsys, make):
    folder = tmp_path / "run"
    if make == "unfinished":
        folder.mkdir()
        (folder / "config.toml").write_text('model = "lenet300-100"\n')
    assert cli.main(["export", str(folder)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: ")
    assert ("not a run folder" if make == "missing" else "not finished") in lines[0]


def test_gathered_layers_export_as_gather(tmp_path):
    from torch import nn
    from prunelab.structure.layers import _gather_inputs

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 10))
    _gather_inputs(model[2], [0, 2, 5])  # GatheredConv2d, GatheredLinear: what compact() makes
    _gather_inputs(model[4], list(range(0, 64, 3)))
    x = torch.randn(2, 3, 8, 8)
    report = export(model, x, tmp_path / "g.onnx", latency=False)
    assert report.max_abs_diff <= 1e-4 * report.scale
    assert_close(tmp_path / "g.onnx", model, x)
    assert [n.op_type for n in onnx.load(str(tmp_path / "g.onnx")).graph.node].count("Gather") == 2
