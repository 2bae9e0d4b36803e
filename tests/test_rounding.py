"""PFP's round_to="auto" (ours): the backend probe's decision rule and the rounding it drives.

Nothing here is timed: the probe's measurement is replaced by an injected result."""

import pytest
import torch

import prunelab
from prunelab import PrunelabError, backend_probe, masking, metrics
from prunelab.criteria import pfp


@pytest.fixture(autouse=True)
def _clean_probe(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv(backend_probe.ENV, raising=False)
    monkeypatch.setattr(backend_probe, "_OVERRIDE", None)
    monkeypatch.setattr(backend_probe, "_CACHE", {})


def _staircase(step, channels, base=1.0):
    return [base * -(-c // step) for c in channels]  # blocks of `step` channels, each costs the same


@pytest.mark.parametrize("step", [4, 8, 16])
def test_the_probe_rule_finds_the_step_of_a_staircase(step):
    channels = list(range(5, 33))
    times = [t * (1 + 0.02 * (c % 3)) for c, t in zip(channels, _staircase(step, channels))]  # some noise
    assert backend_probe.choose_multiple(channels, times)[0] == step


def test_the_probe_rule_gives_1_without_a_step():
    channels = list(range(5, 33))
    assert backend_probe.choose_multiple(channels, [float(c) for c in channels])[0] == 1  # linear
    assert backend_probe.choose_multiple(channels, [0.5 + c for c in channels])[0] == 1  # plus overhead
    # a staircase of 16 on top of a linear part (a fifth of the time at 32 channels): still a step of 16
    mixed = [s + 0.015 * c for c, s in zip(channels, _staircase(16, channels))]
    assert backend_probe.choose_multiple(channels, mixed)[0] == 16


def _resnet20_and_data(n=16):
    model = prunelab.build_model("resnet20", seed=0)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return model, data


def _compact_flops(model, masks, example):
    pruned = masking.copy_model(model)
    masking.attach(pruned, masks)
    small, _ = prunelab.compact(pruned, example)
    return metrics.module_flops(small, example[:1])[0]


def test_auto_rounds_to_the_probed_multiple_and_still_meets_a_flop_target(monkeypatch):
    asked = []

    def injected(kind="conv2d", **shape):
        asked.append((kind, shape))
        return 8

    monkeypatch.setattr(backend_probe, "channel_multiple", injected)
    model, data = _resnet20_and_data()
    params = masking.prunable_parameters(model)
    example = data[0][:4]
    dense_flops = metrics.module_flops(model, example[:1])[0]
    plan = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16,
                    round_to="auto")
    # the heaviest conv shape of ResNet-20: 3x3 kernels, the first stage's 32x32 maps and 16 channels
    assert asked == [("conv2d", {"width": 16, "size": 32, "kernel": 3})]
    assert plan.round_to == 8
    # aim at 40% fewer FLOPs of the compact model by bisection on the ratio, from the same sensitivities
    low, high, best = 0.3, 0.95, None
    for _ in range(10):
        ratio = (low + high) / 2
        at = plan.at(ratio)
        fr = 1 - _compact_flops(model, at.masks, example) / dense_flops
        if best is None or abs(fr - 0.4) < abs(best[1] - 0.4):
            best = (at, fr, ratio)
        if abs(fr - 0.4) < 0.02:
            break
        low, high = (ratio, high) if fr < 0.4 else (low, ratio)
    at, fr, ratio = best
    assert abs(fr - 0.4) < 0.02, fr
    assert abs(at.kept - at.target) <= 8 * 64 * 9  # one step of the coarsest layer: 8 channels of 64 3x3 rows
    for layer in at.layers:
        if layer["alive"] >= 8:  # narrower layers (the 3 input channels) are left alone
            assert layer["kept"] % 8 == 0, layer
    assert any(layer["kept"] < layer["alive"] for layer in at.layers)
    # deterministic given the probe result: the same masks as the integer option
    fixed = pfp.plan(model, params, data, ratio, generator=torch.Generator().manual_seed(0), points=16,
                     round_to=8)
    assert all(torch.equal(fixed.masks[k], at.masks[k]) for k in at.masks)
    # at(..., round_to=1) is the paper again: budgets no longer all multiples of 8
    paper = plan.at(0.6, round_to=1)
    assert paper.round_to == 1 and any(l["kept"] % 8 for l in paper.layers if l["alive"] >= 8)


def test_a_layer_one_multiple_wide_is_kept_whole():
    model, data = _resnet20_and_data()
    params = masking.prunable_parameters(model)
    plan = pfp.plan(model, params, data, 0.3, generator=torch.Generator().manual_seed(0), points=16,
                    round_to=16)
    kept = {layer["name"]: layer["kept"] for layer in plan.layers}
    assert all(kept[f"layer1.{b}.conv{i}"] == 16 for b in range(3) for i in (1, 2)), kept
    assert all(k % 16 == 0 for n, k in kept.items() if n != "conv1"), kept


def test_override_and_environment_skip_the_probe(monkeypatch):
    def no_timing(*_args, **_kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr(backend_probe, "probe", no_timing)
    monkeypatch.setenv(backend_probe.ENV, "4")
    assert backend_probe.channel_multiple("conv2d", width=16, size=32, kernel=3) == 4
    backend_probe.set_channel_multiple(8)  # the override wins over the environment
    assert backend_probe.channel_multiple() == 8
    backend_probe.set_channel_multiple(None)
    assert backend_probe.channel_multiple() == 4


@pytest.mark.parametrize("value, message", [
    ("fast", "option round_to must be a positive integer or 'auto', got 'fast'"),
    (0, "option round_to must be a positive integer, got 0"),
    (2.5, "option round_to must be int or str, got 2.5"),
])
def test_a_bad_round_to_is_one_clear_line(value, message):
    model, data = _resnet20_and_data(4)
    with pytest.raises(PrunelabError, match=message) as caught:
        prunelab.prune(model, "pfp", 0.5, data=data, round_to=value)
    assert "\n" not in str(caught.value)
    assert not masking.is_masked(model)


def test_a_bad_override_is_one_clear_line(monkeypatch):
    with pytest.raises(PrunelabError, match="channel multiple must be a positive integer, got 0"):
        backend_probe.set_channel_multiple(0)
    monkeypatch.setenv(backend_probe.ENV, "sixteen")
    with pytest.raises(PrunelabError, match="PRUNELAB_CHANNEL_MULTIPLE must be a positive integer"):
        backend_probe.channel_multiple()


def test_the_cli_flag_takes_auto_and_refuses_other_words(tmp_path, capsys):
    from prunelab import cli

    out = tmp_path / "run"
    code = cli.main(["run", "--model", "lenet300-100", "--method", "pfp", "--sparsity", "0.5",
                     "--round-to", "fast", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "option round_to must be a positive integer or 'auto', got 'fast'" in err[0]
    assert not out.exists()
    assert pfp.PfpOptions.parse("pfp", {"round_to": "auto"}).round_to == "auto"


def _fake_latency(slow_size):
    def latency(module, input_shape, **_):
        return 10.0 if len(input_shape) == 3 and input_shape[-1] == slow_size else 1.0
    return latency


def test_latency_allocation_cuts_the_slow_layers_and_still_meets_the_target(monkeypatch):
    monkeypatch.setattr(backend_probe, "layer_latency", _fake_latency(32))  # "the first stage is slow"
    model, data = _resnet20_and_data()
    params = masking.prunable_parameters(model)
    paper = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16)
    fast = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16,
                    allocation="latency")
    assert paper.allocation == "paper" and fast.allocation == "latency"
    slow = [l["name"] for l in fast.layers if l["name"].startswith("layer1.")]
    kept = lambda plan: sum(l["kept"] for l in plan.layers if l["name"] in slow)  # noqa: E731
    assert kept(fast) < kept(paper)
    assert all(l["eps_factor"] > 1 for l in fast.layers if l["name"] in slow)
    for plan in (fast, paper):  # eps moves many layers' counts at once: within 1% of the weights
        assert abs(plan.kept - plan.target) <= 0.01 * plan.total, (plan.kept, plan.target)
    # re-allocation from the same sensitivities gives the same plan, and switches back to the paper's
    again = paper.at(0.5, allocation="latency")
    assert all(torch.equal(again.masks[k], fast.masks[k]) for k in fast.masks)
    back = fast.at(0.5, allocation="paper")
    assert all(torch.equal(back.masks[k], paper.masks[k]) for k in paper.masks)


def test_equal_latencies_give_the_paper_plan(monkeypatch):
    monkeypatch.setattr(backend_probe, "layer_latency", lambda module, shape, **_: 2.0)
    model, data = _resnet20_and_data()
    params = masking.prunable_parameters(model)
    paper = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16)
    even = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16,
                    allocation="latency")
    # per input unit the layers still differ (16, 32, 64 wide), so compare against the units' widths
    factors = {l["name"]: l["eps_factor"] for l in even.layers}
    assert factors["layer1.0.conv2"] > factors["layer3.0.conv2"]
    monkeypatch.setattr(backend_probe, "layer_latency",
                        lambda module, shape, **_: 2.0 * (module.in_channels if hasattr(module, "in_channels")
                                                          else module.in_features))
    same = pfp.plan(model, params, data, 0.5, generator=torch.Generator().manual_seed(0), points=16,
                    allocation="latency")
    assert all(abs(l["eps_factor"] - 1) < 1e-9 for l in same.layers)
    assert all(torch.equal(same.masks[k], paper.masks[k]) for k in paper.masks)


def test_a_bad_allocation_is_one_clear_line():
    model, data = _resnet20_and_data(4)
    with pytest.raises(PrunelabError, match="option allocation must be one of: paper, latency; got 'flops'"):
        prunelab.prune(model, "pfp", 0.5, data=data, allocation="flops")
