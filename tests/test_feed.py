"""Data in any PyTorch form: Datasets, DataLoaders, dict batches, token ids, iterables, Hugging Face-style
outputs; every method that uses data draws the same examples from every form of the same data."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import prunelab
from prunelab import PrunelabError, TrainConfig, Trainer, evaluate
from prunelab.data.feed import Feed, default_loss

gen = torch.Generator().manual_seed(0)
X = torch.randn(120, 1, 12, 12, generator=gen)
Y = torch.arange(120) % 3


class DictDataset(Dataset):  # a user's Dataset returning dicts, Hugging Face style
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return {"x": X[i], "labels": Y[i]}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))


FORMS = {
    "pair": lambda: (X, Y),
    "loader": lambda: DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True),
    "dicts": lambda: DictDataset(),
    "dict loader": lambda: DataLoader(DictDataset(), batch_size=7),
}
DATA_METHODS = {  # every method that uses data, with its kind of target
    "snip": {"sparsity": 0.5}, "grasp": {"sparsity": 0.5}, "synflow": {"sparsity": 0.5},
    "pfp": {"sparsity": 0.5}, "isparse": {"sparsity": 0.5}, "retrain-free": {"sparsity": 0.5},
    "pfec": {"channels": 0.5}, "softnet": {"channels": 0.5}, "nisp": {"channels": 0.5}, "relief": {},
}


@pytest.mark.parametrize("method", sorted(DATA_METHODS))
def test_every_form_of_the_same_data_gives_the_same_masks(method):
    results = {}
    for form, make in FORMS.items():
        model = small_cnn()
        report = prunelab.prune(model, method, data=make(), seed=0, **DATA_METHODS[method])
        results[form] = (prunelab.masks(model), report.examples)
    reference, examples = results.pop("pair")
    assert any(not m.all() for m in reference.values())  # something was pruned
    for form, (masks, used) in results.items():
        assert masks.keys() == reference.keys(), form
        assert all(torch.equal(masks[n], reference[n]) for n in masks), form
        assert used == examples, form


def test_a_seeded_draw_is_the_same_rows_from_every_form():
    draws = [Feed(make()).draw(10, torch.Generator().manual_seed(3)) for make in FORMS.values()]
    for draw in draws[1:]:
        assert torch.equal(draw.inputs, draws[0].inputs) and torch.equal(draw.targets, draws[0].targets)
    assert draws[0].source == "drawn with the seed"
    everything = Feed((X[:5], Y[:5])).draw(10)
    assert everything.source == "all, in order" and torch.equal(everything.inputs, X[:5])


def test_an_iterable_without_length_gives_its_first_examples():
    class Stream(IterableDataset):
        def __iter__(self):
            for i in range(0, 120, 20):
                yield X[i:i + 20], Y[i:i + 20]

    feed = Feed(Stream())
    draw = feed.draw(30)
    assert not feed.seekable and len(draw) == 30 and torch.equal(draw.inputs, X[:30])
    assert "iteration order" in draw.source
    model = small_cnn()
    assert prunelab.prune(model, "snip", 0.5, Stream(), batch_size=20).examples == 20


def test_evaluate_and_trainer_take_a_dataloader():
    model = small_cnn()
    loader = DataLoader(TensorDataset(X, Y), batch_size=25)
    assert evaluate(model, loader) == pytest.approx(evaluate(model, (X, Y)))

    def trained(seed):
        net = small_cnn()
        shuffled = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
        trainer = Trainer(net, shuffled, TrainConfig(epochs=2, lr=0.05), seed=seed, progress=False)
        stats = [trainer.run_epoch(e) for e in range(trainer.epochs)]
        return net, stats

    (a, stats), (b, _), (c, _) = trained(0), trained(0), trained(1)
    assert trainer_steps(stats) == 2 * 8  # the loader's own batching: 120 / 16 -> 8 batches per epoch
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # seeded shuffling
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def trainer_steps(stats):
    return stats[-1]["steps"]


class TinyLM(nn.Module):
    """Token ids in, a Hugging Face-style output out: ``model(input_ids=..., attention_mask=...).logits``."""

    def __init__(self, vocab=20, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.hidden(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return SimpleNamespace(logits=self.head(h))


class TokenDataset(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 20, (40, 6), generator=g)
        self.labels = torch.roll(self.ids, -1, dims=1)
        self.labels[:, -1] = -100  # no next token: ignored by the loss and the error

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6), "labels": self.labels[i]}


def test_token_ids_dict_batches_and_model_outputs_with_logits():
    data = TokenDataset()
    model = TinyLM()
    report = prunelab.prune(model, "snip", sparsity=0.5, data=DataLoader(data, batch_size=8), batch_size=8)
    assert report.examples == 8 and report.sparsity == pytest.approx(0.5, abs=1e-3)
    result = evaluate(model, DataLoader(data, batch_size=8))
    assert 0 <= result["error"] <= 1 and result["loss"] > 0
    # the error counts the 40 x 5 labelled tokens, not the -100 ones
    logits = model(data.ids).logits
    labelled = data.labels != -100
    wrong = int((logits.argmax(-1) != data.labels)[labelled].sum())
    assert result["error"] == pytest.approx(wrong / int(labelled.sum()))
    trainer = Trainer(model, DataLoader(data, batch_size=8, shuffle=True), TrainConfig(epochs=1), seed=0,
                      progress=False)
    before = model.head.weight[prunelab.masks(model)["head.weight"]].clone()
    trainer.run_epoch(0)
    assert not torch.equal(before, model.head.weight[prunelab.masks(model)["head.weight"]])
    assert (model.head.weight[~prunelab.masks(model)["head.weight"]] == 0).all()


def test_loss_fn_and_get_logits_reach_the_criterion():
    model = small_cnn()
    calls = []

    def loss_fn(logits, targets):
        calls.append(logits.shape)
        return nn.functional.cross_entropy(logits, targets)

    wrapped = nn.Sequential(model, nn.Identity())
    outputs = prunelab.scores(wrapped, "snip", (X, Y), loss_fn=loss_fn, get_logits=lambda out: out * 2.0)
    assert calls == [(100, 3)] and all(torch.isfinite(s).all() for s in outputs.values())
    assert default_loss(torch.zeros(2, 3, 5), torch.tensor([[0, 1, -100], [2, -100, -100]])) > 0


def test_bad_data_is_one_clear_line():
    with pytest.raises(PrunelabError, match="data must be a torch Dataset, a DataLoader"):
        prunelab.prune(small_cnn(), "snip", 0.5, data=42)
    with pytest.raises(PrunelabError, match="inputs \\(3\\) and targets \\(2\\)"):
        prunelab.prune(small_cnn(), "snip", 0.5, data=(X[:3], Y[:2]))
    with pytest.raises(PrunelabError, match="snip scores the loss: the data must hold targets"):
        prunelab.prune(small_cnn(), "snip", 0.5, data=X)
    with pytest.raises(PrunelabError, match="cannot find the logits"):
        prunelab.scores(nn.Sequential(small_cnn(), Wrap()), "snip", (X, Y))


class Wrap(nn.Module):
    def forward(self, x):
        return {"scores": x}
