"""Ranking direction of every registered method: each keeps the MOST important weights / channels.

Each method gets at least one test that fails when its ranking is inverted (it keeps the least important
entries instead). Scores are compared with an independent computation (a literal Python loop, finite
differences or a small hand-made case whose answer is obvious), never with the library's own helpers,
and pruning is checked to keep the top of that independent ranking.

``random`` and ``none`` have no ranking; ``dropconnect`` draws a random mask (see its test).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab.criteria.lobster import Regulariser, apply_threshold, find_threshold
from prunelab.schedules import Lobster

D = torch.float64

# every method with a ranking, and the tests below that pin its direction
COVERED = {"magnitude", "snip", "grasp", "synflow", "lobster", "pfp", "pfec", "softnet", "relief", "isparse",
           "retrain-free", "nisp", "dropconnect"}
NO_RANKING = {"random", "none"}


def test_every_registered_method_has_a_ranking_test():
    names = {m.name for m in prunelab.list_methods()}
    assert names - NO_RANKING == COVERED, "a method was added or removed: give it a ranking test here"


# --- helpers -------------------------------------------------------------------------------------------

def _mlp(widths, *, bias=True, act=nn.ReLU, seed=0, dtype=D):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), act()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _set(module, weight, bias=None):
    with torch.no_grad():
        module.weight.copy_(torch.as_tensor(weight, dtype=module.weight.dtype).view_as(module.weight))
        if bias is not None:
            module.bias.copy_(torch.as_tensor(bias, dtype=module.bias.dtype).view_as(module.bias))


def _entries(tensors):
    """[(name, flat index, value)] of every entry, by a plain loop."""
    return [(name, i, float(v)) for name, t in tensors.items() for i, v in enumerate(t.flatten().tolist())]


def _top_set(tensors, keep):
    """The ``keep`` largest entries (name, flat index) by a plain sort; asserts no tie at the boundary."""
    ranked = sorted(_entries(tensors), key=lambda e: -e[2])
    if 0 < keep < len(ranked):
        assert ranked[keep - 1][2] > ranked[keep][2], "ambiguous test case: tie at the boundary"
    return {(n, i) for n, i, _ in ranked[:keep]}


def _kept_set(masks, names):
    return {(n, i) for n in names for i, v in enumerate(masks[n].flatten().tolist()) if v}


def _assert_proportional(actual, expected, rtol=1e-6):
    """actual == k * expected for one k > 0 (a criterion may normalise; the direction must agree)."""
    actual, expected = actual.to(D).flatten(), expected.to(D).flatten()
    k = float(actual @ expected) / float(expected @ expected)
    assert k > 0, f"scores point the other way (k = {k})"
    torch.testing.assert_close(actual, k * expected, rtol=rtol, atol=rtol * float(actual.abs().max()))


def _rows_alive(mask):
    """Per output row (neuron / filter): whether any weight of it survives."""
    return [bool(r.any()) for r in mask.flatten(1)]


def _columns_alive(mask):
    """Per input column (input feature / channel): whether any weight reading it survives."""
    return [bool(mask[:, j].any()) for j in range(mask.shape[1])]


# --- magnitude -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_keeps_the_largest_weights(scope):
    model = _mlp([6, 5, 3])
    params = {"0.weight": model[0].weight.detach().clone(), "2.weight": model[2].weight.detach().clone()}
    scores = prunelab.scores(model, "magnitude")
    for name, w in params.items():
        for i, v in enumerate(w.flatten().tolist()):
            assert float(scores[name].flatten()[i]) == abs(v)
    prunelab.prune(model, "magnitude", sparsity=0.6, scope=scope)
    masks = prunelab.masks(model)
    if scope == "global":
        expected = _top_set({n: w.abs() for n, w in params.items()}, round(0.4 * 45))
    else:
        expected = _top_set({"0.weight": params["0.weight"].abs()}, 12) | _top_set(
            {"2.weight": params["2.weight"].abs()}, 6)
    assert _kept_set(masks, params) == expected


# --- SNIP ----------------------------------------------------------------------------------------------

def _loss(model, x, y, temperature=1.0):
    return F.cross_entropy(model(x) / temperature, y)


def _finite_difference_gradient(model, param, x, y, h=1e-6):
    grad = torch.zeros_like(param)
    flat, out = param.data.view(-1), grad.view(-1)
    with torch.no_grad():
        for i in range(flat.numel()):
            keep = float(flat[i])
            flat[i] = keep + h
            up = float(_loss(model, x, y))
            flat[i] = keep - h
            down = float(_loss(model, x, y))
            flat[i] = keep
            out[i] = (up - down) / (2 * h)
    return grad


def test_snip_scores_are_normalised_w_times_finite_difference_gradient():
    model = _mlp([4, 3, 3], act=nn.Tanh, seed=1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g, dtype=D), torch.randint(0, 3, (8,), generator=g)
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    raw = {n: (p.detach() * _finite_difference_gradient(model, p, x, y)).abs() for n, p in params.items()}
    total = sum(float(r.sum()) for r in raw.values())
    expected = {n: r / total for n, r in raw.items()}
    scores = prunelab.scores(model, "snip", data=(x, y))
    for name in params:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-5, atol=1e-8)
    prunelab.prune(model, "snip", sparsity=0.5, data=(x, y))
    assert _kept_set(prunelab.masks(model), params) == _top_set(expected, round(0.5 * 21))


def test_snip_keeps_the_informative_input_not_the_noise():
    # logits = W x with W all 0.5: p = (1/2, 1/2) for every example. Input 0 is +1 for class 0 and -1 for
    # class 1 (informative); input 1 is small noise. dL/dW[k, 0] = mean (p_k - y_k) x_0 = -/+0.5 for
    # every example, so |w dL/dw| is 0.25 on column 0 and about 0 on column 1: SNIP keeps column 0.
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).to(D)
    _set(model[0], torch.full((2, 2), 0.5))
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 8)
    x = torch.stack([1.0 - 2.0 * y.to(D), 0.01 * torch.randn(16, generator=g, dtype=D)], 1)
    s = prunelab.scores(model, "snip", data=(x, y))["0.weight"]
    assert float(s[:, 0].min()) > 10 * float(s[:, 1].max())
    prunelab.prune(model, "snip", sparsity=0.5, data=(x, y))
    assert prunelab.masks(model)["0.weight"].tolist() == [[True, False], [True, False]]


# --- GraSP ---------------------------------------------------------------------------------------------

def test_grasp_keep_score_is_half_the_gate_derivative_of_the_squared_gradient_norm():
    # GraSP keeps the weights whose removal would shrink the gradient norm most: keep score
    # theta_j (H g)_j = 1/2 d||g(c * theta)||^2 / dc_j at c = 1. Here by central differences on the gate,
    # with g from plain first-order autograd (no Hessian-vector product).
    temperature = 5.0
    model = _mlp([3, 4, 3], act=nn.Tanh, seed=2)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=gen, dtype=D), torch.tensor([0, 1, 2, 0, 1, 2])
    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}

    def grad_norm_sq():
        grads = torch.autograd.grad(_loss(model, x, y, temperature), list(params.values()))
        return float(sum((gr ** 2).sum() for gr in grads))

    h = 1e-5
    expected = {}
    for name, p in params.items():
        ref = torch.zeros_like(p, dtype=D)
        for i in range(p.numel()):
            w = float(p.data.view(-1)[i])
            with torch.no_grad():
                p.data.view(-1)[i] = w * (1 + h)
            up = grad_norm_sq()
            with torch.no_grad():
                p.data.view(-1)[i] = w * (1 - h)
            down = grad_norm_sq()
            with torch.no_grad():
                p.data.view(-1)[i] = w
            ref.view(-1)[i] = 0.5 * (up - down) / (2 * h)
        expected[name] = ref
    scores = prunelab.scores(model, "grasp", data=(x, y), temperature=temperature)
    # GraSP splits the batch in halves and sums their mean losses: a constant positive factor
    _assert_proportional(torch.cat([scores[n].flatten() for n in params]),
                         torch.cat([expected[n].flatten() for n in params]), rtol=1e-4)
    assert any(float(e.min()) < 0 for e in expected.values())  # a signed score: the sign matters
    prunelab.prune(model, "grasp", sparsity=0.5, data=(x, y), temperature=temperature)
    assert _kept_set(prunelab.masks(model), params) == _top_set(expected, round(0.5 * 24))


# --- SynFlow -------------------------------------------------------------------------------------------

def _synflow_by_loop(weights):
    """S = |W_l[i, j]| * (paths from the output to neuron i) * (paths from the input to input j),
    on the network of |W| with an all-ones input, bias-free, by literal loops."""
    absw = [[[abs(v) for v in row] for row in w.tolist()] for w in weights]
    forward = [[1.0] * len(absw[0][0])]  # forward[l][j]: sum of |W| paths from the input into unit j
    for w in absw:
        forward.append([sum(w[i][j] * forward[-1][j] for j in range(len(w[0]))) for i in range(len(w))])
    backward = [[1.0] * len(absw[-1])]   # backward[..][i]: sum of |W| paths from unit i to the output
    for w in reversed(absw):
        backward.insert(0, [sum(w[i][j] * backward[0][i] for i in range(len(w))) for j in range(len(w[0]))])
    scores = []
    for l, w in enumerate(absw):
        scores.append(torch.tensor([[w[i][j] * backward[l + 1][i] * forward[l][j] for j in range(len(w[0]))]
                                    for i in range(len(w))], dtype=D))
    return scores


def test_synflow_scores_and_one_round_selection_match_a_literal_loop():
    model = _mlp([4, 5, 3, 2], bias=False, seed=3)
    names = ["0.weight", "2.weight", "4.weight"]
    weights = [model[0].weight.detach(), model[2].weight.detach(), model[4].weight.detach()]
    expected = dict(zip(names, _synflow_by_loop(weights)))
    scores = prunelab.scores(model, "synflow", input_shape=(4,))
    for name in names:
        torch.testing.assert_close(scores[name].to(D), expected[name], rtol=1e-9, atol=1e-12)
    prunelab.prune(model, "synflow", sparsity=0.6, input_shape=(4,), rounds=1)
    assert _kept_set(prunelab.masks(model), names) == _top_set(expected, round(0.4 * 41))


def test_synflow_iterative_rounds_keep_the_strongest_path():
    # hidden neuron i has incoming weights of size 2^-i * (4, 3.9, 3.8, 3.7) and outgoing weight 1:
    # every path through neuron 0 carries more flow than any through another; the weakest row goes first.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False)).to(D)
    _set(model[0], [[(4.0 - 0.1 * j) * 2.0 ** -i * (-1) ** (i + j) for j in range(4)] for i in range(4)])
    _set(model[2], [[1.0, -1.0, 1.0, -1.0]])
    prunelab.prune(model, "synflow", sparsity=0.5, input_shape=(4,))  # default 100 rounds
    masks = prunelab.masks(model)
    assert masks["0.weight"][0].all() and masks["2.weight"][0, 0]
    assert not masks["0.weight"][3].any() and not masks["2.weight"][0, 3]


# --- LOBSTER -------------------------------------------------------------------------------------------

def test_lobster_threshold_removes_the_smallest_magnitudes():
    values = {"a.weight": [0.5, -0.05, 2.0, -0.15, 0.0], "b.weight": [-1.0, 0.1, 0.2, -3.0]}
    params = {n: nn.Parameter(torch.tensor(v, dtype=D)) for n, v in values.items()}
    masks = apply_threshold(params, 0.2)
    for name, vals in values.items():
        assert masks[name].tolist() == [abs(v) >= 0.2 and v != 0 for v in vals]

    # loss = 1 + (sum of the |w| the trial zeroed): with twt = 0.35 at most 0.35 of magnitude may go, so the
    # best threshold removes exactly 0.05, 0.1 and 0.15 (0.3), not 0.2 too (0.5).
    originals = {n: p.detach().clone() for n, p in params.items()}
    trials = []

    def loss_at():
        zeroed = [abs(float(o)) for n, p in params.items() for o, v in zip(originals[n], p) if v == 0 and o != 0]
        alive = [abs(float(v)) for p in params.values() for v in p if v != 0]
        trials.append((zeroed, alive))
        return 1.0 + sum(zeroed)

    search = find_threshold(nn.Module(), params, loss_at, twt=0.35)
    assert trials[0][0] == []  # the reference loss sees every weight
    for zeroed, alive in trials:  # every trial removes a set of the smallest magnitudes
        assert not zeroed or not alive or max(zeroed) < min(alive), (zeroed, alive)
    assert any(zeroed for zeroed, _ in trials)
    for name, p in params.items():
        assert torch.equal(p.detach(), originals[name])  # every trial restored the weights
    masks = apply_threshold(params, search.threshold)
    removed = sorted(abs(v) for n, vals in values.items() for v, m in zip(vals, masks[n].tolist())
                     if v != 0 and not m)
    assert removed == [0.05, 0.1, 0.15]


def test_lobster_regulariser_shrinks_weights_with_small_gradients_more():
    # p <- p - lambda * p * max(0, 1 - |g|) after the optimizer step (lr 0 here: only the penalty acts)
    lam = 0.1
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    w0 = [[1.0, 1.0, 1.0], [-2.0, 0.5, -0.5]]
    grads = [[0.0, 0.5, 1.5], [0.1, -0.9, -0.2]]
    _set(model[0], w0, [1.0, -1.0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = Lobster(model, None, options={"lambda": lam}).attach(optimizer)
    model[0].weight.grad = torch.tensor(grads, dtype=D)
    model[0].bias.grad = torch.tensor([0.0, 2.0], dtype=D)
    optimizer.step()
    schedule.step()  # the regulariser, after the optimizer step
    expected = [[w - lam * w * max(0.0, 1.0 - abs(g)) for w, g in zip(wr, gr)] for wr, gr in zip(w0, grads)]
    torch.testing.assert_close(model[0].weight.detach(), torch.tensor(expected, dtype=D))
    torch.testing.assert_close(model[0].bias.detach(), torch.tensor([1.0 - lam, -1.0], dtype=D))
    w = model[0].weight.detach()
    assert w[0, 0] < w[0, 1] < w[0, 2] == 1.0  # same start, |g| = 0, 0.5, 1.5: the smallest |g| shrinks most
    assert all(abs(a) <= abs(b) for a, b in zip(w.flatten().tolist(), itertools.chain(*w0)))  # towards zero

    direct = nn.Parameter(torch.tensor([3.0, -3.0], dtype=D))
    direct.grad = torch.tensor([0.25, 0.25], dtype=D)
    Regulariser({"p": direct}, 0.5).apply()
    assert direct.detach().tolist() == [3.0 - 0.5 * 3.0 * 0.75, -3.0 + 0.5 * 3.0 * 0.75]


# --- PFP -----------------------------------------------------------------------------------------------

def _pfp_sensitivity_by_loop(weight, inputs, eps=float(torch.finfo(torch.float32).eps)):
    """s_j = max over points (a+ and a- separately), outputs i, signs of w of w_ij a_j / z_i (Linear)."""
    W = weight.tolist()
    s = [0.0] * len(W[0])
    for row in inputs.tolist():
        for a in ([max(v, 0.0) for v in row], [max(-v, 0.0) for v in row]):
            for i in range(len(W)):
                for sign in (1.0, -1.0):
                    part = [max(sign * w, 0.0) for w in W[i]]
                    z = sum(p * v for p, v in zip(part, a))
                    if z > eps:
                        for j in range(len(a)):
                            s[j] = max(s[j], part[j] * a[j] / z)
    return torch.tensor(s)


def test_pfp_scores_are_the_empirical_sensitivity_by_a_literal_loop():
    model = _mlp([4, 3, 2], seed=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 4, generator=g)
    hidden = torch.relu(model[0](x)).detach()
    scores = prunelab.scores(model, "pfp", data=(x, torch.zeros(12, dtype=torch.long)))
    for name, weight, inputs in (("0.weight", model[0].weight, x), ("2.weight", model[2].weight, hidden)):
        s = _pfp_sensitivity_by_loop(weight.detach(), inputs)
        torch.testing.assert_close(scores[name], s.expand_as(weight), rtol=1e-5, atol=1e-6)


def test_pfp_keeps_the_channels_with_far_larger_activations():
    # input 0 is about 10, inputs 1-3 about 0.01: input 0 carries the sensitivity of fc1.
    # hidden neuron 2 has weights 5 (the others 0.1): its activation dominates what fc2 reads.
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    _set(model[0], [[w] * 4 for w in (0.1, 0.1, 5.0, 0.1)])
    _set(model[2], torch.full((2, 4), 0.5))
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 4, generator=g) * 0.01
    x[:, 0] += 10.0
    prunelab.prune(model, "pfp", sparsity=0.7, data=(x, torch.zeros(32, dtype=torch.long)))
    masks = prunelab.masks(model)
    fc1, fc2 = _columns_alive(masks["0.weight"]), _columns_alive(masks["2.weight"])
    assert fc1[0] and not all(fc1), fc1
    assert fc2[2] and not all(fc2), fc2
    assert _rows_alive(masks["0.weight"])[2]


# --- PFEC (L1) and SoftNet (L2) filter pruning ---------------------------------------------------------

# filter 0: all 0.1 (L1 0.9, L2 0.3); 1: one 0.8 (L1 0.8, L2 0.8); 2: all 0.05 (L1 0.45, L2 0.15);
# 3: one 0.5 and eight 0.01 (L1 0.58, L2 0.5): L1 ranks 0 > 1 > 3 > 2, L2 ranks 1 > 3 > 0 > 2
FILTERS = [[0.1] * 9, [0.8] + [0.0] * 8, [0.05] * 9, [0.01] * 4 + [-0.5] + [0.01] * 4]


def _conv_net():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    _set(model[0], FILTERS)
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    return model, (x, torch.tensor([0, 1]))


@pytest.mark.parametrize("method, p, kept_at_half", [("pfec", 1, [True, True, False, False]),
                                                      ("softnet", 2, [False, True, False, True])])
def test_filter_norm_methods_keep_the_largest_norm_filters(method, p, kept_at_half):
    model, data = _conv_net()
    norms = [sum(abs(v) ** p for v in f) ** (1 / p) for f in model[0].weight.detach().to(D).flatten(1).tolist()]
    scores = prunelab.scores(model, method, data=data)
    for j, norm in enumerate(norms):
        torch.testing.assert_close(scores["0.weight"][j], torch.full((1, 3, 3), norm, dtype=D))
    prunelab.prune(model, method, channels=0.5, data=data)
    assert _rows_alive(prunelab.masks(model)["0.weight"]) == kept_at_half

    model, data = _conv_net()
    prunelab.prune(model, method, channels=0.75, data=data)
    best = max(range(4), key=lambda j: norms[j])
    assert _rows_alive(prunelab.masks(model)["0.weight"]) == [j == best for j in range(4)]


def test_filter_norm_methods_on_a_hidden_linear_layer():
    # neuron rows: (1, 1, 1, 1) L1 4 L2 2; (3, 0, 0, 0) L1 3 L2 3; (0.5, ...) L1 2 L2 1; (0.1, ...) smallest
    rows = [[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0], [0.5] * 4, [0.1] * 4]
    for method, keep in (("pfec", [True, False, False, False]), ("softnet", [False, True, False, False])):
        model = _mlp([4, 4, 2], seed=7, dtype=torch.float32)
        _set(model[0], [[-v if k % 2 else v for k, v in enumerate(r)] for r in rows])
        prunelab.prune(model, method, channels=0.75, input_shape=(4,))
        assert _rows_alive(prunelab.masks(model)["0.weight"]) == keep, method


# --- NNrelief ------------------------------------------------------------------------------------------

def test_relief_scores_are_activity_shares_by_a_literal_loop():
    model = _mlp([4, 3, 2], seed=8)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 4, generator=g, dtype=D)
    hidden = torch.relu(model[0](x)).detach()
    scores = prunelab.scores(model, "relief", data=(x, torch.zeros(10, dtype=torch.long)))
    for name, layer, inputs in (("0.weight", model[0], x), ("2.weight", model[2], hidden)):
        W, b = layer.weight.detach().tolist(), layer.bias.detach().tolist()
        mean = [sum(abs(r[j]) for r in inputs.tolist()) / len(inputs) for j in range(len(W[0]))]
        expected = []
        for i, row in enumerate(W):
            contrib = [abs(w) * m for w, m in zip(row, mean)]
            total = sum(contrib) + abs(b[i])
            expected.append([c / total for c in contrib])
        torch.testing.assert_close(scores[name], torch.tensor(expected, dtype=D))


def test_relief_keeps_the_connections_that_carry_the_activity():
    # fc1: input 0 is about 5, inputs 1-2 about 0.01, equal weights: each neuron's share of input 0 is
    # about 0.99 > alpha, so only column 0 stays. fc2: hidden neuron 0 (weights 1) is 100x as active as
    # neuron 1 (weights 0.01), so fc2 keeps its column and drops neuron 1's (then cleaned up as a unit).
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).to(D)
    _set(model[0], [[1.0, 1.0, 1.0], [0.01, 0.01, 0.01]], [0.001, 0.00001])
    _set(model[2], torch.full((2, 2), 0.5), [0.001, 0.001])
    g = torch.Generator().manual_seed(9)
    x = torch.rand(20, 3, generator=g, dtype=D) * 0.01
    x[:, 0] += 5.0
    prunelab.prune(model, "relief", data=(x, torch.zeros(20, dtype=torch.long)))  # alpha decides how much
    masks = prunelab.masks(model)
    assert masks["0.weight"][0].tolist() == [True, False, False]
    assert masks["2.weight"].tolist() == [[True, False], [True, False]]
    assert not masks["0.weight"][1].any()  # neuron 1 feeds nothing any more


# --- iSparse and Retrain-free --------------------------------------------------------------------------

def _edge_reference(model, x, propagated):
    """E(j, i) = mean|x_i| |w_ji| N(j), N(j) = sum_k |W_next[k, j]| N_next(k) from N_out = 1 (or N = 1)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inputs, h = [], x
    for k, layer in enumerate(linears):
        inputs.append(h)
        h = layer(h)
        if k < len(linears) - 1:
            h = torch.relu(h)
    N = [[1.0] * linears[-1].out_features]
    for layer in reversed(linears[1:]):
        W = layer.weight.detach().tolist()
        N.insert(0, [sum(abs(W[k][j]) * N[0][k] for k in range(len(W))) for j in range(len(W[0]))])
    result = []
    for layer, a, n in zip(linears, inputs, N):
        W = layer.weight.detach().tolist()
        mean = [sum(abs(r[i]) for r in a.tolist()) / len(a) for i in range(len(W[0]))]
        result.append(torch.tensor([[mean[i] * abs(W[j][i]) * (n[j] if propagated else 1.0)
                                     for i in range(len(W[0]))] for j in range(len(W))], dtype=D))
    return result


@pytest.mark.parametrize("method", ["isparse", "retrain-free"])
def test_edge_scores_match_a_literal_loop_and_layerwise_top_k(method):
    model = _mlp([4, 5, 3, 2], seed=10)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(10), dtype=D)
    data = (x, torch.zeros(9, dtype=torch.long))
    names = ["0.weight", "2.weight", "4.weight"]
    expected = dict(zip(names, _edge_reference(model, x, propagated=method == "isparse")))
    scores = prunelab.scores(model, method, data=data)
    for name in names:  # iSparse normalises N per layer: equal up to a positive factor per layer
        _assert_proportional(scores[name], expected[name])
    prunelab.prune(model, method, sparsity=0.6, data=data)  # per layer: 8 of 20, 6 of 15, 2 of 6 stay
    masks = prunelab.masks(model)
    for name, keep in zip(names, (8, 6, 2)):
        assert _kept_set(masks, [name]) == _top_set({name: expected[name]}, keep)


def test_isparse_keeps_edges_into_the_neuron_the_output_depends_on():
    # equal fc1 weights and inputs: only the output side tells neurons apart. Hidden neuron 0 reaches the
    # output with weight 3, neuron 1 with 0.1: iSparse keeps the edges into neuron 0.
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)).to(D)
    _set(model[0], torch.full((2, 3), 0.5), [0.0, 0.0])
    _set(model[2], [[3.0, 0.1]], [0.0])
    x = torch.ones(4, 3, dtype=D)
    prunelab.prune(model, "isparse", sparsity=0.5, data=(x, torch.zeros(4, dtype=torch.long)))
    masks = prunelab.masks(model)
    assert masks["0.weight"].tolist() == [[True] * 3, [False] * 3]
    assert masks["2.weight"].tolist() == [[True, False]]


def test_retrain_free_keeps_edges_from_the_active_input():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).to(D)
    _set(model[0], torch.full((2, 3), 0.5), [0.0, 0.0])
    x = torch.rand(8, 3, generator=torch.Generator().manual_seed(11), dtype=D) * 0.01
    x[:, 1] -= 4.0  # input 1 is by far the most active (|x|, the sign does not matter)
    prunelab.prune(model, "retrain-free", sparsity=2 / 3, data=(x, torch.zeros(8, dtype=torch.long)))
    assert prunelab.masks(model)["0.weight"].tolist() == [[False, True, False]] * 2


# --- NISP ----------------------------------------------------------------------------------------------

def test_nisp_removes_the_neurons_with_the_least_propagated_importance():
    model = _mlp([4, 5, 3, 2], seed=12)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(12), dtype=D)
    data = (x, torch.zeros(6, dtype=torch.long))
    W2, W3 = model[2].weight.detach().tolist(), model[4].weight.detach().tolist()
    s2 = [sum(abs(W3[k][j]) for k in range(2)) for j in range(3)]        # s_out = 1
    s1 = [sum(abs(W2[k][j]) * s2[k] for k in range(3)) for j in range(5)]
    scores = prunelab.scores(model, "nisp", data=data)
    _assert_proportional(scores["0.weight"], torch.tensor(s1, dtype=D)[:, None].expand(5, 4))
    _assert_proportional(scores["2.weight"], torch.tensor(s2, dtype=D)[:, None].expand(3, 5))
    prunelab.prune(model, "nisp", channels=0.4, data=data)  # 2 of 5 and 1 of 3 neurons go
    masks = prunelab.masks(model)
    top1 = sorted(range(5), key=lambda j: -s1[j])[:3]
    top2 = sorted(range(3), key=lambda j: -s2[j])[:2]
    assert len({round(v, 12) for v in s1}) == 5 and len({round(v, 12) for v in s2}) == 3  # no ties
    assert _rows_alive(masks["0.weight"]) == [j in top1 for j in range(5)]
    assert _rows_alive(masks["2.weight"]) == [j in top2 for j in range(3)]


# --- DropConnect ---------------------------------------------------------------------------------------

def test_dropconnect_has_no_ranking_to_invert():
    # DropConnect (as iSparse's baseline) drops a uniformly random fraction of edges per layer: its
    # "scores" are seeded uniform noise, independent of the weights and the data, so there is no
    # importance ranking whose inversion a test could catch. Pin that: the mask depends only on the seed.
    a, b = _mlp([6, 5, 3], seed=13), _mlp([6, 5, 3], seed=14)
    with torch.no_grad():
        b[0].weight.mul_(100.0)
    prunelab.prune(a, "dropconnect", sparsity=0.6, seed=3)
    prunelab.prune(b, "dropconnect", sparsity=0.6, seed=3)
    ma, mb = prunelab.masks(a), prunelab.masks(b)
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert [int(m.sum()) for m in ma.values()] == [12, 6]
