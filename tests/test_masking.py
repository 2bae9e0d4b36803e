"""Masks: exact counts, no revival through any optimizer, state-dict names, copies, permanence."""

import copy

import pytest
import torch
from torch import nn

import prunelab
from prunelab import masking


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def half_masks(model):
    return {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) > 0.5
            for i, (name, p) in enumerate(masking.prunable_parameters(model).items())}


def train_steps(model, optimizer, steps=20):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_pruned_zero(model, expected):
    for name, mask in expected.items():
        weight = model.get_parameter(name)
        assert torch.count_nonzero(weight[~mask]) == 0, name
        assert torch.count_nonzero(weight[mask]) == int(mask.sum()), name


def test_prunable_parameters_default_and_widened():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    assert list(masking.prunable_parameters(model)) == ["0.weight", "3.weight"]
    assert list(masking.prunable_parameters(model, include_bias=True)) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert "1.weight" in masking.prunable_parameters(model, include_norm=True)
    lstm = nn.LSTM(4, 5)
    assert list(masking.prunable_parameters(lstm)) == ["weight_ih_l0", "weight_hh_l0"]


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-2),
    lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-1),
], ids=["sgd-momentum-wd", "nesterov", "adam", "adamw"])
def test_no_revival_through_optimizer(make_optimizer):
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    optimizer = make_optimizer(model.parameters())
    train_steps(model, optimizer)
    assert_pruned_zero(model, wanted)
    for name, mask in wanted.items():
        for value in optimizer.state[model.get_parameter(name)].values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert torch.count_nonzero(value[~mask]) == 0


def test_stale_momentum_from_before_pruning_cannot_revive():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, optimizer, 5)  # momentum buffers now non-zero everywhere
    wanted = half_masks(model)
    masking.attach(model, wanted)  # optimizer not passed: the step hook must still catch it
    train_steps(model, optimizer, 5)
    assert_pruned_zero(model, wanted)
    buffer = optimizer.state[model.get_parameter("0.weight")]["momentum_buffer"]
    assert torch.count_nonzero(buffer[~wanted["0.weight"]]) == 0


def test_forward_sees_masked_weights_after_outside_edit():
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # e.g. a state dict loaded over it
    model(torch.randn(2, 6))
    assert_pruned_zero(model, {"0.weight": wanted["0.weight"]})


def test_masks_keyed_by_unpruned_names_and_state_dict_unchanged():
    model = mlp()
    keys = list(model.state_dict())
    masking.attach(model, half_masks(model))
    assert list(prunelab.masks(model)) == ["0.weight", "2.weight"]
    assert all(m.dtype == torch.bool for m in prunelab.masks(model).values())
    assert list(model.state_dict()) == keys
    fresh = mlp()
    fresh.load_state_dict(model.state_dict())  # loads into an unpruned model


def test_masks_hold_through_gradient_accumulation_and_clipping():
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    for _ in range(2):  # two backward passes accumulate into .grad
        model(torch.randn(4, 6)).sum().backward()
    for name, mask in wanted.items():
        assert torch.count_nonzero(model.get_parameter(name).grad[~mask]) == 0


def test_attach_rejects_bad_masks():
    model = mlp()
    with pytest.raises(prunelab.PrunelabError, match="unknown parameter 'nope.weight'"):
        masking.attach(model, {"nope.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(prunelab.PrunelabError, match="shape"):
        masking.attach(model, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_copy_model_has_independent_working_masks():
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    clone = masking.copy_model(model)
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    train_steps(clone, optimizer)
    assert_pruned_zero(clone, wanted)
    assert clone[0].weight_mask is not model[0].weight_mask


def test_make_permanent_and_remove():
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    masking.make_permanent(model)
    assert prunelab.masks(model) == {}
    assert not any(m._forward_pre_hooks for m in model.modules()) and not hasattr(model[0], "weight_mask")
    assert_pruned_zero(model, wanted)
    # without masks, training regrows the zeros: the masks really were what held them
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert torch.count_nonzero(model[0].weight) == model[0].weight.numel()


def test_remove_some_then_attach_again_keeps_hooks_working():
    model = mlp()
    wanted = half_masks(model)
    masking.attach(model, wanted)
    masking.remove(model, ["0.weight"])
    assert list(prunelab.masks(model)) == ["2.weight"]
    masking.attach(model, {"0.weight": wanted["0.weight"]})
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert_pruned_zero(model, wanted)


def test_lstm_masks_hold_through_training():
    torch.manual_seed(0)
    model = nn.LSTM(4, 6, batch_first=True)
    wanted = {n: torch.rand(p.shape) > 0.7 for n, p in masking.prunable_parameters(model).items()}
    masking.attach(model, wanted)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        out, _ = model(torch.randn(3, 5, 4))
        optimizer.zero_grad()
        out.sum().backward()
        optimizer.step()
    assert_pruned_zero(model, wanted)


def test_masks_follow_device_moves():
    model = mlp()
    masking.attach(model, half_masks(model))
    model.to(torch.float64)
    wanted = prunelab.masks(model)
    assert model[0].weight_mask.dtype == torch.bool  # a dtype change leaves the bool mask alone
    assert all(m.dtype == torch.bool for m in wanted.values())
    train_steps(model.float(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert_pruned_zero(model, wanted)


def test_mask_memory_is_a_byte_per_weight():
    """Masks are bool buffers: at most 0.3x of the parameters' memory (float32 weights: 0.25x)."""
    model = prunelab.build_model("lenet300-100", seed=0)
    prunelab.prune(model, "magnitude", 0.95)
    buffers = [b for n, b in model.named_buffers() if n.endswith(masking.MASK_SUFFIX)]
    mask_bytes = sum(b.numel() * b.element_size() for b in buffers)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert buffers and all(b.dtype == torch.bool for b in buffers)
    assert mask_bytes <= 0.3 * param_bytes
