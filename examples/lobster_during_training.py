"""LOBSTER in your own training loop: the regulariser after every optimizer step, threshold pruning on
validation plateaus.

    python examples/lobster_during_training.py           # 30 epochs on 10k MNIST images
    python examples/lobster_during_training.py --quick   # 3 short epochs (what CI runs)

LOBSTER (Tartaglione et al. 2020, eq. 6-7) shrinks every parameter by lambda * w * max(0, 1 - |dL/dw|):
parameters the loss is insensitive to decay towards zero. When the validation loss stops improving for
PWE epochs, the largest magnitude threshold that keeps the validation loss within (1 + TWT) prunes them.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab.schedules import Lobster


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few short epochs only")
    args = parser.parse_args()
    epochs, examples = (3, 2000) if args.quick else (30, 10000)

    train, val, test = prunelab.load_dataset("mnist", val_fraction=0.1, seed=0)
    loader = DataLoader(TensorDataset(train.inputs[:examples], train.targets[:examples]), batch_size=100,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    val_loader = DataLoader(TensorDataset(val.inputs, val.targets), batch_size=1000)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # quick: an epoch counts as a plateau unless the loss halves, so that the short run prunes at all
    quick = {"pwe": 1, "plateau_tolerance": -0.5} if args.quick else {"pwe": 5}
    pruner = Lobster(model, val_data=val_loader, twt=0.05, **{"lambda": 1e-4}, **quick)
    pruner.attach(optimizer)
    for epoch in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step()                     # the regulariser, with this step's gradients
        event = pruner.epoch_end()            # validation loss measured on val_data
        if event is not None:
            print(f"epoch {epoch + 1}: {pruner.describe(event)}")
        if pruner.done:
            break

    summary = prunelab.metrics.sparsity_summary(model)
    error = prunelab.evaluate(model, (test.inputs, test.targets))["error"]
    print(f"LOBSTER: {len(pruner.events)} pruning phases, compression {summary['compression_ratio']:.2f}x, "
          f"test error {error:.2%}")


if __name__ == "__main__":
    main()
