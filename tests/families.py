"""Models not in the zoo, one per family of layers a user brings (the compatibility matrix's rows).

Each builder returns ``(model, data)``: a small seeded model and a small seeded dataset in the form the
model takes (token ids, dicts for Hugging Face). Shared by ``test_compatibility.py`` and the table it
writes into ``docs/compatibility.md``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

N, CLASSES, VOCAB, SEQ = 24, 3, 50, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels(seed: int, n: int = N) -> torch.Tensor:
    return torch.randint(0, CLASSES, (n,), generator=_gen(seed + 1))


def _tokens(seed: int, n: int = N) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, SEQ), generator=_gen(seed + 2))


class TransformerClassifier(nn.Module):
    """Feature sequences -> input projection -> ``nn.TransformerEncoder`` (``nn.MultiheadAttention``) -> mean -> head."""

    def __init__(self, features: int = 6, width: int = 16, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def transformer(seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(N, SEQ, 6, generator=_gen(seed))
    return TransformerClassifier(), TensorDataset(x, _labels(seed))


class TokenClassifier(nn.Module):
    """Token ids -> ``nn.Embedding`` -> mean over the sequence -> MLP."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.fc1 = nn.Linear(width, 24)
        self.fc2 = nn.Linear(24, CLASSES)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.embedding(ids).mean(1))))


def token_ids(seed: int = 0):
    torch.manual_seed(seed)
    return TokenClassifier(), TensorDataset(_tokens(seed), _labels(seed))


class Dicts(Dataset):
    """A map-style dataset of dict examples (Hugging Face style)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def bert(seed: int = 0):
    """A tiny Hugging Face ``BertForSequenceClassification`` built from a config (nothing downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=32, num_labels=CLASSES,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    ids, labels = _tokens(seed), _labels(seed)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some padding, so the attention mask matters
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(N)]
    return model, Dicts(items)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, residual when shapes agree."""

    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8), InvertedResidual(8, 12, stride=2),
                                    InvertedResidual(12, 12))
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def mobilenet(seed: int = 0):
    torch.manual_seed(seed)
    return MobileNetLike(), TensorDataset(torch.randn(N, 3, 8, 8, generator=_gen(seed)), _labels(seed))


class TiedLanguageModel(nn.Module):
    """Input embedding tied to the output layer (``out.weight is embedding.weight``): per-token logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, VOCAB, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embedding(ids))))


def tied(seed: int = 0):
    torch.manual_seed(seed)
    ids = _tokens(seed)
    return TiedLanguageModel(), TensorDataset(ids, torch.roll(ids, -1, 1))


class SharedLinear(nn.Module):
    """One ``nn.Linear`` applied twice."""

    def __init__(self, width: int = 20):
        super().__init__()
        self.inp = nn.Linear(10, width)
        self.shared = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.head(h)


def shared_linear(seed: int = 0):
    torch.manual_seed(seed)
    return SharedLinear(), TensorDataset(torch.randn(N, 10, generator=_gen(seed)), _labels(seed))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(4, 12, 3, padding=1), nn.BatchNorm1d(12), nn.ReLU(),
                                      nn.Conv1d(12, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.features(x).mean(2))


def conv1d(seed: int = 0):
    torch.manual_seed(seed)
    return Conv1dNet(), TensorDataset(torch.randn(N, 4, 16, generator=_gen(seed)), _labels(seed))


class GRUClassifier(nn.Module):
    """Feature sequences -> bidirectional ``nn.GRU`` -> the last step's states -> head."""

    def __init__(self, features: int = 5, hidden: int = 12):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, CLASSES)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def gru(seed: int = 0):
    torch.manual_seed(seed)
    return GRUClassifier(), TensorDataset(torch.randn(N, SEQ, 5, generator=_gen(seed)), _labels(seed))


FAMILIES = {
    "transformer encoder": transformer,
    "token ids (Embedding)": token_ids,
    "Hugging Face BERT": bert,
    "MobileNetV2-style": mobilenet,
    "tied embeddings": tied,
    "one Linear used twice": shared_linear,
    "Conv1d + BatchNorm1d": conv1d,
    "bidirectional GRU": gru,
}
