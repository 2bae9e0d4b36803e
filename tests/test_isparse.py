"""iSparse (docs/methods/isparse.md, reconstructed score) and its competitors Retrain-free, NISP, DropConnect:
hand-computed scores, the conv + flatten path against a literal loop, exact per-layer counts, seeds,
bad input, train-with and sparsify-with lab runs."""

import pytest
import torch
from torch import nn

import prunelab
from prunelab import PrunelabError, masking
from prunelab.criteria.isparse import when_from
from prunelab.schedules import Periodic
from prunelab.data.arrays import ArrayDataset
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig, fold_method_flags
from prunelab.methods import method_flags
from prunelab.selection import keep_count

D = torch.float64


def two_layer():
    """3 -> 2 (ReLU) -> 2. Hidden neuron 1 feeds nothing: its outgoing weights (column 1 of W2) are zero."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2)).to(D)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, 1.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -0.5]))
        net[2].weight.copy_(torch.tensor([[2.0, 0.0], [-1.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([1.0, -2.0]))
    return net


# x1 = (1, -2, 0), x2 = (3, 0, 2): mean |x| = (2, 1, 1).
# hidden h = relu(W1 x + b1): x1 -> (3.5, 6), x2 -> (7.5, 3): mean |h| = (5.5, 4.5).
X = (torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 2.0]], dtype=D), torch.tensor([0, 1]))


def test_isparse_scores_by_hand_on_two_layers():
    # N_out = (1, 1) / 2.  N_hidden = |W2|^T N_out = (2/2 + 1/2, 0 + 0) = (1.5, 0) -> normalised (1, 0).
    # E1(i, j) = mean|x_i| |w_ji| N_h(j): row 0 = (2*1, 1*1, 1*2) * 1 = (2, 1, 2); row 1 = 0 (N_h = 0).
    # E2(j, k) = mean|h_j| |w_kj| N_out(k): row 0 = (5.5*2, 4.5*0) / 2 = (5.5, 0); row 1 = (5.5*1, 0) / 2.
    # Biases are edges from a constant 1: |b| N = (0.5, 0) and (1, 2) / 2.
    s = prunelab.scores(two_layer(), "isparse", X, include_bias=True)
    torch.testing.assert_close(s["0.weight"], torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(s["0.bias"], torch.tensor([0.5, 0.0], dtype=D))
    torch.testing.assert_close(s["2.weight"], torch.tensor([[5.5, 0.0], [2.75, 0.0]], dtype=D))
    torch.testing.assert_close(s["2.bias"], torch.tensor([0.5, 1.0], dtype=D))
    # use_input=False: E = |w| N: row 0 of layer 1 = (1, 1, 2), row 1 = 0; layer 2 = |W2| / 2
    w = prunelab.scores(two_layer(), "isparse", X, use_input=False)
    torch.testing.assert_close(w["0.weight"], torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(w["2.weight"], torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=D))


def test_an_edge_into_a_neuron_no_output_depends_on_scores_zero_only_under_isparse():
    # Retrain-free: E = mean|x_i w_ij|: layer 1 row 1 = (2*0.5, 1*3, 1*1) = (1, 3, 1), layer 2 = (11, 0; 5.5, 0)
    rf = prunelab.scores(two_layer(), "retrain-free", X)
    torch.testing.assert_close(rf["0.weight"], torch.tensor([[2.0, 1.0, 2.0], [1.0, 3.0, 1.0]], dtype=D))
    torch.testing.assert_close(rf["2.weight"], torch.tensor([[11.0, 0.0], [5.5, 0.0]], dtype=D))
    iso = prunelab.scores(two_layer(), "isparse", X)
    assert float(iso["0.weight"][1].abs().max()) == 0.0 and float(rf["0.weight"][1].min()) > 0
    # so at 50% per layer iSparse drops exactly the edges into the useless neuron, Retrain-free does not
    a, b = two_layer(), two_layer()
    prunelab.prune(a, "isparse", 0.5, X)
    prunelab.prune(b, "retrain-free", 0.5, X)
    assert prunelab.masks(a)["0.weight"].tolist() == [[True, True, True], [False, False, False]]
    assert prunelab.masks(b)["0.weight"].tolist() == [[True, False, True], [False, True, False]]
    # neuron_importance="ones" is Retrain-free
    ones = prunelab.scores(two_layer(), "isparse", X, neuron_importance="ones")
    assert all(torch.equal(ones[n], rf[n]) for n in rf)


def test_softmax_output_significance():
    net = two_layer()
    p = torch.softmax(net(X[0]).detach(), 1).mean(0)  # the mean softmax probability of each class
    s = prunelab.scores(net, "isparse", X, output="softmax")
    # N_h = |W2|^T p normalised = (1, 0) still; layer 2: mean|h_j| |w_kj| p_k with p summing to 1
    torch.testing.assert_close(s["2.weight"], torch.tensor([[5.5 * 2 * p[0], 0.0], [5.5 * p[1], 0.0]], dtype=D))
    torch.testing.assert_close(s["0.weight"], torch.tensor([[2.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=D))


class TinyConv(nn.Module):
    """conv (pad 1) -> ReLU -> pool -> conv -> ReLU -> flatten -> fc -> ReLU -> fc: 8x8 -> 4x4 -> 3x3."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 2)
        self.f1, self.f2 = nn.Linear(4 * 3 * 3, 5), nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.c2(nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)))
        return self.f2(torch.relu(self.f1(x.flatten(1))))


def literal_isparse(net, x):
    """The reconstruction written out neuron by neuron and edge by edge (slow)."""
    c1, c2, f1, f2 = (m.weight.detach().abs() for m in (net.c1, net.c2, net.f1, net.f2))
    n_out = [1.0 / 3] * 3
    n_f1 = [sum(float(f2[k, j]) * n_out[k] for k in range(3)) for j in range(5)]
    n_f1 = [v / sum(n_f1) for v in n_f1]
    n_c2 = [sum(float(f1[j, c * 9 + p]) * n_f1[j] for j in range(5) for p in range(9)) for c in range(4)]
    n_c2 = [v / sum(n_c2) for v in n_c2]
    n_c1 = [sum(float(c2[o, c, u, v]) * n_c2[o] for o in range(4) for u in range(2) for v in range(2))
            for c in range(3)]
    n_c1 = [v / sum(n_c1) for v in n_c1]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k=k: inputs.__setitem__(k, a[0]))
             for k, m in (("c1", net.c1), ("c2", net.c2), ("f1", net.f1), ("f2", net.f2))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    out = {}
    for key, weight, n in (("c1", c1, n_c1), ("c2", c2, n_c2), ("f1", f1, n_f1), ("f2", f2, n_out)):
        e = torch.zeros(weight.shape, dtype=D)
        for idx in torch.cartesian_prod(*[torch.arange(d) for d in weight.shape]).tolist():
            j, i = idx[0], idx[1]
            mean_abs = float(inputs[key][:, i].abs().mean())  # over examples (and positions of channel i)
            e[tuple(idx)] = mean_abs * float(weight[tuple(idx)]) * n[j]
        out[key + ".weight"] = e
    return out


def test_conv_and_flatten_path_matches_a_literal_loop():
    torch.manual_seed(0)
    net = TinyConv().to(D)
    x = torch.randn(6, 2, 8, 8, dtype=D)
    fast = prunelab.scores(net, "isparse", (x, torch.zeros(6, dtype=torch.long)))
    slow = literal_isparse(net, x)
    assert list(fast) == list(slow)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-14)


ZOO = [("lenet300-100", {}, (1, 28, 28)), ("lenet5-caffe", {"relu": False}, (1, 28, 28)),
       ("lenet5-caffe", {"relu": True}, (1, 28, 28)), ("vgg-like", {}, (3, 32, 32)),
       ("vgg16", {"classifier": "nnrelief"}, (3, 32, 32))]


@pytest.mark.parametrize("name,options,shape", ZOO, ids=[f"{z[0]}-{z[1]}" for z in ZOO])
def test_zoo_scores_and_exact_per_layer_counts(name, options, shape):
    model = prunelab.build_model(name, seed=0, **options)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(4, *shape, generator=gen), torch.zeros(4, dtype=torch.long))
    scores = prunelab.scores(model, "isparse", data)
    params = masking.prunable_parameters(model)
    assert list(scores) == list(params)
    assert all(s.shape == p.shape and bool((s >= 0).all()) and bool((s > 0).any()) for s, p in
               zip(scores.values(), params.values()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    report = prunelab.prune(model, "isparse", 0.3, data)
    masks = prunelab.masks(model)
    for n, m in masks.items():  # each layer keeps within one weight of 70%, the total exactly
        assert abs(int(m.sum()) - 0.7 * m.numel()) < 1
        assert scores[n][m].min() >= scores[n][~m].max()  # the lowest-E edges of the layer go
    total = sum(p.numel() for p in params.values())
    assert report.kept == keep_count(total, 0.3)


def test_exact_counts_on_lenet5_and_global_scope(data_root):
    train, _, _ = prunelab.load_dataset("mnist", root=data_root)
    model = prunelab.build_model("lenet5-caffe", seed=0, relu=True)
    scores = prunelab.scores(model, "isparse", train, examples=200)
    for s in (0.05, 0.37, 0.5):
        copy = masking.copy_model(model)
        report = prunelab.prune(copy, "isparse", s, train, examples=200)
        assert report.kept == keep_count(430500, s) and report.scope == "layer"
        for layer in report.layers:
            assert abs(layer["kept"] - (1 - s) * layer["params"]) < 1
    glob = masking.copy_model(model)
    prunelab.prune(glob, "isparse", 0.5, train, examples=200, scope="global")
    masks = prunelab.masks(glob)
    kept = torch.cat([scores[n][masks[n]] for n in masks])
    dropped = torch.cat([scores[n][~masks[n]] for n in masks])
    assert kept.min() >= dropped.max() and len(kept) == keep_count(430500, 0.5)
    assert len({round(float(m.float().mean()), 3) for m in masks.values()}) > 1  # not uniform per layer


def test_scoring_examples_are_drawn_with_the_seed():
    gen = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(300, 1, 28, 28, generator=gen), torch.zeros(300, dtype=torch.long), ["x"])
    model = prunelab.build_model("lenet5-caffe", seed=0)
    a, b = prunelab.scores(model, "isparse", data, seed=3, examples=50), prunelab.scores(model, "isparse", data,
                                                                                       seed=3, examples=50)
    c = prunelab.scores(model, "isparse", data, seed=4, examples=50)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["conv2.weight"], c["conv2.weight"])
    # the draw is randperm(n)[:examples] from the seeded generator: the same as passing those rows
    rows = torch.randperm(300, generator=torch.Generator().manual_seed(3))[:50]
    direct = prunelab.scores(model, "isparse", (data.inputs[rows], data.targets[rows]))
    assert all(torch.allclose(a[n], direct[n], rtol=1e-12, atol=0) for n in a)
    whole = prunelab.scores(model, "isparse", data, examples=5000)  # more than there are: all 300
    every = prunelab.scores(model, "isparse", (data.inputs, data.targets))
    assert all(torch.allclose(whole[n], every[n], rtol=1e-12, atol=0) for n in a)


def test_bad_input_is_a_clear_error():
    model = two_layer()
    with pytest.raises(PrunelabError, match="mode must be one of: sparsify-with, train-with"):
        prunelab.prune(model, "isparse", 0.5, X, mode="sparsify")
    with pytest.raises(PrunelabError, match="mode must be one of"):
        when_from({"mode": "both"})
    assert when_from({"mode": "train-with"}) == "during" and when_from({}) == "trained"
    with pytest.raises(PrunelabError, match="neuron_importance"):
        prunelab.scores(model, "isparse", X, neuron_importance="nisp")
    with pytest.raises(PrunelabError, match="output must be one of"):
        prunelab.scores(model, "isparse", X, output="max")
    with pytest.raises(PrunelabError, match="use_input"):
        prunelab.scores(model, "isparse", X, use_input="yes")
    with pytest.raises(PrunelabError, match="needs an example input"):
        prunelab.scores(model, "isparse", use_input=False)
    with pytest.raises(PrunelabError, match="measures layer inputs on data"):
        prunelab.scores(model, "isparse", input_shape=(3,))
    w = prunelab.scores(model, "isparse", use_input=False, input_shape=(3,))  # weights only: no data needed
    torch.testing.assert_close(w["0.weight"][0], torch.tensor([1.0, 1.0, 2.0], dtype=D))
    shape = (3, 32, 32)
    data = (torch.randn(2, *shape), torch.zeros(2, dtype=torch.long))
    with pytest.raises(PrunelabError, match=r"written by 4 layers \(conv1, layer1\..*residual"):
        prunelab.scores(prunelab.build_model("resnet20", seed=0), "isparse", data)
    with pytest.raises(PrunelabError, match="rnn.weight_ih_l0 belongs to LSTM 'rnn'"):
        prunelab.scores(prunelab.build_model("lstm", seed=0), "isparse", (torch.randn(2, 1, 28, 28), X[1]))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(PrunelabError, match=r"Conv2d\(groups=2\) '1', which is not supported"):
        prunelab.scores(grouped, "isparse", torch.randn(2, 2, 6, 6))
    assert not masking.is_masked(model)
    # the retrain-free path needs no graph, but still only Linear / Conv2d
    with pytest.raises(PrunelabError, match="not supported"):
        prunelab.scores(grouped, "retrain-free", torch.randn(2, 2, 6, 6))


def test_mode_is_a_flag_and_implies_the_schedule(tmp_path, data_root):
    assert method_flags()["mode"] == ("isparse", "pfp")
    folded = fold_method_flags({"model": "lenet300-100", "method": "isparse", "mode": "train-with"})
    assert folded["method_options"] == {"mode": "train-with"}
    base = dict(model="lenet300-100", method="isparse", sparsity=0.5, data_root=str(data_root), latency=False)
    assert lab_run.resolve(RunConfig(**base, method_options={"mode": "train-with"})).when == "during"
    with pytest.raises(PrunelabError, match="contradicts"):
        lab_run.resolve(RunConfig(**base, when="during"))
    with pytest.raises(PrunelabError, match="mode must be one of"):
        lab_run.resolve(RunConfig(**base, method_options={"mode": "nope"}))


def test_sparsify_with_lab_run_does_not_fine_tune(tmp_path, data_root):
    cfg = RunConfig(model="lenet300-100", method="isparse", sparsity=0.6, iterations=20, epochs=None,
                    method_options={"examples": 100}, data_root=str(data_root), out=str(tmp_path / "sw"),
                    latency=False)
    resolved = lab_run.resolve(cfg)
    assert (resolved.when, resolved.scope, resolved.finetune_epochs) == ("trained", "layer", 0)
    assert [s.name for s in lab_run.plan(resolved)] == ["pretrain", "prune-1"]
    result = lab_run.run(cfg, echo=None)
    assert [h["stage_name"] for h in result["history"]] == ["pretrain"]
    assert result["sparsity"] == pytest.approx(0.6, abs=1e-12)
    assert all(abs(r["sparsity"] - 0.6) < 1e-4 for r in result["layers"])  # per layer


def test_train_with_lab_run_recomputes_masks_each_epoch(tmp_path, data_root):
    # batch 1000 on 54k training examples: 54 steps per epoch, so 60 iterations are two epochs
    cfg = RunConfig(model="lenet300-100", method="isparse", sparsity=0.5, iterations=60, epochs=None,
                    batch_size=1000, lr=0.05, method_options={"mode": "train-with", "examples": 200},
                    data_root=str(data_root), out=str(tmp_path / "tw"), latency=False)
    result = lab_run.run(cfg, echo=None)
    assert result["when"] == "during"
    events = result["prune_events"]
    assert [e["epoch"] for e in events] == [1, 2]
    assert events[0]["sparsity"] == pytest.approx(0.5, abs=1e-12) and events[0]["changed"] == 133100
    assert events[1]["changed"] == 0  # masks never revive: at a fixed factor the survivors stay
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-12)
    assert all(e["test_error"] < 0.5 for e in events)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_train_with_schedule_interval_ramp_and_resume():
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(64, 1, 4, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen), "abc")
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    schedule = Periodic(model, "isparse", sparsity=0.5, data=data, interval=2, ramp=2, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule.attach(optimizer)
    assert schedule.epoch_end() is None  # interval 2: nothing after epoch 1
    first = schedule.epoch_end()
    assert first["target_sparsity"] == pytest.approx(0.25) and first["sparsity"] == pytest.approx(0.25)
    masks_after_first = prunelab.masks(model)
    with torch.no_grad():  # training moves the weights on; the next recomputation sees them
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    state, tensors = schedule.state()
    second = schedule.epoch_end(epoch=4)
    assert second["sparsity"] == pytest.approx(0.5) and second["changed"] == 32 + 6  # 96 -> 64 and 18 -> 12 kept
    assert all(not (prunelab.masks(model)[n] & ~m).any() for n, m in masks_after_first.items())  # no revival
    assert "sparsity 0.5000" in schedule.describe(second)
    resumed = Periodic(model, "isparse", sparsity=0.5, data=data, interval=2, ramp=2, seed=0)
    resumed.load(state, tensors)
    assert len(resumed.events) == 1 and resumed.epochs == 2 and resumed.target(len(resumed.events) + 1) == 0.5
    assert not schedule.done
    with pytest.raises(PrunelabError, match="unknown option"):
        Periodic(model, "isparse", sparsity=0.5, data=data, intervals=2, seed=0)
    with pytest.raises(PrunelabError, match="interval must be a positive integer"):
        Periodic(model, "isparse", sparsity=0.5, data=data, interval=0, seed=0)


# --- competitors --------------------------------------------------------------------------------------------

def test_nisp_removes_whole_neurons_and_the_useless_one_first():
    net = two_layer()
    # NISP importance of the hidden layer = N_h = (1, 0): at 50% of the neurons, hidden neuron 1 goes
    report = prunelab.prune(net, "nisp", data=X, channels=0.5)
    masks = prunelab.masks(net)
    assert masks["0.weight"].tolist() == [[True] * 3, [False] * 3]
    assert masks["0.bias"].tolist() == [True, False] and masks["2.weight"][:, 1].tolist() == [False, False]
    assert "2.bias" not in masks  # the output layer is never pruned
    assert report.kept == 3 + 2 and report.method == "nisp"
    with pytest.raises(PrunelabError, match="scope must be 'layer'"):
        prunelab.prune(two_layer(), "nisp", data=X, channels=0.5, scope="global")


def test_nisp_on_lenet5_masks_whole_channels(data_root):
    train, _, _ = prunelab.load_dataset("mnist", root=data_root)
    model = prunelab.build_model("lenet5-caffe", seed=0, relu=True)
    importance = prunelab.scores(model, "nisp", train)
    prunelab.prune(model, "nisp", data=train, channels=0.4)
    masks = prunelab.masks(model)
    alive_in = torch.ones(1, dtype=torch.bool)  # the image
    for name, n in (("conv1.weight", 20), ("conv2.weight", 50), ("fc3.weight", 500), ("fc4.weight", 10)):
        # (out, in channel, rest): fc3 reads conv2's 50 channels as 16 features each (flatten)
        rows = masks[name].reshape(n, alive_in.numel(), -1)
        alive = rows.any(2).any(1)
        assert int((~alive).sum()) == (round(0.4 * n) if name != "fc4.weight" else 0)  # never the output
        assert bool(rows[alive][:, alive_in].all()) and not rows[:, ~alive_in].any()  # whole rows/columns
        assert not rows[~alive].any()
        if name != "fc4.weight":
            score = importance[name].reshape(n, -1)[:, 0]
            assert score[alive].min() >= score[~alive].max()  # the least important go
        alive_in = alive
    act = prunelab.scores(prunelab.build_model("lenet5-caffe", seed=0, relu=True), "nisp", train, output="activation",
                          examples=100)
    assert not torch.equal(act["fc3.weight"], importance["fc3.weight"])


def test_dropconnect_is_seeded_and_uniform_per_layer():
    model = prunelab.build_model("lenet300-100", seed=0)
    runs = []
    for seed in (0, 0, 1):
        copy = masking.copy_model(model)
        prunelab.prune(copy, "dropconnect", 0.3, seed=seed)
        runs.append(prunelab.masks(copy))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert not torch.equal(runs[0]["fc1.weight"], runs[2]["fc1.weight"])
    for m in runs[0].values():
        assert abs(int(m.sum()) - 0.7 * m.numel()) < 1
    method = prunelab.pruning.get_method("dropconnect")
    assert (method.scope, method.retrain, method.when) == ("layer", False, "trained")


@pytest.mark.parametrize("method", ["isparse", "nisp"])
def test_structure_check_refuses_residual_nets_from_weights_alone(method):
    spec = prunelab.pruning.get_method(method)
    options = spec.options.defaults()
    resnet = prunelab.build_model("resnet20", seed=0)
    with pytest.raises(PrunelabError, match=rf"{method} propagates .* written by 4 layers .*residual"):
        spec.check_structure(resnet, masking.prunable_parameters(resnet), torch.zeros(1, 3, 32, 32), options)
    lenet = prunelab.build_model("lenet5-caffe", seed=0)  # a plain chain passes
    spec.check_structure(lenet, masking.prunable_parameters(lenet), torch.zeros(1, 1, 28, 28), options)
    if method == "isparse":  # without propagation nothing crosses the residual addition
        spec.check_structure(resnet, masking.prunable_parameters(resnet), torch.zeros(1, 3, 32, 32),
                             {**options, "neuron_importance": "ones"})
