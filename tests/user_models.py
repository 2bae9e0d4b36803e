"""A user's model and data factories, outside the zoo: what ``model = "user_models:build"`` and
``dataset = "user_models:data"`` name in tests/test_factories.py (tests/ is on the path)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import families

N, FEATURES = 200, 8


class MLP(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 32, features: int = FEATURES):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)


def build(num_classes: int = 3, width: int = 32) -> nn.Module:
    return MLP(num_classes, width)


def build_mnist(num_classes: int = 10) -> nn.Module:
    return MLP(num_classes, 16, features=28 * 28)


def fixed() -> nn.Module:
    """No num_classes parameter: called without it."""
    return MLP(3, 16)


def data(seed: int = 0):
    """200 seeded examples of 8 features, 3 classes: (train, val, test) TensorDatasets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, FEATURES, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return (TensorDataset(x[:140], y[:140]), TensorDataset(x[140:170], y[140:170]),
            TensorDataset(x[170:], y[170:]))


def data_dict():
    """The dict form: no validation split, the class count given."""
    train, _, test = data(1)
    return {"train": train, "val": None, "test": test, "num_classes": 3}


def conv1d() -> nn.Module:
    return families.Conv1dNet()


def mobilenet() -> nn.Module:
    return families.MobileNetLike()


not_callable = 5


def not_a_module(num_classes: int = 3):
    return [num_classes]


def two_splits():
    return data()[:2]
