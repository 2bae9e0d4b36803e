"""GraSP (Wang et al. 2020) and SynFlow (Tanaka et al. 2020): scores on cases computed by hand, sign
conventions, exact counts, data-free pruning, determinism, and SynFlow avoiding layer collapse."""

import copy
import math
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from conftest import deep_narrow_mlp
from prunelab import masking, selection
from prunelab.criteria.grasp import balanced_batches
from prunelab.criteria.synflow import _round_masks


@pytest.fixture(scope="module")
def mnist(data_root):
    train, _, _ = prunelab.load_dataset("mnist", root=data_root)
    return train


def count(model):
    return sum(int(m.sum()) for m in prunelab.masks(model).values())


# --- GraSP -------------------------------------------------------------------------------------------

class Chain(nn.Module):
    """logits = (w2 * w1 * x, 0): two scalar weights in a chain."""

    def __init__(self, w1, w2):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.fill_(w1)
            self.l2.weight.fill_(w2)
        self.double()

    def forward(self, x):
        u = self.l2(self.l1(x))
        return torch.cat([u, torch.zeros_like(u)], dim=1)


def test_grasp_sign_on_a_chain_computed_by_hand():
    # x = 1, target 0, u = w1 w2: L = softplus(-u), L'(u) = -sigmoid(-u), L''(u) = sigmoid(-u) sigmoid(u).
    # g = L'(u) (w2, w1), so ||g||^2 = L'(u)^2 (w1^2 + w2^2). Gating w1 by c1 makes u = c1 w1 w2 and
    # w1 -> c1 w1, so at c1 = 1: d||g||^2/dc1 = 2 L' L'' u (w1^2 + w2^2) + 2 L'^2 w1^2 (w2 likewise).
    w1, w2 = 2.0, 0.5
    u = w1 * w2

    def sigmoid(t):
        return 1.0 / (1.0 + math.exp(-t))

    d1, d2 = -sigmoid(-u), sigmoid(-u) * sigmoid(u)
    keep1 = 0.5 * (2 * d1 * d2 * u * (w1**2 + w2**2) + 2 * d1**2 * w1**2)
    keep2 = 0.5 * (2 * d1 * d2 * u * (w1**2 + w2**2) + 2 * d1**2 * w2**2)
    data = (torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]))
    scores = prunelab.scores(Chain(w1, w2), "grasp", data, temperature=1.0)
    assert scores["l1.weight"].item() == pytest.approx(keep1, rel=1e-10)
    assert scores["l2.weight"].item() == pytest.approx(keep2, rel=1e-10)
    assert keep1 > 0 > keep2  # removing w2 would raise the gradient norm (S = -keep2 > 0): it goes
    model = Chain(w1, w2)
    with pytest.warns(prunelab.LayerCollapseWarning, match="l2.weight"):  # one weight per layer here
        prunelab.prune(model, "grasp", 0.5, data, temperature=1.0)
    assert prunelab.masks(model)["l1.weight"].item() and not prunelab.masks(model)["l2.weight"].item()


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def squared_gradient_norm(model, name, index, gate, x, y, temperature):
    clone = copy.deepcopy(model)
    params = masking.prunable_parameters(clone)
    with torch.no_grad():
        params[name].view(-1)[index] *= gate
    half = len(y) // 2  # GraSP sums the losses of the two halves of its batch (the official code's split)
    loss = sum(F.cross_entropy(clone(x[part]) / temperature, y[part]) for part in (slice(0, half), slice(half, None)))
    grads = torch.autograd.grad(loss, list(params.values()))
    return sum(float((g**2).sum()) for g in grads)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_grasp_keep_score_is_half_the_gate_derivative_of_the_squared_gradient_norm(temperature):
    # θ_j (H g)_j = ½ d||g(c ⊙ θ)||² / dc_j: keep score = -S(-θ) of the paper, by finite differences
    # (L = the sum of the two half-batches' mean losses, as GraSP computes it)
    model = tiny_mlp()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    scores = prunelab.scores(model, "grasp", (x, y), temperature=temperature)
    h = 1e-5
    for name, p in masking.prunable_parameters(model).items():
        for index in range(0, p.numel(), 2):
            fd = (squared_gradient_norm(model, name, index, 1 + h, x, y, temperature)
                  - squared_gradient_norm(model, name, index, 1 - h, x, y, temperature)) / (2 * h)
            assert scores[name].view(-1)[index].item() == pytest.approx(0.5 * fd, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_grasp_exact_counts_on_mnist(mnist, scope):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    report = prunelab.prune(model, "grasp", 0.95, mnist, scope=scope)
    assert report.kept == count(model) == selection.keep_count(266200, 0.95)
    scores = prunelab.scores(prunelab.build_model("lenet300-100", init="vs", seed=0), "grasp", mnist)
    masks = prunelab.masks(model)
    if scope == "global":  # the removed are exactly those with the largest S = -keep score
        assert torch.cat([scores[n][masks[n]] for n in masks]).min() >= torch.cat(
            [scores[n][~masks[n]] for n in masks]).max()


def test_grasp_batch_is_class_balanced_and_seeded(mnist):
    a = balanced_batches(mnist, torch.Generator().manual_seed(0), 3, 2)
    b = balanced_batches(mnist, torch.Generator().manual_seed(0), 3, 2)
    assert len(a) == 2 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    for _, targets in a:
        assert torch.bincount(targets, minlength=10).tolist() == [3] * 10
        assert targets.tolist() == sorted(targets.tolist())  # class-ordered: halves hold classes 0-4 / 5-9
    assert not torch.equal(a[0][0], a[1][0])


def test_grasp_leaves_a_bn_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    before = copy.deepcopy(model.state_dict())
    model.eval()
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(6, 1, 6, 6, generator=gen), torch.randint(0, 3, (6,), generator=gen))
    train_mode = prunelab.scores(model, "grasp", data)
    eval_mode = prunelab.scores(model, "grasp", data, bn_mode="eval")
    assert not torch.allclose(train_mode["0.weight"], eval_mode["0.weight"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


# --- SynFlow ------------------------------------------------------------------------------------------

def test_synflow_scores_of_a_two_layer_net_by_hand():
    # R = 1ᵀ|W2||W1|1, so S1_ij = |W1_ij| (1ᵀ|W2|)_i and S2_ki = |W2_ki| (|W1| 1)_i (a ReLU passes all)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    a1, a2 = model[0].weight.detach().abs().double(), model[2].weight.detach().abs().double()
    scores = prunelab.scores(model, "synflow", input_shape=(4,))
    torch.testing.assert_close(scores["0.weight"], a1 * a2.sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], a2 * a1.sum(1)[None, :])
    assert scores["0.weight"].dtype == torch.float64


def test_synflow_is_data_free_and_finds_the_input_shape(mnist):
    a = prunelab.build_model("lenet300-100", init="vs", seed=0)
    b = prunelab.build_model("lenet300-100", init="vs", seed=0)
    c = prunelab.build_model("lenet300-100", init="vs", seed=0)
    prunelab.prune(a, "synflow", 0.9, input_shape=(1, 28, 28), rounds=10)
    prunelab.prune(b, "synflow", 0.9, data=mnist, rounds=10)           # shape from one example
    prunelab.prune(c, "synflow", 0.9, input_shape="1,28,28", rounds=10)  # as --method-option gives it
    assert all(torch.equal(prunelab.masks(a)[n], prunelab.masks(b)[n]) for n in prunelab.masks(a))
    assert all(torch.equal(prunelab.masks(a)[n], prunelab.masks(c)[n]) for n in prunelab.masks(a))
    with pytest.raises(prunelab.PrunelabError, match="input_shape"):
        prunelab.prune(prunelab.build_model("lenet300-100", seed=0), "synflow", 0.9)
    assert not prunelab.pruning.get_method("synflow").needs_data


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_synflow_exact_counts_deterministic_and_model_untouched(scope):
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    original = copy.deepcopy(model.state_dict())
    report = prunelab.prune(model, "synflow", 0.98, input_shape=(1, 28, 28), scope=scope, rounds=20)
    assert report.kept == count(model) == selection.keep_count(266200, 0.98)
    masks = prunelab.masks(model)
    for name, value in model.state_dict().items():  # kept weights unchanged, only the pruned are zero
        assert value.dtype == torch.float32
        expected = original[name] * masks[name] if name in masks else original[name]
        assert torch.equal(value, expected)
    assert all(p.grad is None for p in model.parameters()) and model.training
    again = prunelab.build_model("lenet300-100", init="vs", seed=0)
    prunelab.prune(again, "synflow", 0.98, input_shape=(1, 28, 28), scope=scope, rounds=20)
    assert all(torch.equal(masks[n], prunelab.masks(again)[n]) for n in masks)


def test_synflow_one_round_is_one_shot_top_k():
    model = prunelab.build_model("lenet300-100", init="vs", seed=1)
    scores = prunelab.scores(model, "synflow", input_shape=(1, 28, 28))
    prunelab.prune(model, "synflow", 0.9, input_shape=(1, 28, 28), rounds=1)
    expected = selection.global_topk(scores, 0.9)
    assert all(torch.equal(prunelab.masks(model)[n], expected[n]) for n in expected)


def test_the_fast_round_selection_equals_the_library_selection():
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        sizes = torch.randint(1, 40, (3,), generator=gen).tolist()
        scores = {f"l{i}": torch.randint(0, 4, (n,), generator=gen).double() for i, n in enumerate(sizes)}
        alive = {k: torch.rand(v.shape, generator=gen) < 0.7 for k, v in scores.items()}
        sparsity = float(torch.rand(1, generator=gen))
        fast, exact = _round_masks(scores, sparsity, alive), selection.global_topk(scores, sparsity, alive)
        assert all(torch.equal(fast[k], exact[k]) for k in scores)


def test_synflow_respects_existing_masks():
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    prunelab.prune(model, "random", 0.5, seed=0)
    old = prunelab.masks(model)
    prunelab.prune(model, "synflow", 0.95, input_shape=(1, 28, 28), rounds=10)
    new = prunelab.masks(model)
    assert all(not (new[n] & ~old[n]).any() for n in old)
    assert count(model) == selection.keep_count(266200, 0.95)


def test_synflow_hundred_rounds_on_lenet300_is_fast():
    model = prunelab.build_model("lenet300-100", init="vs", seed=0)
    assert prunelab.pruning.get_method("synflow").options.rounds == 100
    prunelab.prune(model, "synflow", 0.99, input_shape=(1, 28, 28))
    assert count(model) == selection.keep_count(266200, 0.99)



def flows(model):
    """Whether any positive path from input to output survives: R of the masked |W| network, biases off."""
    clone = copy.deepcopy(model)
    masking.make_permanent(clone)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(p.abs() if name.endswith("weight") else torch.zeros_like(p))
        return float(clone(torch.ones(1, 1, 8, 8)).sum()) > 0


def test_synflow_avoids_the_layer_collapse_of_magnitude_and_snip():
    # At 99.5% sparsity of a deep, narrow MLP (vs init), global magnitude empties the wide layers (their
    # weights are small: variance 1/fan_in) and SNIP empties the first; SynFlow keeps every layer and a
    # path from input to output (the paper's claim: it reaches maximal compression without collapse).
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    collapsed = {}
    for method in ("magnitude", "snip", "synflow"):
        model = deep_narrow_mlp()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = prunelab.prune(model, method, 0.995, data if method == "snip" else None,
                                    **({"input_shape": (1, 8, 8)} if method == "synflow" else {}))
        assert any(issubclass(w.category, prunelab.LayerCollapseWarning) for w in caught) == bool(report.collapsed)
        collapsed[method] = (report.collapsed, flows(model))
        assert report.kept == selection.keep_count(report.total, 0.995)
    assert collapsed["magnitude"][0] and not collapsed["magnitude"][1]
    assert collapsed["snip"][0] and not collapsed["snip"][1]
    assert collapsed["synflow"] == ([], True)


@pytest.mark.parametrize("method", ["grasp", "synflow"])
def test_other_zoo_models(method):
    # a recurrent and a residual BN network; tiny random data keep it fast
    for name, shape in (("lstm", (1, 28, 28)), ("resnet20", (3, 32, 32))):
        model = prunelab.build_model(name, init="vs", seed=0)
        before = copy.deepcopy(model.state_dict())
        gen = torch.Generator().manual_seed(0)
        data = (torch.randn(2, *shape, generator=gen), torch.arange(2))
        options = {"rounds": 5} if method == "synflow" else {}
        report = prunelab.prune(model, method, 0.9, data, **options)
        assert report.kept == selection.keep_count(report.total, 0.9)
        masks = prunelab.masks(model)
        after = model.state_dict()
        assert all(torch.equal(after[k], before[k] * masks[k] if k in masks else before[k]) for k in before)
        assert math.isfinite(report.sparsity)


def test_methods_are_listed():
    for name, when, needs in (("snip", "init", True), ("grasp", "init", True), ("synflow", "init", False)):
        method = prunelab.pruning.get_method(name)
        assert (method.when, method.scope, method.needs_data) == (when, "global", needs)
        assert method.paper
