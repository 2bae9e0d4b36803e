"""PFP (docs/methods/pfp.md): sensitivity, sample size, allocation, selection modes, the method."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab import PrunelabError, masking
from prunelab.criteria import pfp


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the suite runs beside other jobs; one thread each avoids oversubscription


def _two_layer():
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 3.0, 2.0], [2.0, -1.0, -3.0]]))
        net[0].bias.copy_(torch.tensor([0.0, 7.0]))
        net[2].weight.copy_(torch.tensor([[0.5, 2.0], [1.0, 3.0]]))
        net[2].bias.zero_()
    return net


def test_sensitivity_by_hand_on_two_layers():
    # Point x1 = (1, 2, 1) >= 0; point x2 = (-1, 1, 1) splits into a+ = (0, 1, 1) and a- = (1, 0, 0).
    # Layer 1 (bias-free z): row 0 = (1, 3, 2) all positive, row 1 = (2, -1, -3).
    #   x1: row 0: z+ = 9 -> g = 1/9, 6/9, 2/9; row 1: z+ = 2 -> g(1,0) = 1, z- = -5 -> g = 2/5, 3/5.
    #   a+: row 0: z+ = 5 -> g(0,1) = 3/5, g(0,2) = 2/5; row 1: z+ = 0 (guarded), z- = -4 -> 1/4, 3/4.
    #   a-: row 0: z+ = 1 -> g(0,0) = 1; row 1: z+ = 2 -> g(1,0) = 1.
    #   s = (1, max(6/9, 2/5, 3/5, 1/4), max(2/9, 3/5, 2/5, 3/4)) = (1, 2/3, 3/4).
    # Layer 2 input h = relu(W1 x + b1): x1 -> (9, 4), x2 -> (4, 1); rows (0.5, 2), (1, 3), all positive.
    #   h = (9, 4): z = 12.5 -> 0.36, 0.64; z = 21 -> 3/7, 4/7.  h = (4, 1): z = 4 -> 1/2, 1/2; z = 7 -> 4/7, 3/7.
    #   s = (4/7, 0.64).
    net = _two_layer()
    x = torch.tensor([[1.0, 2.0, 1.0], [-1.0, 1.0, 1.0]])
    s = pfp.empirical_sensitivity(net, x, batch_size=1)
    assert torch.allclose(s["0"], torch.tensor([1.0, 2 / 3, 3 / 4]), atol=1e-6)
    assert torch.allclose(s["2"], torch.tensor([4 / 7, 0.64]), atol=1e-6)
    # the batch size does not change a max
    s2 = pfp.empirical_sensitivity(net, x, batch_size=2)
    assert all(torch.equal(s[k], s2[k]) for k in s)


def _reference_sensitivity(module, inputs, units=None):
    """The definition, literally: per point, split signs, all (i, j, u, p) contributions, max."""
    W = module.weight.detach().reshape(module.weight.shape[0], -1)
    best = None
    for x in inputs:
        for a in (x.clamp(min=0), (-x).clamp(min=0)):
            a = a[None]
            if isinstance(module, nn.Linear):
                A = a.reshape(1, -1).T  # (K, P=1)
            else:
                A = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)[0]
            contrib = W[:, :, None] * A[None]          # (O, K, P)
            pos = torch.where(W[:, :, None] > 0, contrib, torch.zeros_like(contrib))
            neg = torch.where(W[:, :, None] < 0, contrib, torch.zeros_like(contrib))
            zp, zn = pos.sum(1, keepdim=True), neg.sum(1, keepdim=True)
            eps = torch.finfo(torch.float32).eps
            gp = torch.where(zp.abs() > eps, pos / zp.where(zp.abs() > eps, torch.ones_like(zp)), torch.zeros_like(pos))
            gn = torch.where(zn.abs() > eps, neg / zn.where(zn.abs() > eps, torch.ones_like(zn)), torch.zeros_like(neg))
            g = torch.maximum(gp, gn).amax((0, 2))  # (K,)
            best = g if best is None else torch.maximum(best, g)
    per = 1 if isinstance(module, nn.Linear) else module.kernel_size[0] * module.kernel_size[1]
    col_units = (torch.arange(best.numel()) // per) if units is None else units.repeat_interleave(per)
    n = int(col_units.max()) + 1
    return torch.zeros(n).scatter_reduce(0, col_units, best, reduce="amax")


def test_sensitivity_matches_the_definition_on_convs_and_linear():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Conv2d(4, 3, 2), nn.Flatten(),
                        nn.Linear(3 * 3 * 3, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(6, 2, 8, 8, generator=g)
    flat_units = torch.arange(27) // 9  # the Linear reads 3 channels of 3x3: one unit per channel
    got = pfp.empirical_sensitivity(net, x, ["0", "1", "3"], units={"3": flat_units}, batch_size=4)
    acts = {}
    hooks = [net[i].register_forward_pre_hook(lambda m, a, i=i: acts.setdefault(i, a[0])) for i in (0, 1, 3)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(got["0"], _reference_sensitivity(net[0], acts[0]), atol=1e-6)
    assert torch.allclose(got["1"], _reference_sensitivity(net[1], acts[1]), atol=1e-6)
    assert torch.allclose(got["3"], _reference_sensitivity(net[3], acts[3], units=flat_units), atol=1e-6)
    assert got["3"].shape == (3,)


def test_sample_size_from_delta():
    # LeNet-300-100: eta = 300 + 100 + 10, eta* = 300, delta = 1e-12: ceil(3 ln(8 * 300 * 410 / 1e-12)) = 125
    assert pfp.sample_size([300, 100, 10], 1e-12, 3.0, 1) == math.ceil(3 * math.log(8 * 300 * 410 / 1e-12))
    assert pfp.sample_size([300, 100, 10], 1e-12, 3.0, 64) == 128  # rounded up to the batch


def _lenet300(seed=0, n=64):
    model = prunelab.build_model("lenet300-100", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    data = (torch.randn(n, 1, 28, 28, generator=g).clamp(min=-0.42), torch.zeros(n, dtype=torch.long))
    return model, data


def test_allocation_is_monotone_in_epsilon_and_hits_the_target():
    model, data = _lenet300()
    params = masking.prunable_parameters(model)
    for sparsity in (0.5, 0.8, 0.95):
        plan = pfp.plan(model, params, data, sparsity, generator=torch.Generator().manual_seed(0))
        total = plan.total
        assert abs(plan.kept - plan.target) <= 0.01 * total, (sparsity, plan.kept, plan.target)
        assert abs(plan.kept - plan.target) <= 0.01 * plan.target or sparsity == 0.95
        kept_masks = sum(int(plan.masks[n].sum()) for n in params)
        assert kept_masks == plan.kept
    sizes = [plan.size_at(10.0 ** e) for e in range(-3, 6)]
    allocations = [plan.allocation_at(10.0 ** e) for e in range(-3, 6)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    for layer in allocations[0]:
        per_layer = [a[layer] for a in allocations]
        assert all(a >= b for a, b in zip(per_layer, per_layer[1:])), (layer, per_layer)
    assert sizes[0] > sizes[-1]


def test_round_to_gives_multiples_and_still_hits_the_target():
    model, data = _lenet300()
    params = masking.prunable_parameters(model)
    plain = pfp.plan(model, params, data, 0.8, generator=torch.Generator().manual_seed(0))
    plan = pfp.plan(model, params, data, 0.8, generator=torch.Generator().manual_seed(0), round_to=8)
    kept = {layer["name"]: layer["kept"] for layer in plan.layers}
    assert all(k % 8 == 0 for k in kept.values()), kept  # 784 pixels, 300 and 100 neurons read
    assert kept != {layer["name"]: layer["kept"] for layer in plain.layers}
    assert abs(plan.kept - plan.target) <= 8 * 300  # one step of the coarsest layer: 8 pixels x 300 rows
    per_layer = [plan.allocation_at(10.0 ** e)["fc2"] for e in range(-3, 6)]
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:])) and all(a % 8 == 0 or a == 300 for a in per_layer)
    with pytest.raises(PrunelabError, match="round_to"):
        pfp.plan(model, params, data, 0.8, generator=torch.Generator().manual_seed(0), round_to=0)


def test_target_all_counts_every_parameter():
    model, data = _lenet300()
    params = masking.prunable_parameters(model)
    plan = pfp.plan(model, params, data, 0.8, generator=torch.Generator().manual_seed(0), target="all")
    total = sum(p.numel() for p in model.parameters())
    assert plan.total == total
    removed = sum(int((~m).sum()) for m in plan.masks.values())
    assert plan.kept == total - removed
    assert abs((1 - plan.kept / total) - 0.8) <= 0.01


def _check_channel_masks(model, masks):
    """Every hidden neuron is either alive (row kept) or gone everywhere (row, bias, next columns)."""
    w1, b1, w2 = masks["fc1.weight"], masks["fc1.bias"], masks["fc2.weight"]
    dead = ~w2.any(0)
    assert torch.equal(~w1.any(1), dead) and torch.equal(~b1, dead)
    assert w1.any() and masks["fc3.weight"].any()


@pytest.mark.parametrize("mode", pfp.MODES)
def test_modes_give_valid_masks(mode):
    model, data = _lenet300()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prunelab.prune(model, "pfp", 0.8, data=data, seed=3, mode=mode)
    masks = prunelab.masks(model)
    assert set(masks) >= {"fc1.weight", "fc2.weight", "fc3.weight", "fc1.bias", "fc2.bias"}
    assert all(m.dtype == torch.bool for m in masks.values())
    _check_channel_masks(model, masks)
    kept = sum(int(masks[n].sum()) for n in ("fc1.weight", "fc2.weight", "fc3.weight"))
    assert abs(kept / 266200 - 0.2) <= 0.01
    assert not report.collapsed
    scaled = any(not torch.equal(p.detach(), before[n] * masks.get(n, True)) for n, p in model.named_parameters())
    assert scaled == (mode != "deterministic")  # only the sampling modes reweight


def test_sampling_is_seeded():
    def masks_for(seed):
        model, data = _lenet300()
        prunelab.prune(model, "pfp", 0.8, data=data, seed=seed, mode="sample")
        return prunelab.masks(model), dict(model.named_parameters())["fc2.weight"].detach().clone()

    a, wa = masks_for(1)
    b, wb = masks_for(1)
    c, _ = masks_for(2)
    assert all(torch.equal(a[n], b[n]) for n in a) and torch.equal(wa, wb)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_cascade_never_revives_and_scope_is_checked():
    model, data = _lenet300()
    prunelab.prune(model, "pfp", 0.5, data=data)
    first = prunelab.masks(model)
    prunelab.prune(model, "pfp", 0.8, data=data)
    second = prunelab.masks(model)
    for name, mask in first.items():
        assert not (second[name] & ~mask).any(), name
    with pytest.raises(PrunelabError, match="scope"):
        prunelab.prune(model, "pfp", 0.9, data=data, scope="layer")
    with pytest.raises(PrunelabError, match="mode"):
        prunelab.prune(model, "pfp", 0.9, data=data, mode="random")
    with pytest.raises(PrunelabError, match="needs data"):
        prunelab.prune(model, "pfp", 0.9)


def test_pfp_on_a_flattening_cnn_prunes_whole_filters():
    model = prunelab.build_model("lenet5-caffe", seed=0)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 1, 28, 28, generator=g), torch.zeros(16, dtype=torch.long))
    prunelab.prune(model, "pfp", 0.7, data=data)
    masks = prunelab.masks(model)
    fc3 = masks["fc3.weight"].view(500, 50, 16)
    channel_read = fc3.any(0).any(1)
    # fc3 drops whole conv2 channels (16 features each), and conv2 filters that nobody reads are gone
    assert torch.equal(fc3.any(0), channel_read[:, None].expand(50, 16))
    assert torch.equal(masks["conv2.weight"].flatten(1).any(1), channel_read)
    assert not channel_read.all()


def test_sensitivity_time_lenet5_caffe_128_points():
    model = prunelab.build_model("lenet5-caffe", seed=0)
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(min=-0.4242)
    s = pfp.empirical_sensitivity(model, x, batch_size=64)
    assert set(s) == {"conv1", "conv2", "fc3", "fc4"}


# --- the vectorised convolution path against the definition and against the pre-vectorisation masks ----

def _layer_inputs(model, x, names):
    """Each named layer's input on ``x`` (eval mode), as the sensitivity pass sees it."""
    named, seen = dict(model.named_modules()), {}
    hooks = [named[n].register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0]))
             for n in names]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_sensitivity_on_a_resnet_matches_the_literal_definition():
    # first conv (signed inputs: a+ and a-), stride-2 and last-stage convs of residual blocks, and the
    # classifier; three points in batches of two, so the running maximum crosses a batch
    model = prunelab.build_model("resnet20", seed=0)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = ["conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.0.conv2", "layer3.2.conv2", "linear"]
    got = pfp.empirical_sensitivity(model, x, names, batch_size=2)
    inputs = _layer_inputs(model, x, names)
    named = dict(model.named_modules())
    for name in names:
        assert torch.allclose(got[name], _reference_sensitivity(named[name], inputs[name]), atol=1e-6), name


@pytest.mark.parametrize("conv", [
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=5, padding=2),
])
def test_sensitivity_of_strided_dilated_and_odd_kernels(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 7, **conv)
    x = torch.randn(4, 5, 9, 11).relu_()  # post-ReLU: zeros, so some patches have z = 0
    got = pfp.empirical_sensitivity(nn.Sequential(layer), x, batch_size=3)["0"]
    assert torch.allclose(got, _reference_sensitivity(layer, x), atol=1e-6)


def _mask_digest(model):
    """Number of masks, kept entries, and a hash of the mask bytes (sorted by name)."""
    import hashlib
    masks = prunelab.masks(model)
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).contiguous().numpy().tobytes())
    return len(masks), sum(int(m.sum()) for m in masks.values()), digest.hexdigest()[:16]


# computed by the implementation before the convolution path (unfolded patches, commit 2d6d2fe)
_RESNET20_PFP_MASKS = {
    (("sparsity", 0.5), ("batch_size", 16)): (38, 134819, "1a3f4515fdf0be1b"),
    (("parameters", 0.6), ("batch_size", 32)): (44, 108287, "88531885ec6ff52b"),
}


@pytest.mark.parametrize("call", list(_RESNET20_PFP_MASKS))
def test_resnet20_masks_are_those_of_the_unfolded_implementation(call):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 10, (48,), generator=g)
    model = prunelab.build_model("resnet20", seed=0)
    prunelab.prune(model, "pfp", data=data, seed=0, **dict(call))
    assert _mask_digest(model) == _RESNET20_PFP_MASKS[call]


# --- one scoring pass, several targets ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["deterministic", "sample"])
def test_plan_at_another_target_reuses_the_sensitivities(mode, monkeypatch):
    model, data = _lenet300()
    params = masking.prunable_parameters(model)
    first = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), mode=mode)
    fresh = {s: pfp.plan(model, params, data, s, generator=torch.Generator().manual_seed(0), mode=mode)
             for s in (0.8, 0.95)}

    def no_second_pass(*args, **kwargs):
        raise AssertionError("at() must not recompute sensitivities")

    monkeypatch.setattr(pfp, "empirical_sensitivity", no_second_pass)
    for sparsity, expected in fresh.items():
        again = first.at(sparsity)
        assert (again.kept, again.target, again.epsilon) == (expected.kept, expected.target, expected.epsilon)
        assert all(torch.equal(again.masks[n], expected.masks[n]) for n in expected.masks)
        assert set(again.scales) == set(expected.scales)
        assert all(torch.equal(again.scales[n], expected.scales[n]) for n in expected.scales)
    assert first.at(0.5).kept == first.kept


def test_units_without_a_lower_bound_are_maximised_column_by_column(monkeypatch):
    # without the patches around each channel's largest input, units the first outputs' patches miss
    # start at 0, where the bound cannot divide: their columns are maximised exactly, one at a time
    monkeypatch.setattr(pfp, "_patches_around_max",
                        lambda *a: (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    calls = []
    columns = pfp._conv_columns
    monkeypatch.setattr(pfp, "_conv_columns", lambda *a: calls.append(a[5].numel()) or columns(*a))
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.rand(3, 6, 8, 8) * (torch.rand(3, 6, 8, 8) < 0.3)
    x[:, 5] = 0.0
    x[1, 5, 4, 4] = 0.5           # channel 5: one pixel, where the other channels are large (small R)
    x[1, :5, 2:7, 2:7] = 10.0
    got = pfp.empirical_sensitivity(nn.Sequential(layer), x, batch_size=3)["0"]
    assert sum(calls) > 0
    assert torch.allclose(got, _reference_sensitivity(layer, x), atol=1e-6)
