"""Add a pruning method of your own in one file, then prune a small MLP with it.

    python examples/custom_method.py

The method, "gradient-magnitude", keeps the weights with the largest |dL/dw| summed over a few batches
drawn from the data. See docs/adding-a-method.md.
"""

from dataclasses import dataclass

import torch
from torch import nn

import prunelab
from prunelab.methods import Method, register
from prunelab.options import Options, option


@dataclass(frozen=True)
class GradientOptions(Options):
    batches: int = option(2, "batches of 64 examples to sum |dL/dw| over", low=1)


def gradient_scores(model, params, *, data, generator, batches=GradientOptions.batches, **_):
    """|dL/dw| summed over ``batches`` batches drawn with the seed; a higher score is kept."""
    drawn = data.draw(64 * batches, generator)       # without replacement; all examples if fewer
    scores = {name: torch.zeros(p.shape) for name, p in params.items()}
    for inputs, targets in zip(drawn.inputs.split(64), drawn.targets.split(64)):
        loss = data.loss(model, inputs, targets)     # the feed's loss: cross-entropy by default
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, grad in zip(params, grads):
            scores[name] += grad.detach().abs().cpu()
    return scores


register(Method(
    "gradient-magnitude", "largest |dL/dw| on a few drawn batches (an example method)", gradient_scores,
    scope="global", when="init", needs_data=True, options=GradientOptions))


def main():
    torch.manual_seed(0)
    inputs, targets = torch.randn(512, 20), torch.randint(0, 4, (512,))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))

    report = prunelab.prune(model, "gradient-magnitude", sparsity=0.8, data=(inputs, targets), batches=3)
    print(f"sparsity {report.sparsity:.3f}: kept {report.kept} of {report.total} prunable weights "
          f"({report.examples} examples drawn)")
    for layer in report.layers:
        print(f"  {layer['name']:<10} kept {layer['kept']:>5} of {layer['params']}")

    try:  # options are checked before any scoring: one line naming the method and the option
        prunelab.prune(model, "gradient-magnitude", sparsity=0.9, data=(inputs, targets), batches=0)
    except prunelab.PrunelabError as error:
        print(f"refused: {error}")


if __name__ == "__main__":
    main()
