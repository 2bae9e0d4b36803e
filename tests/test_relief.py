"""NNrelief: the per-neuron share rule on hand-made numbers, conv scores, dead units, clean-up, the lab."""

import json

import pytest
import torch
from torch import nn

import prunelab
from prunelab import masking
from prunelab.criteria.relief import (collect_activity, contributions, keep_by_share, relief_masks,
                                      relief_scores, shares)
from prunelab.errors import PrunelabError
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig


def rows(*values):
    return torch.tensor(values, dtype=torch.float64)


# --- the selection rule ------------------------------------------------------------------------------

def test_keeps_the_fewest_largest_shares_reaching_alpha():
    share = rows([0.05, 0.5, 0.15, 0.3])
    assert keep_by_share(share, 0.8).tolist() == [[False, True, False, True]]    # 0.5 + 0.3 = 0.8
    assert keep_by_share(share, 0.81).tolist() == [[False, True, True, True]]    # needs the 0.15 too
    assert keep_by_share(share, 0.5).tolist() == [[False, True, False, False]]


def test_bias_competes_with_the_weights():
    # one neuron: |w| = (1, 2), mean |x| = (1, 1), |b| = 7 -> shares 0.1, 0.2, 0.7
    linear = nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-1.0, 2.0]]))
        linear.bias.fill_(-7.0)
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    stats = collect_activity(nn.Sequential(linear), {"0": linear}, x, conv_fro=False, batch_size=2)
    contrib, bias = contributions(linear, stats["0"])
    share = shares(contrib, bias)
    assert share[0].tolist() == pytest.approx([0.1, 0.2, 0.7])
    assert keep_by_share(share, 0.9).tolist() == [[False, True, True]]    # the first weight goes
    assert keep_by_share(share, 0.7).tolist() == [[False, False, True]]   # the bias alone carries 70%


def test_ties_paper_rule_keeps_p0_code_rule_prunes_the_tie():
    share = rows([0.3, 0.4, 0.3])
    # p0 = 2: the paper keeps 0.4 and the first 0.3; the code prunes every share <= the third (0.3)
    assert keep_by_share(share, 0.7, "paper").tolist() == [[True, True, False]]
    assert keep_by_share(share, 0.7, "code").tolist() == [[False, True, False]]


def test_alpha_that_needs_everything():
    share = rows([0.6, 0.4], [0.0, 0.0])
    assert keep_by_share(share, 1.0, "paper").tolist() == [[True, True], [False, False]]
    # the authors' code still prunes the smallest entry; an inactive neuron keeps nothing
    assert keep_by_share(share, 1.0, "code").tolist() == [[True, False], [False, False]]


def test_already_pruned_entries_stay_pruned():
    share = rows([0.0, 0.0, 1.0])
    assert keep_by_share(share, 1.0).tolist() == [[False, False, True]]


# --- conv scores --------------------------------------------------------------------------------------

def literal_conv_contrib(conv, x, reduce):
    """The definitions of docs/methods/relief.md, one kernel slice at a time."""
    n_out, n_in = conv.weight.shape[:2]
    c = torch.zeros(n_out, n_in, dtype=torch.float64)
    mean_x = x.double().abs().mean(0, keepdim=True)
    for j in range(n_out):
        for i in range(n_in):
            k = conv.weight[j:j + 1, i:i + 1].detach().abs().double()
            if reduce == "fro":
                maps = nn.functional.conv2d(x[:, i:i + 1].abs().double(), k, stride=conv.stride, padding=conv.padding)
                c[j, i] = maps.flatten(1).norm(dim=1).mean()
            else:
                maps = nn.functional.conv2d(mean_x[:, i:i + 1], k, stride=conv.stride, padding=conv.padding)
                c[j, i] = maps.norm() if reduce == "fro_of_mean" else maps.sum()
    return c


# float64 arithmetic gives the definition to rounding; float32 (the default) to about 1e-7
TOLERANCE = {"float64": dict(rtol=1e-9, atol=1e-12), "float32": dict(rtol=1e-6, atol=1e-9)}


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("reduce", ["fro", "fro_of_mean", "sum"])
def test_conv_contributions_match_the_definition(reduce, precision):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(5, 3, 7, 7)
    stats = collect_activity(nn.Sequential(conv), {"0": conv}, x, conv_fro=reduce == "fro", batch_size=2,
                             precision=precision)
    contrib, bias = contributions(conv, stats["0"], reduce)
    expected = literal_conv_contrib(conv, x, reduce)
    assert torch.allclose(contrib, expected, **TOLERANCE[precision])
    if precision == "float32" and reduce == "fro":  # float32 really ran: not bit-equal to float64
        assert not torch.equal(contrib, expected)
    hw = 4 * 4
    scale = hw ** 0.5 if reduce != "sum" else hw
    assert torch.allclose(bias, conv.bias.detach().abs().double() * scale)


def test_scores_are_shares_per_neuron():
    model = prunelab.build_model("lenet5-caffe", relu=True, seed=0)
    x = torch.rand(40, 1, 28, 28)
    scores = prunelab.scores(model, "relief", data=x, examples=40)
    assert set(scores) == {"conv1.weight", "conv2.weight", "fc3.weight", "fc4.weight"}
    with torch.no_grad():  # the last layer by hand: c_ij = |w_ij| mean|h_i|, shares over c and |b|
        hidden = model.relu3(model.fc3(model.flatten(model.pool2(model.relu2(model.conv2(
            model.pool1(model.relu1(model.conv1(x)))))))))
    c = model.fc4.weight.detach().double().abs() * hidden.double().abs().mean(0)
    expected = c / (c.sum(1, keepdim=True) + model.fc4.bias.detach().double().abs()[:, None])
    assert torch.allclose(scores["fc4.weight"], expected, rtol=1e-6)
    conv = scores["conv2.weight"]
    assert torch.equal(conv[:, :, 0, 0], conv[:, :, 4, 4])  # a kernel slice shares one score


# --- whole units --------------------------------------------------------------------------------------

def three_layer(seed=0):
    """4-5-3-2 with positive weights and biases: on positive inputs every unit is active."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.abs_().add_(0.05)
    return model


def params_of(model):
    return masking.prunable_parameters(model)


def test_dead_unit_is_removed_with_its_bias_and_outgoing_column():
    model = three_layer()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = -1.0  # relu(-1) = 0 on every input: unit 2 of the first layer is dead
    x = torch.rand(64, 4)
    masks, report = relief_masks(model, params_of(model), data=x, generator=torch.Generator().manual_seed(0),
                                 alpha_fc=1.0, cleanup=False)
    assert report.dead_units == {"0": 1}
    assert not masks["0.bias"][2] and not masks["0.weight"][2].any()
    assert not masks["2.weight"][:, 2].any()
    # with alpha = 1 and the paper rule nothing else of layer 0 goes (all inputs are active)
    assert masks["0.weight"][[0, 1, 3, 4]].all()


def test_backward_cleanup_cascades_from_the_last_layer():
    model = three_layer()
    with torch.no_grad():  # unit 1 of the second hidden layer feeds nothing any more
        model[4].weight[:, 1] = 0.0
    alive = {"4.weight": model[4].weight.detach() != 0}
    masking.attach(model, alive)
    with torch.no_grad():  # and unit 3 of the first hidden layer feeds only that unit
        model[2].weight[[0, 2], 3] = 0.0
    masking.attach(model, {"2.weight": model[2].weight.detach() != 0})
    x = torch.rand(64, 4)
    masks, report = relief_masks(model, params_of(model), data=x, generator=torch.Generator().manual_seed(0),
                                 alpha_fc=1.0, alive=masking.masks(model), remove_dead=False)
    assert not masks["2.weight"][1].any() and not masks["2.bias"][1]     # lost its incoming weights, bias
    assert not masks["0.weight"][3].any() and not masks["0.bias"][3]     # then unit 3 upstream too
    assert report.cleaned_units == {"2": 1, "0": 1}
    # without the clean-up both units keep their incoming weights
    plain, _ = relief_masks(model, params_of(model), data=x, generator=torch.Generator().manual_seed(0),
                            alpha_fc=1.0, alive=masking.masks(model), remove_dead=False, cleanup=False)
    assert plain["2.weight"][1].any() and plain["0.weight"][3].any()


def test_removed_units_compact_away_with_equal_outputs():
    model = three_layer()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = -1.0  # dead unit
    x = torch.rand(64, 4)
    prunelab.prune(model, "relief", data=x, alpha_fc=0.9)
    small, report = prunelab.compact(model, x[:8])
    assert report.max_abs_diff < 1e-5
    assert small[0].out_features == 4 and small[2].in_features == 4  # the dead unit is gone for real


# --- determinism, errors, the lab ---------------------------------------------------------------------

def test_same_seed_same_masks_and_pruning_set_is_seeded():
    train = torch.rand(3000, 1, 28, 28)
    masks = []
    for seed in (0, 0, 1):
        model = prunelab.build_model("lenet300-100", seed=0)
        prunelab.prune(model, "relief", data=train, seed=seed, examples=200)
        masks.append(masking.masks(model)["fc1.weight"])
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("options, message", [
    ({"alpha_fc": 1.5}, "alpha_fc must be in (0, 1]"),
    ({"conv_reduce": "max"}, "conv_reduce must be one of: fro, fro_of_mean, sum"),
    ({"selection": "greedy"}, "selection must be one of: paper, code"),
    ({"examples": 0}, "examples must be a positive integer"),
])
def test_bad_options_are_named(options, message):
    model = three_layer()
    with pytest.raises(PrunelabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prunelab.prune(model, "relief", data=torch.rand(8, 4), **options)


def test_recurrent_layers_are_refused():
    model = prunelab.build_model("lstm", seed=0)
    with pytest.raises(PrunelabError, match="method .relief. prunes Linear and Conv2d layers only; rnn.weight_ih_l0 belongs to LSTM"):
        prunelab.prune(model, "relief", data=torch.rand(8, 1, 28, 28))


def test_needs_data():
    with pytest.raises(PrunelabError, match="needs data"):
        prunelab.prune(three_layer(), "relief")


def test_residual_block_rule_removes_weak_conv2_filters():
    model = prunelab.build_model("resnet20", seed=0)
    block = model.layer1[0]
    with torch.no_grad():  # make filter 5 of the first block's conv2 negligible against the shortcut
        block.bn2.weight[5] = 1e-6
        block.bn2.bias[5] = 0.0
    masks, report = relief_masks(model, masking.prunable_parameters(model), data=torch.randn(16, 3, 32, 32),
                                 generator=torch.Generator().manual_seed(0), examples=16, alpha_conv=0.95)
    assert report.block_filters.get("layer1.0.conv2", 0) >= 1
    assert not masks["layer1.0.conv2.weight"][5].any() and not masks["layer1.0.bn2.weight"][5]


def test_lab_runs_iterations_with_rewinding(tmp_path, data_root):
    cfg = RunConfig(model="lenet300-100", method="relief", rounds=2, rewind="init", epochs=1, finetune_epochs=1,
                    optimizer="adam", lr=1e-3, batch_size=120, weight_decay=5e-4, latency=False,
                    method_options={"examples": 300}, data_root=str(data_root), out=str(tmp_path / "relief"))
    result = lab_run.run(cfg, echo=None)
    events = result["prune_events"]
    assert [e["stage"] for e in events] == ["prune-1", "prune-2"]
    assert events[1]["sparsity"] > events[0]["sparsity"] > 0.3   # each round prunes more
    assert [h["stage_name"] for h in result["history"]] == ["pretrain", "retrain-1", "retrain-2"]
    assert result["error"]["test"] < 0.1
    rounds = result["stage_results"]
    assert [r["stage"] for r in rounds] == ["pretrain", "retrain-1", "retrain-2"]
    assert rounds[-1]["test_error"] == result["error"]["test"]
    assert rounds[2]["units"]["fc1"]["alive"] <= rounds[1]["units"]["fc1"]["alive"] <= 300
    assert result["structured"]["compact_max_abs_diff"] < 1e-4
    saved = json.loads((tmp_path / "relief" / "result.json").read_text())
    assert saved["config"]["rounds"] == 2


def test_lab_refuses_a_sparsity_target_for_relief():
    with pytest.raises(PrunelabError, match="decides how much to prune itself .*drop the target sparsity"):
        lab_run.resolve(RunConfig(model="lenet300-100", method="relief", sparsity=0.9))


@pytest.mark.parametrize("target", ["sparsity", "channels"])
def test_a_target_for_relief_is_an_error_not_a_silent_no_op(target):
    model = three_layer()
    with pytest.raises(PrunelabError, match=f"'relief' decides how much to prune itself.*drop the target {target}"):
        prunelab.prune(model, "relief", data=torch.rand(8, 4), **{target: 0.5})
    assert not prunelab.masks(model)


# --- the Gram-matrix computation of the conv scores -----------------------------------------------------

@pytest.mark.parametrize("conv", [
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=5, padding=2),
    dict(kernel_size=(2, 4), padding="same"),   # stride 1: the row-block Gram, with torch's uneven padding
    dict(kernel_size=3, padding="valid"),
])
def test_fro_contributions_of_strided_dilated_and_odd_kernels(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, **conv)
    x = torch.randn(5, 3, 9, 11)
    stats = collect_activity(nn.Sequential(layer), {"0": layer}, x, conv_fro=True, batch_size=2, precision="float64")
    contrib, _ = contributions(layer, stats["0"], "fro")
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for j in range(4):  # each kernel slice's output maps, one sample at a time
        for i in range(3):
            k = layer.weight[j:j + 1, i:i + 1].detach().abs().double()
            for n in range(5):
                maps = nn.functional.conv2d(x[n:n + 1, i:i + 1].abs().double(), k, stride=layer.stride,
                                            padding=layer.padding, dilation=layer.dilation)
                expected[j, i] += maps.norm() / 5
    assert torch.allclose(contrib, expected, rtol=1e-9, atol=1e-12)


def _mask_digest(model):
    """Number of masks, kept entries, and a hash of the mask bytes (sorted by name)."""
    import hashlib
    masks = masking.masks(model)
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).contiguous().numpy().tobytes())
    return len(masks), sum(int(m.sum()) for m in masks.values()), digest.hexdigest()[:16]


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_resnet20_masks_are_those_of_the_output_map_implementation(precision):
    # expected values computed by the implementation that formed every (sample, channel, filter) output
    # map in float64 and ran the residual rule in a pass of its own (commit 2d6d2fe)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
    model = prunelab.build_model("resnet20", seed=0)
    prunelab.prune(model, "relief", data=data, seed=0, examples=32, batch_size=16, precision=precision)
    assert _mask_digest(model) == (49, 137996, "c5bb38a1d2540821")


class _ViewFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))  # refuses a channels-last tensor


def test_the_channels_last_pass_is_used_only_where_the_model_takes_it():
    from prunelab.hooks import takes_channels_last
    x = torch.randn(4, 3, 6, 6)  # (one channel would be both layouts at once)
    flatten = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert takes_channels_last(flatten, x)
    assert not takes_channels_last(_ViewFlatten(), x)
    assert not takes_channels_last(nn.Sequential(nn.Linear(6, 2)), torch.randn(4, 6))
    data = (x, torch.randint(0, 3, (4,)))
    for model in (flatten, _ViewFlatten()):  # scored either way
        report = prunelab.prune(model, "relief", data=data, seed=0, examples=4)
        assert 0 < report.sparsity < 1
