"""Prune a trained model of your own with PFP, fine-tune it in your loop, then remove the pruned channels
physically and check the smaller model computes the same function.

    python examples/pfp_then_compact.py            # 3 epochs, prune 80%, 1 epoch of fine-tuning
    python examples/pfp_then_compact.py --quick    # a few steps (what CI runs)

PFP (Liebenwein et al., ICLR 2020) samples channels by their empirical sensitivity on data: each layer
gets a budget from one error level for the whole network, so layers that matter more keep more channels.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab import structure


class Net(nn.Module):  # your model
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 5), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def fit(model, loader, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _, (x, y) in zip(range(steps), loader):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args()
    train, _, test = prunelab.load_dataset("mnist", val_fraction=0.0)
    data = TensorDataset(train.inputs, train.targets)
    loader = DataLoader(data, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    test_loader = DataLoader(TensorDataset(test.inputs, test.targets), batch_size=1000)
    steps = 30 if args.quick else 3 * len(loader)

    torch.manual_seed(0)
    model = Net()
    fit(model, loader, steps)
    print(f"dense: test error {prunelab.evaluate(model, test_loader)['error']:.2%}")

    report = prunelab.prune(model, "pfp", sparsity=0.8, data=data, seed=0)   # 80% of the prunable weights
    print(f"PFP: sparsity {report.sparsity:.4f}, {report.channels_removed:.1%} of the channels removed, "
          f"{report.examples} examples drawn")
    fit(model, loader, steps // 3)  # fine-tune: masks hold through the optimizer
    print(f"pruned and fine-tuned: test error {prunelab.evaluate(model, test_loader)['error']:.2%}")

    example = test.inputs[:64]
    small, check = structure.compact(model.eval(), example)  # raises if the outputs differ
    costs = structure.structured_metrics(model, small, example, latency=not args.quick)
    print(f"compact model: {costs['params']['small']:,} of {costs['params']['dense']:,} parameters, "
          f"outputs equal to the masked model within {check.max_abs_diff:.1e}, "
          f"FLOPs removed {costs['fr']:.1%}")
    if not args.quick:
        latency = costs["latency_ms"]
        print(f"latency at batch 64: {latency['dense']:.2f} ms -> {latency['small']:.2f} ms")


if __name__ == "__main__":
    main()
