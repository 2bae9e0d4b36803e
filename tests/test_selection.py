"""Selection rules: exact counts, ties, alive masks, errors; and prune() on the baselines."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunelab
from prunelab import masking, selection


def random_scores(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
       sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 10_000), scope=st.sampled_from(["global", "layer"]))
def test_exact_count_survives(sizes, sparsity, seed, scope):
    scores = random_scores(sizes, seed)
    masks = selection.select(scores, sparsity, scope)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round((1 - sparsity) * sum(sizes))
    if scope == "layer":  # every layer within one entry of its share
        for name, mask in masks.items():
            assert abs(int(mask.sum()) - (1 - sparsity) * mask.numel()) < 1 + 1e-9


def test_global_keeps_the_highest_scores():
    scores = {"a": torch.tensor([0.1, 5.0, 0.3]), "b": torch.tensor([4.0, 0.2])}
    masks = selection.global_topk(scores, 0.6)  # keep round(0.4 * 5) = 2
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [True, False]


def test_ties_are_broken_by_order_deterministically():
    scores = {"a": torch.ones(4), "b": torch.ones(4)}
    masks = selection.global_topk(scores, 0.5)
    assert masks["a"].tolist() == [True] * 4 and masks["b"].tolist() == [False] * 4
    assert selection.layerwise_topk({"a": torch.ones(5)}, 0.6)["a"].tolist() == [True, True, False, False, False]


def test_alive_entries_are_never_revived_and_target_counts_all():
    scores = {"a": torch.tensor([9.0, 8.0, 1.0, 2.0])}
    alive = {"a": torch.tensor([False, True, True, True])}
    masks = selection.global_topk(scores, 0.5, alive)
    assert masks["a"].tolist() == [False, True, False, True]
    # a target above what is alive keeps only the alive ones
    assert selection.global_topk(scores, 0.0, alive)["a"].tolist() == alive["a"].tolist()


def test_per_layer_sparsity_mapping():
    scores = {"a": torch.arange(10.0), "b": torch.arange(4.0)}
    masks = selection.layerwise_topk(scores, {"a": 0.7, "b": 0.5})
    assert masks["a"].tolist() == [False] * 7 + [True] * 3
    assert masks["b"].tolist() == [False, False, True, True]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, None])
def test_sparsity_out_of_range_is_refused(bad):
    with pytest.raises(prunelab.PrunelabError, match="sparsity"):
        selection.check_sparsity(bad)


def test_nan_scores_and_unknown_scope_are_refused():
    with pytest.raises(prunelab.PrunelabError, match="NaN"):
        selection.global_topk({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(prunelab.PrunelabError, match="scope 'bogus'; choose from: global, layer"):
        selection.select({"a": torch.ones(2)}, 0.5, "bogus")


def lenet():
    return prunelab.build_model("lenet300-100", seed=0)


@pytest.mark.parametrize("method", ["random", "magnitude"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prune_baselines_exact(method, scope):
    model = lenet()
    report = prunelab.prune(model, method, sparsity=0.9, scope=scope, seed=3)
    masks = prunelab.masks(model)
    m = sum(x.numel() for x in masks.values())
    assert report.kept == sum(int(x.sum()) for x in masks.values()) == round(0.1 * m) == 26620
    assert math.isclose(report.sparsity, 0.9, abs_tol=1e-12)
    if scope == "layer":
        for row in report.layers:
            assert abs(row["kept"] - 0.1 * row["params"]) < 1


def test_magnitude_keeps_largest_weights():
    model = lenet()
    weights = {n: p.detach().abs().clone() for n, p in masking.prunable_parameters(model).items()}
    prunelab.prune(model, "magnitude", sparsity=0.8)
    kept_min = min(weights[n][m].min() for n, m in prunelab.masks(model).items())
    pruned_max = max(weights[n][~m].max() for n, m in prunelab.masks(model).items())
    assert kept_min >= pruned_max


def test_random_is_seeded():
    a, b, c = lenet(), lenet(), lenet()
    prunelab.prune(a, "random", sparsity=0.5, seed=1)
    prunelab.prune(b, "random", sparsity=0.5, seed=1)
    prunelab.prune(c, "random", sparsity=0.5, seed=2)
    assert all(torch.equal(prunelab.masks(a)[n], prunelab.masks(b)[n]) for n in prunelab.masks(a))
    assert not torch.equal(prunelab.masks(a)["fc1.weight"], prunelab.masks(c)["fc1.weight"])


def test_iterative_prune_continues_from_existing_masks():
    model = lenet()
    prunelab.prune(model, "magnitude", sparsity=0.5)
    first = {n: m.clone() for n, m in prunelab.masks(model).items()}
    prunelab.prune(model, "random", sparsity=0.8, seed=0)
    for name, mask in prunelab.masks(model).items():
        assert not (mask & ~first[name]).any()  # nothing pruned came back
    assert sum(int(m.sum()) for m in prunelab.masks(model).values()) == round(0.2 * 266200)


def test_layer_collapse_warns_and_names_the_layer():
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e-6)
    with pytest.warns(prunelab.LayerCollapseWarning, match="2.weight"):
        report = prunelab.prune(model, "magnitude", sparsity=0.99)
    assert report.collapsed == ["2.weight"]


def test_prune_errors_are_clear():
    with pytest.raises(prunelab.PrunelabError, match="unknown method 'bogus'; choose from: .*magnitude"):
        prunelab.prune(lenet(), "bogus", sparsity=0.5)
    with pytest.raises(prunelab.PrunelabError, match="no prunable parameters"):
        prunelab.prune(nn.Sequential(nn.ReLU()), "magnitude", sparsity=0.5)
    with pytest.raises(prunelab.PrunelabError, match="unknown option"):
        prunelab.prune(lenet(), "magnitude", sparsity=0.5, temperature=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunelab.prune(lenet(), "magnitude", sparsity=0.5)  # no spurious warning


def test_scores_are_keyed_by_parameter_names():
    scores = prunelab.scores(lenet(), "magnitude")
    assert list(scores) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert prunelab.scores(lenet(), "magnitude", include_bias=True).keys() >= {"fc1.bias"}


def test_top_indices_selects_what_a_stable_sort_would():
    """The topk-threshold selection keeps exactly the set a stable descending sort keeps (ties, -inf)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 100, (1,), generator=g))
        flat = torch.randint(0, 5, (n,), generator=g).double()
        flat[torch.rand(n, generator=g) < 0.2] = float("-inf")
        keep = int(torch.randint(0, n + 1, (1,), generator=g))
        expected = torch.sort(flat, descending=True, stable=True).indices[:keep]
        assert sorted(selection._top_indices(flat, keep).tolist()) == sorted(expected.tolist())
