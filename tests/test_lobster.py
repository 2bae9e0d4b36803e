"""LOBSTER: the update rule on scalars, the threshold search's guarantee, pinning, plateaus, the lab run."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunelab
from prunelab import masking
from prunelab.criteria import lobster
from prunelab.schedules import Lobster
from prunelab.lab import run as lab_run
from prunelab.lab.config import RunConfig


def scalar_step(w0, g, lr, lam):
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=lr)
    lobster.Regulariser({"w": w}, lam).attach(opt)
    w.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    return w.item()


@pytest.mark.parametrize("w0,g", [(0.5, 0.3), (-2.0, -0.9), (0.5, 0.0)])
def test_update_rule_gate_open(w0, g):
    lr, lam = 0.1, 0.01
    after_sgd = w0 - lr * g
    assert scalar_step(w0, g, lr, lam) == pytest.approx(after_sgd - lam * after_sgd * (1 - abs(g)), abs=1e-15)


@pytest.mark.parametrize("w0,g", [(0.5, 1.0), (0.5, -1.7), (-3.0, 4.0)])
def test_update_rule_gate_closed_is_plain_sgd(w0, g):
    assert scalar_step(w0, g, 0.1, 0.01) == pytest.approx(w0 - 0.1 * g, abs=1e-15)


def tiny_problem(seed):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # a learnable rule, so pruning costs loss
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y).item()
    return model, loss


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), twt=st.sampled_from([0.0, 0.01, 0.05, 0.2, 1.0]))
def test_threshold_search_never_exceeds_the_bound(seed, twt):
    model, loss = tiny_problem(seed)
    params = lobster.covered_parameters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search = lobster.find_threshold(model, params, loss, twt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trials restored
    assert search.reference_loss == pytest.approx(loss())
    masking.attach(model, lobster.apply_threshold(params, search.threshold))
    assert loss() <= (1 + twt) * search.reference_loss + 1e-12
    assert search.loss == pytest.approx(loss())


def test_threshold_search_removes_something_when_tolerance_allows():
    model, loss = tiny_problem(0)
    params = lobster.covered_parameters(model)
    search = lobster.find_threshold(model, params, loss, twt=0.5)
    assert search.threshold > min(p.abs().min().item() for p in params.values())
    midpoint = lobster.find_threshold(model, params, loss, twt=0.5, reference_midpoint=True)
    assert midpoint.threshold >= search.threshold and math.isinf(midpoint.loss)


def counted_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_evaluate_stops_once_the_mean_loss_is_proven_above_a_value():
    model, _ = tiny_problem(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    data = (x, torch.randint(0, 3, (64,), generator=gen))
    calls = counted_forwards(model)
    full = prunelab.evaluate(model, data, batch_size=8)
    assert len(calls) == 8 and "stopped" not in full
    assert prunelab.evaluate(model, data, batch_size=8, stop_above=full["loss"] * 1.01) == full  # never proven
    calls.clear()
    early = prunelab.evaluate(model, data, batch_size=8, stop_above=full["loss"] / 4)
    assert early["stopped"] and early["error"] is None and len(calls) < 8
    assert full["loss"] / 4 < early["loss"] <= full["loss"]  # a lower bound of the mean, above the value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_early_exit_search_makes_the_same_decisions_for_fewer_forward_passes(seed):
    model, _ = tiny_problem(seed)
    gen = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(256, 5, generator=gen, dtype=torch.float64)
    data = (x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
    params = lobster.covered_parameters(model)
    calls = counted_forwards(model)
    loss_at = lambda stop_above=None: prunelab.evaluate(model, data, batch_size=16, stop_above=stop_above)["loss"]
    exact = lobster.find_threshold(model, params, loss_at, twt=0.05)
    exact_calls = len(calls)
    calls.clear()
    early = lobster.find_threshold(model, params, loss_at, twt=0.05, early_exit=True)
    assert early == exact  # threshold, reference loss, loss at it, bound and number of trials
    assert len(calls) < exact_calls


def test_pinned_parameters_stay_zero_through_momentum_training():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    schedule = Lobster(model, val_data=None, options={"lambda": 1e-2})
    masking.attach(model, lobster.apply_threshold(schedule.params, 0.2))  # a pruning phase's result
    pinned = {n: (p == 0).clone() for n, p in schedule.params.items()}
    assert "2.weight" in pinned and "1.bias" in pinned  # BN and biases are covered, as in the paper
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    schedule.attach(opt)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 8)), torch.randint(0, 4, (32,))).backward()
        opt.step()
        schedule.step()
    for name, zero in pinned.items():
        assert torch.count_nonzero(schedule.params[name][zero]) == 0, name


def test_plateau_detector():
    plateau = lobster.Plateau(patience=3, tolerance=0.01)
    outcomes = [plateau.update(x) for x in (1.0, 0.9, 0.95, 0.96, 0.97)]
    assert [o[0] for o in outcomes] == [True, True, False, False, False]
    assert [o[1] for o in outcomes] == [False, False, False, False, True]
    assert plateau.best == 0.9
    assert plateau.update(0.905) == (False, False)  # within 1% of the best is still good: counter resets


def test_unknown_option_is_refused():
    with pytest.raises(prunelab.PrunelabError, match="unknown option.*lobster"):
        Lobster(nn.Linear(2, 2), val_data=None, lamda=1e-4)


def lobster_config(tmp_path, data_root, name, **overrides):
    values = dict(model="lenet300-100", method="lobster", epochs=2, batch_size=1000, lr=0.1, momentum=0.0,
                  val_fraction=0.05,
                  method_options={"pwe": 1, "plateau_tolerance": -1.0, "lambda": 1e-3},
                  data_root=str(data_root), out=str(tmp_path / name), latency=False)
    return RunConfig(**{**values, **overrides})


def test_lab_run_logs_the_trajectory_and_resumes(tmp_path, data_root, monkeypatch):
    whole = lab_run.run(lobster_config(tmp_path, data_root, "whole", threads=1), echo=None)
    events = whole["prune_events"]
    # the thresholds this config gave before LOBSTER's schedule moved from the lab into prunelab.schedules
    # (commit 1801425, one thread, an AVX-512 machine): the same objects now, the same numbers, up to the
    # rounding of the CPU's kernels (an AMD EPYC without AVX-512 gives them within 1e-7, relative)
    assert [e["threshold"] for e in events] == pytest.approx([0.02162145131493709, 0.02770048267848324],
                                                             rel=1e-6)
    assert [e["epoch"] for e in events] == [1, 2]  # tolerance -1: every epoch is a plateau
    for event in events:
        assert event["val_loss_after"] <= event["loss_bound"] * (1 + 1e-6)
        assert {"threshold", "val_loss_before", "compression_ratio", "remaining_percent", "test_error"} <= set(event)
    assert events[-1]["compression_ratio"] >= events[0]["compression_ratio"] > 1.0
    assert whole["compression_ratio"] == pytest.approx(events[-1]["compression_ratio"])

    from prunelab.training import Trainer
    original, calls = Trainer.run_epoch, {"n": 0}

    def crash_on_second(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "run_epoch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        lab_run.run(lobster_config(tmp_path, data_root, "resumed", threads=1), echo=None)
    monkeypatch.setattr(Trainer, "run_epoch", original)
    resumed = lab_run.run(lobster_config(tmp_path, data_root, "resumed", threads=1), echo=None)
    assert [e["threshold"] for e in resumed["prune_events"]] == [e["threshold"] for e in events]
    assert resumed["error"] == whole["error"]


def test_cli_flags_and_refusals(tmp_path, data_root, capsys):
    from prunelab import cli
    code = cli.main(["run", "--model", "lenet300-100", "--method", "lobster", "--sparsity", "0.5",
                     "--out", str(tmp_path / "x")])
    assert code == 2 and "decides how much to prune itself" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_text(f'model = "lenet300-100"\nmethod = "lobster"\nlambda = 0.001\npwe = 1\nepochs = 1\n'
                      f'batch_size = 1000\nlatency = false\ndata_root = "{data_root}"\nout = "{tmp_path / "r"}"\n')
    assert cli.main(["run", str(config), "--twt", "0.1", "--quiet"]) == 0
    saved = json.loads((tmp_path / "r" / "result.json").read_text())
    assert saved["config"]["method_options"] == {"lambda": 0.001, "pwe": 1, "twt": 0.1}


def test_plot_trajectory_writes_png(tmp_path):
    from prunelab.lab.plots import plot_trajectory
    run = tmp_path / "run"
    run.mkdir()
    phases = [{"compression_ratio": c, "test_error": e} for c, e in ((2.0, 0.015), (8.0, 0.017), (40.0, 0.02))]
    (run / "state.json").write_text(json.dumps({"prune_events": phases}))
    out = plot_trajectory([run], tmp_path / "t.png", [{"label": "paper", "compression_ratio": 50.0,
                                                       "test_error": 0.0165}])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(data[16:20], "big") == 720  # 6 in x 120 dpi
    with pytest.raises(prunelab.PrunelabError, match="not a run folder"):
        plot_trajectory([tmp_path / "nothing"], tmp_path / "x.png")
