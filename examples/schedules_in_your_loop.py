"""Every pruning schedule of prunelab driven by one plain PyTorch training loop.

    python examples/schedules_in_your_loop.py           # 2 epochs per phase on 10k MNIST images
    python examples/schedules_in_your_loop.py --quick   # tiny budgets (what CI runs)

* iterative magnitude pruning with rewinding to the initial weights (lottery tickets, Frankle & Carbin 2019);
* gradual magnitude pruning with Zhu & Gupta's cubic schedule (2018);
* NNrelief's rounds (Dekhovich et al. 2024): each round the method decides how much to prune;
* iSparse's train-with (Garg & Candan 2020): masks recomputed every epoch while training from scratch.

The loop is the same for all of them: ``attach`` the optimizer, ``step()`` after each optimizer step,
``epoch_end()`` after each epoch.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunelab
from prunelab import schedules


def train(model, loader, schedule, epochs):
    """The loop: about 15 lines, any optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule.attach(optimizer)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        schedule.epoch_end()
        if schedule.done:
            break


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny budgets only")
    args = parser.parse_args()
    examples, epochs = (1000, 1) if args.quick else (10000, 2)
    train_set, _, test = prunelab.load_dataset("mnist", val_fraction=0.0)
    data = TensorDataset(train_set.inputs[:examples], train_set.targets[:examples])
    loader = DataLoader(data, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps = len(loader) * epochs

    def report(name, model):
        sparsity = prunelab.metrics.sparsity_summary(model)["sparsity"]
        error = prunelab.evaluate(model, (test.inputs, test.targets))["error"]
        print(f"{name:<28} sparsity {sparsity:.4f}   test error {error:.2%}")

    model = mlp()  # lottery ticket: 3 rounds to 90%, rewinding to the weights it was created with
    train(model, loader, schedules.Iterative(model, "magnitude", sparsity=0.9, rounds=3, rewind="init",
                                             epochs_per_round=epochs), epochs * 4)
    report("IMP with rewinding", model)

    model = mlp()  # cubic schedule from 0 to 90% over the first 3/4 of the steps, then fine-tuning
    train(model, loader, schedules.Gradual(model, "magnitude", sparsity=0.9, end=3 * steps // 4,
                                           every=max(steps // 8, 1)), epochs)
    report("gradual (Zhu & Gupta)", model)

    model = mlp()  # NNrelief: 2 rounds; the method decides how much each removes
    train(model, loader, schedules.Iterative(model, "relief", rounds=2, epochs_per_round=epochs, data=data,
                                             examples=500), epochs * 3)
    report("NNrelief rounds", model)

    model = mlp()  # iSparse train-with: masks recomputed at 50% after every epoch
    train(model, loader, schedules.Periodic(model, "isparse", sparsity=0.5, data=data, examples=500), epochs)
    report("iSparse train-with", model)


if __name__ == "__main__":
    main()
