"""Prune your own model at initialisation with SNIP, then train it with your own loop.

    python examples/snip_at_init.py            # a few hundred steps on MNIST
    python examples/snip_at_init.py --quick    # a few steps (what CI runs)

SNIP (Lee et al., ICLR 2019) scores every weight by |w * dL/dw| on one batch at initialisation and keeps
the top (1 - sparsity) of them; the masks then hold through any optimizer.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab


class SmallCNN(nn.Module):  # your model: any nn.Module with Linear / Conv layers
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args()
    steps = 20 if args.quick else 600

    train, _, test = prunelab.load_dataset("mnist", val_fraction=0.0)  # or any Dataset of your own
    loader = DataLoader(TensorDataset(train.inputs, train.targets), batch_size=100, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = SmallCNN()

    report = prunelab.prune(model, "snip", sparsity=0.95, data=loader, seed=0)  # before any training
    print(f"SNIP kept {report.kept:,} of {report.total:,} weights (sparsity {report.sparsity:.4f}, "
          f"{report.examples} examples scored)")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step, (x, y) in zip(range(steps), loader):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    error = prunelab.evaluate(model, DataLoader(TensorDataset(test.inputs, test.targets), batch_size=1000))
    still = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n in prunelab.masks(model))
    print(f"after {steps} steps: test error {error['error']:.2%}; {still:,} weights are zero "
          f"(pruned: {report.total - report.kept:,})")


if __name__ == "__main__":
    main()
