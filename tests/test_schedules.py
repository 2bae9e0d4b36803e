"""Schedules driven by a hand-written training loop: gradual (cubic), iterative with rewinding, NNrelief
rounds, LOBSTER, iSparse train-with; and the targets a schedule may ask for."""

import math

import pytest
import torch
from torch import nn

import prunelab
from prunelab import PrunelabError, schedules

gen = torch.Generator().manual_seed(0)
X = torch.randn(200, 20, generator=gen)
Y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()  # 3 classes a small MLP can learn


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def loop(model, schedule, epochs, lr=0.05, val=False):
    """The ~15-line loop a user writes; 10 steps of 20 examples per epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule.attach(optimizer)
    for _ in range(epochs):
        for i in range(0, 200, 20):
            loss = nn.functional.cross_entropy(model(X[i:i + 20]), Y[i:i + 20])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        val_loss = prunelab.evaluate(model, (X, Y))["loss"] if val else None
        schedule.epoch_end(val_loss)
        if schedule.done:
            break
    return optimizer


def test_cubic_sparsity_is_zhu_and_gupta_eq_1():
    s = [schedules.cubic_sparsity(t, final=0.9, start=10, end=110) for t in (0, 10, 35, 60, 85, 110, 200)]
    expected = [0.0, 0.0, 0.9 * (1 - 0.75 ** 3), 0.9 * (1 - 0.5 ** 3), 0.9 * (1 - 0.25 ** 3), 0.9, 0.9]
    assert s == pytest.approx(expected)


def test_gradual_prunes_every_few_steps_to_the_final_sparsity_and_never_revives():
    model = mlp()
    schedule = schedules.Gradual(model, "magnitude", sparsity=0.8, start=5, end=45, every=10)
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule.attach(optimizer)
    for step in range(60):
        i = (step * 20) % 200
        loss = nn.functional.cross_entropy(model(X[i:i + 20]), Y[i:i + 20])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        seen.append(prunelab.masks(model))
    steps = [e["step"] for e in schedule.events]
    assert steps == [15, 25, 35, 45]  # step 5 is the start, where s_t = 0
    for event in schedule.events:
        target = schedules.cubic_sparsity(event["step"], final=0.8, start=5, end=45)
        assert event["sparsity"] == pytest.approx(target, abs=1e-3)
    assert schedule.events[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    for before, after in zip(seen[14:], seen[15:]):
        assert all(not (after[n] & ~before[n]).any() for n in before)
    assert all((p[~prunelab.masks(model)[n]] == 0).all() for n, p in model.named_parameters()
               if n in prunelab.masks(model))


def test_iterative_rewinds_to_the_initial_weights_under_the_masks():
    model = mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = schedules.Iterative(model, "magnitude", sparsity=0.875, rounds=3, rewind="init", epochs_per_round=2)
    optimizer = loop(model, schedule, epochs=20)
    assert schedule.done and schedule.epochs == 8  # 3 rounds of 2 epochs + 2 epochs after the last
    sparsities = [e["sparsity"] for e in schedule.events]
    assert sparsities == pytest.approx([0.5, 0.75, 0.875], abs=2e-3)  # each round keeps half of the survivors
    assert all(e["rewound"] == "init" for e in schedule.events)
    # right after the last rewind the survivors were the initial weights; a fresh rewind shows it exactly
    schedules.rewind(model, initial, optimizer)
    masks = prunelab.masks(model)
    for name, mask in masks.items():
        assert torch.equal(model.get_parameter(name), initial[name] * mask)
    assert not optimizer.state


def test_iterative_late_rewinding_snapshots_at_the_step():
    model = mlp()
    schedule = schedules.Iterative(model, "magnitude", sparsity=0.5, rewind="early", rewind_step=3,
                                   epochs_per_round=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule.attach(optimizer)
    for step in range(3):
        nn.functional.cross_entropy(model(X[:20]), Y[:20]).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(schedule.rewind_point[k], v) for k, v in snapshot.items())
    with pytest.raises(PrunelabError, match="rewind_step"):
        schedules.Iterative(model, "magnitude", sparsity=0.5, rewind="early")


def test_relief_rounds_choose_their_own_amount():
    model = mlp()
    schedule = schedules.Iterative(model, "relief", rounds=2, epochs_per_round=2, data=(X, Y), examples=100)
    loop(model, schedule, epochs=6)
    first, second = (e["sparsity"] for e in schedule.events)
    assert 0 < first < second < 1 and all(e["target"] is None for e in schedule.events)
    with pytest.raises(PrunelabError, match="'relief' decides how much to prune itself"):
        schedules.Iterative(mlp(), "relief", sparsity=0.5, data=(X, Y))


def test_lobster_in_a_plain_loop_prunes_on_plateaus():
    model = mlp()
    pruner = schedules.for_method(model, "lobster", val_data=(X, Y), pwe=1, plateau_tolerance=-0.5,
                                  **{"lambda": 1e-3})
    assert isinstance(pruner, schedules.Lobster)
    loop(model, pruner, epochs=4, val=True)
    assert pruner.events and all(e["threshold"] > 0 for e in pruner.events)
    zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
    assert zeros > 0 and pruner.events[-1]["compression_ratio"] > 1
    masks = prunelab.masks(model)
    assert all((model.get_parameter(n)[~m] == 0).all() for n, m in masks.items())


def test_isparse_train_with_in_a_plain_loop():
    model = mlp()
    schedule = schedules.for_method(model, "isparse", sparsity=0.5, data=(X, Y), interval=2)
    assert isinstance(schedule, schedules.Periodic)
    loop(model, schedule, epochs=4)
    assert [e["epoch"] for e in schedule.events] == [2, 4]
    assert schedule.events[-1]["sparsity"] == pytest.approx(0.5, abs=1e-2) and schedule.events[-1]["changed"] == 0


def test_targets_are_typed_and_never_go_backwards():
    model = mlp()
    prunelab.prune(model, "magnitude", sparsity=0.5)
    with pytest.raises(PrunelabError, match="target sparsity 0.3 is below the current sparsity 0.5"):
        prunelab.prune(model, "magnitude", sparsity=0.3)
    assert prunelab.prune(model, "magnitude", sparsity=0.5).sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(PrunelabError, match="give one target"):
        prunelab.prune(model, "magnitude", sparsity=0.5, channels=0.5)
    with pytest.raises(PrunelabError, match="'magnitude' cannot aim at channels"):
        prunelab.prune(model, "magnitude", channels=0.5)
    with pytest.raises(PrunelabError, match="'magnitude' needs a target"):
        prunelab.prune(model, "magnitude")
    with pytest.raises(PrunelabError, match=r"channels must be in \[0, 1\)"):
        prunelab.prune(mlp(), "pfec", channels=1.5, data=(X, Y))
    with pytest.raises(PrunelabError, match="prunes while training: use prunelab.schedules.for_method"):
        prunelab.prune(model, "lobster")


def test_report_says_what_was_eligible_and_achieved():
    model = mlp()
    report = prunelab.prune(model, "magnitude", sparsity=0.5)
    weights = 20 * 32 + 32 * 16 + 16 * 3
    everything = sum(p.numel() for p in model.parameters())
    assert report.target == {"sparsity": 0.5} and report.total == weights
    assert report.eligible == pytest.approx(weights / everything)
    assert report.sparsity_all == pytest.approx(report.kept and (weights - report.kept) / everything)
    assert report.examples == 0 and not math.isnan(report.channels_removed)
    pfp = prunelab.prune(mlp(), "pfp", parameters=0.5, data=(X, Y))
    assert pfp.target == {"parameters": 0.5} and pfp.sparsity_all == pytest.approx(0.5, abs=0.05)
    rounds = schedules.Iterative(mlp(), "pfp", parameters=0.5, rounds=2, data=(X, Y))  # the lab's --parameters
    events = [rounds.prune_round() for _ in range(2)]
    assert [e["target"] for e in events] == [{"parameters": t} for t in rounds.targets]
    assert events[-1]["sparsity_all"] == pytest.approx(0.5, abs=0.05)
