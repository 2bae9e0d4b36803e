"""Channel groups, PFEC/SoftNet filter pruning, physical compaction, saving without pickle, metrics."""

import pytest
import torch
from torch import nn

import prunelab
from prunelab import PrunelabError, masking, structure
from prunelab.models import model_info


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _randomise_batchnorm(model, seed=1):
    """BatchNorm statistics and affine parameters that are far from the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1.0)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


def _batch(name, n=4, seed=0):
    return torch.randn(n, *model_info(name).input_shape, generator=torch.Generator().manual_seed(seed))


def _pair(x):
    return (x, torch.zeros(len(x), dtype=torch.long))


def _hand_made():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        # L1 norms 3, 3.3, 15, 12; L2 norms 3, 1.905, 8.66, 6.93: L1 and L2 disagree on the smallest
        net[0].weight.copy_(torch.tensor([[3.0, 0, 0], [1.1, -1.1, 1.1], [5, 5, -5], [4, 4, 4]]))
        net[0].bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    return net


@pytest.mark.parametrize("method, removed", [("pfec", 0), ("softnet", 1)])
def test_filter_methods_remove_the_smallest_norm(method, removed):
    net = _hand_made()
    prunelab.prune(net, method, channels=0.25, data=_pair(torch.randn(2, 3)))
    masks = prunelab.masks(net)
    rows = masks["0.weight"].all(1)
    assert rows.tolist() == [i != removed for i in range(4)]
    assert masks["0.bias"].tolist() == [i != removed for i in range(4)]
    assert masks["2.weight"][:, removed].sum() == 0 and masks["2.weight"].sum() == 2 * 3
    assert "2.bias" not in masks  # the output layer is never pruned
    assert net[0].weight[removed].abs().sum() == 0


def test_filter_sparsity_is_a_fraction_of_channels_and_scope_is_checked():
    model = prunelab.build_model("lenet300-100", seed=0)
    with pytest.raises(PrunelabError, match="'pfec' cannot aim at sparsity .*give channels"):
        prunelab.prune(model, "pfec", sparsity=0.5, data=_pair(_batch("lenet300-100")))
    report = prunelab.prune(model, "pfec", channels=0.5, data=_pair(_batch("lenet300-100")))
    # the report tells the channel target from the weight sparsity it led to: 150 + 50 of 410 rows,
    # and the weights of fc1 (rows and columns), fc2 and fc3's columns
    assert report.target == {"channels": 0.5} and report.channels_removed == pytest.approx(200 / 410)
    assert report.sparsity == pytest.approx(1 - (150 * 784 + 50 * 150 + 10 * 50) / 266200)
    masks = prunelab.masks(model)
    assert int(masks["fc1.weight"].all(1).sum()) == 150 and int(masks["fc2.weight"].any(1).sum()) == 50
    assert masks["fc3.weight"].any(0).sum() == 50 and masks["fc3.weight"].any(1).all()
    prunelab.prune(model, "pfec", channels=0.75, data=_pair(_batch("lenet300-100")))  # iterative: never revives
    again = prunelab.masks(model)
    assert not (again["fc1.weight"] & ~masks["fc1.weight"]).any()
    assert int(again["fc1.weight"].all(1).sum()) == 75
    with pytest.raises(PrunelabError, match="scope"):
        prunelab.prune(model, "pfec", channels=0.8, data=_pair(_batch("lenet300-100")), scope="global")
    with pytest.raises(PrunelabError, match="example input"):
        prunelab.prune(prunelab.build_model("lenet300-100"), "softnet", channels=0.5)


def test_resnet_groups_and_pfec_prunes_only_safe_channels():
    model = prunelab.build_model("resnet20", seed=0)
    graph = structure.channel_graph(model, _batch("resnet20", 1))
    safe = sorted(g.root for g in graph.groups if g.safe)
    assert safe == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert sum(g.is_output for g in graph.groups) == 1
    prunelab.prune(model, "pfec", channels=0.5, data=_pair(_batch("resnet20")))
    masks = prunelab.masks(model)
    assert int(masks["layer1.0.conv1.weight"].flatten(1).any(1).sum()) == 8
    assert not masks["layer1.0.bn1.weight"].all() and "layer1.0.bn2.weight" not in masks
    assert "conv1.weight" not in masks and masks["layer1.0.conv2.weight"].flatten(1).any(1).all()


def _compact_ok(model, x, name, tol=1e-5, shrinks=True):
    small, report = structure.compact(model, x, tolerance=tol, name=name)
    with torch.no_grad():
        diff = float((model.eval()(x) - small(x)).abs().max())
    assert diff <= tol and report.max_abs_diff <= tol
    assert report.params_after < report.params_before or not shrinks
    assert sum(p.numel() for p in small.parameters()) == report.params_after
    return small, report


@pytest.mark.parametrize("name", ["lenet300-100", "lenet5-caffe", "pfp-lenet5", "resnet20"])
def test_compact_pfec_preserves_outputs(name):
    model = _randomise_batchnorm(prunelab.build_model(name, seed=0))
    x = _batch(name)
    prunelab.prune(model, "pfec", channels=0.5, data=_pair(x))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = _compact_ok(model, x, name)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched
    assert prunelab.masks(model)  # still masked
    print(f"{name}: compact max abs diff {report.max_abs_diff:.2e}, params {report.params_before} -> "
          f"{report.params_after}")
    # the surviving weights' masks came along, re-indexed (here: all survivors are kept entries)
    small_masks = prunelab.masks(small)
    assert small_masks and all(m.shape == dict(small.named_parameters())[n].shape for n, m in small_masks.items())


@pytest.mark.parametrize("name", ["lenet5-caffe", "pfp-lenet5"])
def test_compact_pfp_masks(name):
    model = prunelab.build_model(name, seed=0)
    x = _batch(name, 16)
    prunelab.prune(model, "pfp", 0.8, data=_pair(x))
    _compact_ok(model, x[:4], name)


def test_compact_pfp_resnet_with_batchnorm_statistics():
    model = _randomise_batchnorm(prunelab.build_model("resnet20", seed=0))
    x = _batch("resnet20", 4)
    prunelab.prune(model, "pfp", 0.7, data=_pair(x), batch_size=4)
    small, report = _compact_ok(model, x, "resnet20")
    assert report.params_after < 0.6 * report.params_before


def _mask_stream_inputs(model):
    """Zero 6 of the 16 residual-stream input channels of layer1.0.conv1, which layer1.0's shortcut and
    layer1.1.conv1 still read: not removable, only gatherable. Also an unstructured mask on a survivor."""
    mask = torch.ones(16, 16, 3, 3, dtype=torch.bool)
    mask[:, [1, 3, 4, 8, 9, 15]] = False
    mask[0, 0, 0, 0] = False
    masking.attach(model, {"layer1.0.conv1.weight": mask})
    return [0, 2, 5, 6, 7, 10, 11, 12, 13, 14]


def test_compact_gathers_inputs_a_layer_no_longer_reads():
    model = _randomise_batchnorm(prunelab.build_model("resnet20", seed=0))
    used = _mask_stream_inputs(model)
    x = _batch("resnet20")
    small, report = _compact_ok(model, x, "resnet20")
    conv = small.layer1[0].conv1
    assert isinstance(conv, structure.GatheredConv2d) and isinstance(conv, nn.Conv2d)
    assert conv.input_index.tolist() == used and conv.weight.shape == (16, 10, 3, 3)
    assert report.plan["gathered"] == {"layer1.0.conv1": used}
    assert not prunelab.masks(small)["layer1.0.conv1.weight"][0, 0, 0, 0]  # re-indexed with the weight
    assert small.layer1[1].conv1.in_channels == 16  # the stream itself is untouched
    plain, _ = structure.compact(model, x, gather_inputs=False)
    assert type(plain.layer1[0].conv1) is nn.Conv2d
    flops = [prunelab.metrics.module_flops(m, x[:1])[1]["layer1.0.conv1"] for m in (plain, small)]
    assert flops[1] * 16 == flops[0] * 10  # the gathered conv costs 10/16 of the masked one
    fast = masking.copy_model(small).to(memory_format=torch.channels_last)
    with torch.no_grad():  # the channels-last layout survives the gather and gives the same outputs
        assert (fast(x.contiguous(memory_format=torch.channels_last)) - small(x)).abs().max() < 1e-5
    with pytest.raises(PrunelabError, match="already compact"):
        structure.compact(small, x)


def test_compact_gathers_the_input_pixels_of_an_mlp():
    model = prunelab.build_model("lenet300-100", seed=0)
    columns = torch.ones(300, 784, dtype=torch.bool)
    columns[:, :200] = False  # PFP may drop input pixels (FCNet's input mask)
    masking.attach(model, {"fc1.weight": columns})
    small, report = _compact_ok(model, _batch("lenet300-100"), "lenet300-100")
    assert isinstance(small.fc1, structure.GatheredLinear) and small.fc1.in_features == 584
    assert small.fc1.input_index.tolist() == list(range(200, 784))
    assert report.params_after == report.params_before - 200 * 300


def test_dead_neurons_with_live_biases_are_folded():
    """NNrelief-style: only the weight rows are masked; the neurons output relu(bias) != 0."""
    model = prunelab.build_model("lenet300-100", seed=0)
    with torch.no_grad():
        model.fc1.bias.uniform_(0.1, 0.5)
    rows = torch.ones(300, 784, dtype=torch.bool)
    rows[::3] = False
    masking.attach(model, {"fc1.weight": rows})
    x = _batch("lenet300-100")
    small, report = _compact_ok(model, x, "lenet300-100")
    assert small.fc1.out_features == 200 and small.fc2.in_features == 200
    assert not report.kept_constant


def test_constant_channels_before_a_padded_conv_are_kept_and_reported():
    model = _randomise_batchnorm(prunelab.build_model("resnet20", seed=0))
    rows = torch.ones(16, 16, 3, 3, dtype=torch.bool)
    rows[:4] = False  # 4 filters of layer1.0.conv1 gone, but bn1 still outputs relu(beta - gamma mu / sigma)
    masking.attach(model, {"layer1.0.conv1.weight": rows})
    with torch.no_grad():
        model.layer1[0].bn1.bias[0] = -5.0  # channel 0: relu(negative) = 0, removable
    small, report = _compact_ok(model, _batch("resnet20"), "resnet20")
    kept = [k for k in report.kept_constant if k["group"] == "layer1.0.conv1"]
    # channels whose BatchNorm constant is relu(...) = 0 go; the others stay, reported
    bn = model.layer1[0].bn1
    const = torch.relu(bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))[:4]
    assert const[0] == 0 and len(kept) == int((const > 0).sum()) == 3
    assert all("padded" in k["reason"] for k in kept)
    assert small.layer1[0].conv1.out_channels == 16 - int((const == 0).sum())


def test_equivalence_check_fails_loudly(monkeypatch):
    model = prunelab.build_model("lenet300-100", seed=0)
    with torch.no_grad():
        model.fc1.bias.uniform_(0.1, 0.5)
    rows = torch.ones(300, 784, dtype=torch.bool)
    rows[:50] = False
    masking.attach(model, {"fc1.weight": rows})
    monkeypatch.setattr(structure.removable, "_fold", lambda *args, **kwargs: None)  # forget the constants
    with pytest.raises(PrunelabError, match="differs from the masked model"):
        structure.compact(model, _batch("lenet300-100"))


def test_equivalence_reports_shape_mismatch_and_corruption():
    model = prunelab.build_model("lenet300-100", seed=0)
    prunelab.prune(model, "pfec", channels=0.5, data=_pair(_batch("lenet300-100")))
    small, _ = structure.compact(model, _batch("lenet300-100"))
    x = _batch("lenet300-100")
    assert structure.equivalence(model, small, x) < 1e-5
    with torch.no_grad():
        small.fc2.weight[0, 0] += 1.0
    assert structure.equivalence(model, small, x) > 1e-3


@pytest.mark.parametrize("name", ["resnet20", "lenet5-caffe"])
def test_save_and_load_compact_round_trip(tmp_path, name):
    model = _randomise_batchnorm(prunelab.build_model(name, seed=0))
    x = _batch(name)
    prunelab.prune(model, "softnet", channels=0.5, data=_pair(x))
    if name == "resnet20":
        _mask_stream_inputs(model)  # a gathered layer must be rebuilt by the plan too
    small, report = structure.compact(model, x, name=name)
    path = tmp_path / "small.safetensors"
    structure.save_compact(path, small, report.plan)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    loaded = structure.load_compact(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), small.eval()(x))
    assert {n: m.shape for n, m in prunelab.masks(loaded).items()} == {n: m.shape for n, m in prunelab.masks(small).items()}
    assert report.plan["kept"]  # per-layer kept indices
    if name == "resnet20":
        assert isinstance(loaded.layer1[0].conv1, structure.GatheredConv2d)
    structure.save_compact(path, small, {**report.plan, "model": None})  # unnamed: load_compact needs model=
    with pytest.raises(PrunelabError, match="names no model"):
        structure.load_compact(path)
    from prunelab import checkpoint
    tensors = checkpoint.model_tensors(small)
    checkpoint.save_tensors(path, tensors, {"compact": {k: v for k, v in report.plan.items() if k != "model"}})
    with pytest.raises(PrunelabError, match="names no model"):
        structure.load_compact(path)
    checkpoint.save_tensors(path, tensors, ["not", "an", "object"])
    with pytest.raises(PrunelabError, match="metadata is not a JSON object"):
        structure.load_compact(path)


def test_package_keeps_its_names_and_needs_no_method_code():
    """Callers reach every name through ``prunelab.structure``; the package depends on no criteria/lab/training."""
    import ast
    import pathlib

    for name in ("ChannelGraph", "ChannelGroup", "Slice", "channel_graph", "channel_masks", "compact",
                 "CompactReport", "equivalence", "GatheredConv2d", "GatheredLinear", "save_compact", "load_compact",
                 "apply_plan", "PLAN_FORMAT", "structured_metrics", "compare_latency", "shortcut_destination"):
        assert hasattr(structure, name), name
    for path in pathlib.Path(structure.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
                assert not any(part in target.split(".") for part in ("criteria", "lab", "training")), (path, target)


def test_structured_metrics():
    model = prunelab.build_model("lenet5-caffe", seed=0)
    x = _batch("lenet5-caffe", 8)
    prunelab.prune(model, "pfec", channels=0.5, data=_pair(x))
    small, _ = structure.compact(model, x)
    m = structure.structured_metrics(model, small, x, min_run_time=0.05)
    assert 0.5 < m["pr"] < 0.9 and 0.5 < m["fr"] < 0.9
    assert m["params"]["dense"] == 431080
    assert m["latency_ms"]["dense"] > 0 and m["latency_ms"]["small"] > 0


def test_lab_structured_run_times_both_layouts(tmp_path, data_root):
    from prunelab.lab.config import RunConfig
    from prunelab.lab.run import format_result, run

    cfg = RunConfig(model="lenet5-caffe", method="pfec", channels=0.5, iterations=5, data_root=str(data_root),
                    out=str(tmp_path / "r"))
    result = run(cfg, progress=False, echo=None)
    st = result["structured"]
    assert st["compact_max_abs_diff"] < 1e-4 and 0.5 < st["fr"] < 0.9
    assert st["latency_ms"]["layout"] == "contiguous" and st["latency_ms"]["batch"] == 1
    assert st["latency_ms_channels_last"]["layout"] == "channels_last"
    assert st["latency_ms_channels_last"]["small"] > 0
    assert "channels-last" in format_result(result)
