"""Metrics (counts, FLOPs dense and effective, layer table) and training pieces (schedules, evaluation)."""

import math

import pytest
import torch
from torch import nn

import prunelab
from prunelab import metrics
from prunelab.data import ArrayDataset
from prunelab.training import TrainConfig, Trainer, derive_seed, evaluate, lr_at


def test_counts_and_compression():
    model = prunelab.build_model("lenet300-100", seed=0)
    prunelab.prune(model, "magnitude", sparsity=0.9)
    summary = metrics.sparsity_summary(model)
    assert summary["params"]["total"] == 266610
    assert summary["params"]["prunable"] == 266200 and summary["params"]["prunable_kept"] == 26620
    assert summary["params"]["nonzero"] == 26620 + 410  # kept weights + the (non-zero) default-init biases
    assert summary["sparsity"] == pytest.approx(0.9, abs=1e-12)
    assert summary["compression_ratio"] == pytest.approx(266610 / summary["params"]["nonzero"])


def test_flops_dense_and_effective_linear_and_conv():
    model = prunelab.build_model("lenet5-caffe", seed=0)
    flops, per_module = metrics.flop_summary(model, torch.zeros(1, 1, 28, 28))
    conv1 = 2 * 20 * 24 * 24 * 25
    conv2 = 2 * 50 * 8 * 8 * 20 * 25
    assert per_module["conv1"] == conv1 and per_module["conv2"] == conv2
    assert flops["dense"] == conv1 + conv2 + 2 * 800 * 500 + 2 * 500 * 10
    prunelab.prune(model, "random", sparsity=0.5, scope="layer", seed=0)
    flops, _ = metrics.flop_summary(model, torch.zeros(1, 1, 28, 28))
    assert flops["effective"] == pytest.approx(flops["dense"] / 2, rel=1e-4)


def test_recurrent_flops_closed_form():
    model = prunelab.build_model("lstm", hidden=128)
    total, per_module = metrics.module_flops(model, torch.zeros(1, 1, 28, 28))
    assert per_module["rnn"] == 2 * 28 * 4 * 128 * (28 + 128)
    assert total == per_module["rnn"] + 2 * 128 * 10


def test_layer_table_rows():
    model = prunelab.build_model("lenet300-100", seed=0)
    prunelab.prune(model, "random", sparsity=0.75, scope="layer", seed=0)
    rows = metrics.layer_table(model)
    assert [r["name"] for r in rows] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert rows[0]["shape"] == [300, 784] and rows[0]["params"] == 235200
    assert rows[0]["nonzero"] == 58800 and rows[0]["sparsity"] == pytest.approx(0.75)


def test_latency_is_measured():
    model = prunelab.build_model("lenet300-100")
    ms = metrics.latency_ms(model, torch.zeros(1, 1, 28, 28), min_run_time=0.05)
    assert 0 < ms < 100


def test_lr_schedules():
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="multistep", milestones=[3, 6], gamma=0.1)
    assert [round(lr_at(cfg, e * 5, 5), 6) for e in (0, 2, 3, 5, 6, 9)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cfg = TrainConfig(epochs=None, iterations=100, lr=0.1, lr_schedule="step", step_size=25, gamma=0.1)
    assert [round(lr_at(cfg, s, 7), 8) for s in (0, 24, 25, 50, 99)] == [0.1, 0.1, 0.01, 0.001, 0.0001]
    cfg = TrainConfig(epochs=4, lr=2.0, lr_schedule="cosine", warmup=1)
    assert lr_at(cfg, 0, 10) == pytest.approx(0.2) and lr_at(cfg, 9, 10) == pytest.approx(2.0)
    assert lr_at(cfg, 20, 10) == pytest.approx(1.0)  # half way through the budget
    with pytest.raises(prunelab.PrunelabError, match="step_size"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(prunelab.PrunelabError, match="unknown lr_schedule 'linear'"):
        TrainConfig(lr_schedule="linear")


def toy_data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=gen)
    y = (x.flatten(1).sum(1) > 0).long()
    return ArrayDataset(x, y, ("neg", "pos"))


def test_evaluate_top1_top5():
    class Fixed(nn.Module):
        def forward(self, x):  # class 0 ranked first, class 9 last
            return torch.arange(10.0, 0.0, -1.0).repeat(len(x), 1)
    data = ArrayDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 1, 9]), tuple("0123456789"))
    result = evaluate(Fixed(), data, batch_size=3)
    assert result["error"] == 0.75 and result["top5_error"] == 0.25


def test_training_is_deterministic_and_budget_exact():
    def train(seed):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
        trainer = Trainer(model, toy_data(), TrainConfig(epochs=None, iterations=13, batch_size=10, lr=0.1),
                          seed=seed, progress=False)
        stats = [trainer.run_epoch(e) for e in range(trainer.epochs)]
        return model, stats
    (a, sa), (b, _), (c, _) = train(0), train(0), train(1)
    assert [s["steps"] for s in sa] == [7, 13]  # 64 examples / 10 = 7 steps per epoch; budget 13
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[1].weight, c[1].weight)


def test_channels_last_trains_the_same_network_in_the_other_layout():
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen), ["a", "b"])
    mask, seen = torch.rand(4, 3, 3, 3, generator=gen) > 0.5, []

    def train(channels_last):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        prunelab.masking.attach(model, {"0.weight": mask})
        model[0].register_forward_pre_hook(
            lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        config = TrainConfig(epochs=2, batch_size=8, lr=0.1, channels_last=channels_last)
        Trainer(model, data, config, seed=0, progress=False).run_epoch(0)
        return model
    nchw, nhwc = train(False), train(True)
    assert not any(seen[:4]) and all(seen[4:])  # the second run's batches reached the conv as NHWC
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(nchw[0].weight, nhwc[0].weight, atol=1e-5)
    assert torch.equal(nhwc[0].weight == 0, nchw[0].weight == 0)  # the masks hold in either layout


def test_device_auto_is_the_gpu_when_torch_sees_one():
    from prunelab.lab.config import defaults, make_config
    from prunelab.lab.run import resolve
    auto = resolve(make_config({**defaults(), "model": "lenet300-100", "device": "auto"}))
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    explicit = resolve(make_config({**defaults(), "model": "lenet300-100", "device": auto.device}))
    assert auto.digest() == explicit.digest()


def test_divergence_is_reported():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias.fill_(float("inf"))  # what an exploding learning rate leaves behind
    trainer = Trainer(model, toy_data(), TrainConfig(epochs=1, batch_size=8, lr=0.1), seed=0, progress=False)
    with pytest.raises(prunelab.TrainingDiverged, match="diverged"):
        trainer.run_epoch(0)
    assert issubclass(prunelab.TrainingDiverged, prunelab.PrunelabError)  # the CLI's one-line report


def test_derive_seed_is_stable():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert 0 <= derive_seed("x") < 2**63 and isinstance(derive_seed(1), int) and not math.isnan(derive_seed(1))
