"""Prune a Hugging Face model: SNIP at 90% on a BERT classifier, trained in a plain loop.

    python examples/huggingface_bert.py            # 300 training steps
    python examples/huggingface_bert.py --quick    # 20 steps (what CI runs)

The model is built from a config (nothing is downloaded): a 2-layer BERT on a toy task, "does the
sequence contain token 7?". SNIP (Lee et al., ICLR 2019, eq. 6: |w * dL/dw|) scores every weight matrix,
the attention's query/key/value/output projections included, on one batch of the DataLoader of dicts
that the model itself takes (``input_ids``, ``attention_mask``, ``labels``); the word embeddings are not
eligible unless included (``include=nn.Embedding``), and ``exclude="classifier"`` keeps the output layer
dense. At initialisation attention is nearly uniform, so the query and key projections get almost no
gradient and SNIP's global ranking empties them (a LayerCollapseWarning says so): attention becomes
averaging, which this task survives; ``scope="layer"`` keeps 10% of every matrix instead.
"""

import argparse

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification

import prunelab


class ContainsSeven(Dataset):
    """Sequences of random tokens; the label says whether token 7 occurs."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, 64, (n, 16), generator=g)
        hit = torch.rand(n, generator=g) < 0.5
        self.ids[hit, torch.randint(0, 16, (int(hit.sum()),), generator=g)] = 7
        self.labels = hit.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long),
                "labels": self.labels[i]}


def accuracy(model, loader):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return right / total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config)
    train = DataLoader(ContainsSeven(2000, seed=0), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(ContainsSeven(500, seed=1), batch_size=250)

    report = prunelab.prune(model, "snip", 0.9, data=train, exclude="classifier")
    print(f"SNIP pruned {report.sparsity:.1%} of {report.total:,} eligible weights "
          f"({report.eligible:.0%} of the model's parameters; {report.examples} examples scored)")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # masks hold through any optimizer
    steps = 20 if args.quick else 300
    model.train()
    for step, batch in zip(range(steps), (b for _ in range(100) for b in train)):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    masks, params = prunelab.masks(model), dict(model.named_parameters())
    zeros = sum(int((~m).sum()) for m in masks.values())
    revived = sum(int((params[n].detach()[~m] != 0).sum()) for n, m in masks.items())
    print(f"after {steps} steps: test accuracy {accuracy(model, test):.1%}; {zeros:,} pruned weights, "
          f"{revived} of them non-zero")


if __name__ == "__main__":
    main()
