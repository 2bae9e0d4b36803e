"""SNIP (Lee et al., ICLR 2019): the score against finite differences, exact counts, several batches,
BatchNorm modes, leaving the model untouched, every architecture of the zoo, biases, layer collapse."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from conftest import deep_narrow_mlp
from prunelab import masking
from prunelab.selection import keep_count
from prunelab.criteria.snip import connection_sensitivity, default_batch_size, snip_scores
from prunelab.data.arrays import ArrayDataset
from prunelab.lab.config import RunConfig
from prunelab.lab.run import run as lab_run


@pytest.fixture(scope="module")
def mnist(data_root):
    train, _, _ = prunelab.load_dataset("mnist", root=data_root)
    return train


def tiny_mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)
    return model


def tiny_data(n=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def loss_with_gate(model, name, index, gate, x, y):
    """L(c ⊙ w) with c = 1 except c_j = gate at weight (name, index)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        dict(clone.named_parameters())[name].view(-1)[index] *= gate
        return F.cross_entropy(clone(x), y).item()


def test_sensitivity_is_the_gate_derivative_of_the_loss_by_finite_differences():
    model, (x, y) = tiny_mlp(), tiny_data()
    params = masking.prunable_parameters(model)
    g = connection_sensitivity(model, params, data=(x, y), generator=torch.Generator())
    h = 1e-6
    checked = 0
    for name, p in params.items():
        for index in range(0, p.numel(), 3):  # several weights of every layer
            fd = (loss_with_gate(model, name, index, 1 + h, x, y)
                  - loss_with_gate(model, name, index, 1 - h, x, y)) / (2 * h)
            assert g[name].view(-1)[index].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
            checked += 1
    assert checked > 15


def test_removing_a_weight_changes_the_loss_by_about_minus_g():
    # eq. 4-5: ΔL_j = L(w) - L(w without j) ≈ g_j, i.e. removing j changes the loss by ≈ -g_j
    model, (x, y) = tiny_mlp(seed=1), tiny_data(seed=1)
    params = masking.prunable_parameters(model)
    g = connection_sensitivity(model, params, data=(x, y), generator=torch.Generator())
    base = F.cross_entropy(model(x), y).item()
    removal, predicted = [], []
    for name, p in params.items():
        for index in range(p.numel()):
            removal.append(loss_with_gate(model, name, index, 0.0, x, y) - base)
            predicted.append(-g[name].view(-1)[index].item())
    removal, predicted = torch.tensor(removal), torch.tensor(predicted)
    corr = torch.corrcoef(torch.stack([removal, predicted]))[0, 1]
    assert corr > 0.95
    small = predicted.abs() < 0.01  # where the first-order term is small, so is the true change
    assert (removal[small] - predicted[small]).abs().max() < 0.01


def test_scores_are_normalised_magnitudes():
    model, data = tiny_mlp(), tiny_data()
    params = masking.prunable_parameters(model)
    g = connection_sensitivity(model, params, data=data, generator=torch.Generator())
    s = snip_scores(model, params, data=data, generator=torch.Generator())
    total = sum(v.abs().sum() for v in g.values())
    assert sum(float(v.sum()) for v in s.values()) == pytest.approx(1.0, abs=1e-12)
    for name in params:
        torch.testing.assert_close(s[name], g[name].abs() / total)
    # the public entry point gives the same
    public = prunelab.scores(model, "snip", data)
    for name in params:
        torch.testing.assert_close(public[name], s[name])


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_exact_count_survives_on_mnist(mnist, scope, sparsity):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    report = prunelab.prune(model, "snip", sparsity=sparsity, data=mnist, scope=scope)
    m = 784 * 300 + 300 * 100 + 100 * 10
    kept = sum(int(mask.sum()) for mask in prunelab.masks(model).values())
    assert kept == report.kept == round((1 - sparsity) * m)
    nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if n.endswith("weight"))
    assert nonzero == kept


def test_global_keeps_the_highest_sensitivities(mnist):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    scores = prunelab.scores(model, "snip", mnist, seed=3)
    prunelab.prune(model, "snip", 0.95, mnist, seed=3)
    masks = prunelab.masks(model)
    kept = torch.cat([scores[n][masks[n]] for n in masks])
    dropped = torch.cat([scores[n][~masks[n]] for n in masks])
    assert kept.min() >= dropped.max()
    assert len(kept) == round(0.05 * 266200)


def test_default_batch_size_is_the_papers():
    assert default_batch_size((torch.zeros(2, 1, 28, 28), torch.zeros(2))) == 100
    assert default_batch_size((torch.zeros(2, 3, 32, 32), torch.zeros(2))) == 128


def test_the_batch_is_drawn_from_the_generator(mnist):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    a, b, c = (prunelab.scores(model, "snip", mnist, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    # one batch of the default size 100: the same as scoring that batch given as a tensor pair
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)))
    batch = next(mnist.batches(100, shuffle=True, seed=seed, augment=False))
    direct = prunelab.scores(model, "snip", batch)
    assert all(torch.equal(a[n], direct[n]) for n in a)


def test_several_batches_sum_the_signed_sensitivity():
    # Two one-example batches whose gradients cancel on the first input column and add on the second:
    # both give logits (2w, 2w) / (0, 0), so p = (1/2, 1/2) and dL/dW = (p - e_0) x^T.
    model = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.3)
    inputs = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 0])
    summed = prunelab.scores(model, "snip", (inputs, targets), batches=2)["weight"]
    assert summed[:, 0].abs().max() < 1e-15          # cancelled: |g1 + g2| = 0
    torch.testing.assert_close(summed[:, 1], torch.tensor([0.5, 0.5], dtype=torch.float64))
    each = prunelab.scores(model, "snip", (inputs[:1], targets[:1]))["weight"]
    torch.testing.assert_close(each, torch.full((2, 2), 0.25, dtype=torch.float64))  # no cancellation
    # |g| per batch would instead give equal scores everywhere: the sum is signed, then |.|


def test_several_batches_from_a_dataset(mnist):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    one = prunelab.scores(model, "snip", mnist, batches=1)
    three = prunelab.scores(model, "snip", mnist, batches=3)
    assert not torch.equal(one["fc1.weight"], three["fc1.weight"])
    small = ArrayDataset(mnist.inputs[:250], mnist.targets[:250], mnist.classes)
    with pytest.raises(prunelab.PrunelabError, match="too few"):
        prunelab.scores(model, "snip", small, batches=3, batch_size=100)  # 250 examples: only 2 batches of 100
    shrunk = masking.copy_model(model)  # without batch_size, the paper's 100 shrinks to fit: 3 batches of 83
    assert prunelab.prune(shrunk, "snip", 0.5, small, batches=3).examples == 249
    prunelab.scores(model, "snip", small, batches=3, batch_size=80)
    with pytest.raises(prunelab.PrunelabError, match="batch_size"):
        prunelab.scores(model, "snip", small, batch_size=0)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_bn_modes_differ_and_the_model_is_left_untouched():
    model = bn_net()
    with torch.no_grad():  # running statistics that are not the identity, so both modes matter
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[3].eval()  # a mixed mode must come back as it was
    for p in model[5].parameters():
        p.requires_grad_(False)  # so must requires_grad
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    evals = prunelab.scores(model, "snip", data)
    trains = prunelab.scores(model, "snip", data, bn_mode="train")
    again = prunelab.scores(model, "snip", data, bn_mode="train")
    assert not torch.allclose(evals["0.weight"], trains["0.weight"])
    assert all(torch.equal(trains[n], again[n]) for n in trains)  # dropout is off while scoring
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running stats, num_batches_tracked
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model[5].parameters()] == [False, False]
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(prunelab.PrunelabError, match="bn_mode"):
        prunelab.scores(model, "snip", data, bn_mode="batch")


def test_eval_mode_uses_the_initial_running_statistics():
    # a fresh BN in eval mode (mean 0, var 1) is the identity map up to eps: same scores as without BN
    model = bn_net()
    plain = nn.Sequential(*[m for i, m in enumerate(copy.deepcopy(model)) if i != 1])
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen))
    with_bn, without = prunelab.scores(model, "snip", data), prunelab.scores(plain, "snip", data)
    torch.testing.assert_close(with_bn["0.weight"], without["0.weight"], rtol=1e-4, atol=1e-9)


def test_pruning_a_model_that_has_grads_and_masks(mnist):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    prunelab.prune(model, "magnitude", 0.5)
    F.cross_entropy(model(mnist.inputs[:10]), mnist.targets[:10]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    old = prunelab.masks(model)
    prunelab.prune(model, "snip", 0.9, mnist)
    new = prunelab.masks(model)
    assert all(not (new[n] & ~old[n]).any() for n in old)  # pruned weights stay pruned
    assert sum(int(m.sum()) for m in new.values()) == round(0.1 * 266200)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())  # .grad untouched


ZOO = [("lenet5-caffe", {}, (1, 28, 28)), ("lstm", {}, (1, 28, 28)), ("gru", {"embed": True}, (1, 28, 28)),
       ("resnet20", {}, (3, 32, 32)), ("vgg-like", {}, (3, 32, 32))]


@pytest.mark.parametrize("name,options,shape", ZOO, ids=[z[0] for z in ZOO])
def test_every_architecture_scores_without_changes(name, options, shape):
    model = prunelab.build_model(name, init="vs", seed=0, **options)
    before = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(2, *shape, generator=gen), torch.randint(0, 10, (2,), generator=gen))
    scores = prunelab.scores(model, "snip", data, bn_mode="train")
    params = masking.prunable_parameters(model)
    assert list(scores) == list(params)
    assert all(scores[n].shape == p.shape for n, p in params.items())
    assert sum(float(s.sum()) for s in scores.values()) == pytest.approx(1.0)
    assert all(bool((s > 0).any()) for s in scores.values())  # every layer receives a sensitivity
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["lstm", "lenet5-caffe"])
def test_pruning_recurrent_and_conv_nets_keeps_exact_counts(mnist, name):
    model = prunelab.build_model(name, init="vs", seed=0)
    report = prunelab.prune(model, "snip", 0.95, mnist)
    total = sum(p.numel() for p in masking.prunable_parameters(model).values())
    assert report.kept == round(0.05 * total) and not report.collapsed
    if name == "lstm":
        assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= set(prunelab.masks(model))


def test_include_bias_prunes_zero_initialised_biases_first(mnist):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)  # non-default init: biases are 0
    scores = prunelab.scores(model, "snip", mnist, include_bias=True)
    assert all(float(scores[n].abs().max()) == 0.0 for n in scores if n.endswith("bias"))
    with warnings.catch_warnings():
        # prune() reports the emptied bias vectors as collapsed layers (a false alarm: the weights remain)
        warnings.simplefilter("ignore", prunelab.LayerCollapseWarning)
        report = prunelab.prune(model, "snip", 0.95, mnist, include_bias=True)
    masks = prunelab.masks(model)
    assert report.total == 266610 and report.kept == keep_count(266610, 0.95)  # m counts the biases
    assert all(not masks[n].any() for n in masks if n.endswith("bias"))
    # PyTorch's default init has non-zero biases: they then compete like any weight (a hidden unit that
    # is dead on the whole batch has dL/db = 0, so only the output layer's are all non-zero for sure)
    default = prunelab.build_model("lenet300-100", seed=0)
    scores = prunelab.scores(default, "snip", mnist, include_bias=True)
    assert float(scores["fc3.bias"].min()) > 0 and float((scores["fc1.bias"] > 0).float().mean()) > 0.5



def test_layer_collapse_is_reported_for_snip_at_extreme_sparsity():
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    model = deep_narrow_mlp()
    with pytest.warns(prunelab.LayerCollapseWarning, match="snip pruned every weight of 1.weight"):
        report = prunelab.prune(model, "snip", 0.998, data)
    assert report.collapsed == ["1.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunelab.prune(deep_narrow_mlp(), "snip", 0.9, data)  # no warning where no layer collapses


def test_unknown_options_and_missing_data_are_clear_errors(mnist):
    model = prunelab.build_model("lenet300-100", seed=0)
    with pytest.raises(prunelab.PrunelabError, match="needs data"):
        prunelab.prune(model, "snip", 0.9)
    with pytest.raises(prunelab.PrunelabError, match="allowed: batch_size, batches, bn_mode"):
        prunelab.prune(model, "snip", 0.9, mnist, batchsize=10)
    assert not masking.is_masked(model)
    drawn = prunelab.prune(masking.copy_model(model), "snip", 0.9, (mnist.inputs[:10], mnist.targets[:10]), batch_size=5)
    assert drawn.examples == 5  # a pair is drawn from like any data, and the report says how many were used


@pytest.mark.filterwarnings("ignore::prunelab.LayerCollapseWarning")  # emptied bias vectors (a false alarm)
def test_lab_run_with_snip_and_method_options(tmp_path, data_root):
    config = RunConfig(model="lenet300-100", method="snip", sparsity=0.95, init="vs", iterations=30, epochs=None,
                       method_options={"batches": 2, "batch_size": 50}, include_bias=True,
                       data_root=str(data_root), out=str(tmp_path / "run"), latency=False)
    result = lab_run(config, echo=None)
    assert result["when"] == "init" and result["scope"] == "global"
    event = result["prune_events"][0]
    assert event["method"] == "snip" and event["total"] == 266610 and event["kept"] == keep_count(266610, 0.95)
    assert [h["stage_name"] for h in result["history"]] == ["train"]


# --- the interpretability figure (paper section 5.4, Fig. 2) --------------------------------------------

def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_pixel_map_is_the_first_layer_keep_fraction(mnist):
    from prunelab.figures import snip_pixel_map

    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    x, y = mnist.inputs[:100], mnist.targets[:100]
    image = snip_pixel_map(model, x, y, 0.9)
    assert image.shape == (28, 28) and 0 <= float(image.min()) and float(image.max()) <= 1
    prunelab.prune(model, "snip", 0.9, (x, y))  # the same mask through the public API
    assert float(image.mean()) == pytest.approx(float(prunelab.masks(model)["fc1.weight"].float().mean()))
    with pytest.raises(prunelab.PrunelabError, match="fully connected"):
        snip_pixel_map(prunelab.build_model("lenet5-caffe", seed=0), x, y, 0.9)


def test_snip_figure_writes_a_png_whose_class_maps_differ(mnist, tmp_path):
    from prunelab.figures import figure_size, save_snip_figure

    path = tmp_path / "fig" / "snip.png"
    maps = save_snip_figure(path, mnist, sparsity=(0.5, 0.9), classes=[0, 1], batch_size=50, dpi=50)
    assert maps.shape == (2, 3, 28, 28)  # rows: sparsities; columns: 0, 1, mixed
    width, height = figure_size(2, 3)
    assert png_size(path) == (round(width * 50), round(height * 50))
    assert [p.name for p in path.parent.iterdir()] == ["snip.png"]  # no temporary left behind
    zero, one = maps[1, 0], maps[1, 1]
    assert (zero - one).abs().mean() > 0.02
    # interpretability: each class's map resembles that class's mean image more than the other's
    means = [mnist.inputs[mnist.targets == c][:500].mean(0)[0] for c in (0, 1)]

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    assert corr(zero, means[0]) > corr(zero, means[1]) and corr(one, means[1]) > corr(one, means[0])


def test_figure_command_line(data_root, tmp_path):
    from prunelab import figures

    out = tmp_path / "cli.png"
    assert figures.main(["snip", "--out", str(out), "--classes", "3", "--batch-size", "20", "--dpi", "40",
                         "--data-root", str(data_root)]) == 0
    assert png_size(out) == tuple(round(v * 40) for v in figures.figure_size(1, 2))
