"""Channel methods and compaction on models outside the zoo: Conv1d, depthwise convs, attention heads,
dict inputs and structured outputs; and the one-line refusals for what they cannot do (shared layers,
tied weights, grouped convs, recurrent layers, layers never called as modules)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelab
from prunelab import PrunelabError, masking, structure
from prunelab.structure.compaction import output_tensors, probes
from families import Dicts, InvertedResidual


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randomise_norms(model, seed=1):
    """BatchNorm statistics and affine parameters far from the identity (a trained-like model)."""
    g = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1.0)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model


def _exact(report):
    assert report.max_abs_diff <= 1e-5 * max(1.0, report.output_scale), report.max_abs_diff
    assert report.params_after < report.params_before


# --- Conv1d + BatchNorm1d -------------------------------------------------------------------------------

class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(4, 12, 3, padding=1), nn.BatchNorm1d(12), nn.ReLU(),
                                      nn.Conv1d(12, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(2))


@pytest.mark.parametrize("method", ["pfec", "softnet", "nisp"])
def test_conv1d_channels_are_removed_and_compact_is_exact(method):
    torch.manual_seed(0)
    model = _randomise_norms(Conv1dNet())
    x = torch.randn(8, 4, 16, generator=_gen())
    prunelab.prune(model, method, channels=0.5, data=(x, torch.zeros(8, dtype=torch.long)))
    masks = prunelab.masks(model)
    assert int((~masks["features.0.weight"].reshape(12, -1).any(1)).sum()) == 6
    small, report = prunelab.compact(model, x)
    _exact(report)
    assert small.features[0].out_channels == 6 and small.features[1].num_features == 6
    assert small.features[3].in_channels == 6 and small.features[3].out_channels == 8
    assert small.head.in_features == 8


def test_pfp_scores_conv1d_layers():
    torch.manual_seed(0)
    model = _randomise_norms(Conv1dNet())
    x = torch.randn(16, 4, 16, generator=_gen())
    report = prunelab.prune(model, "pfp", sparsity=0.3, data=(x, torch.zeros(16, dtype=torch.long)))
    assert report.sparsity > 0.2
    _exact(prunelab.compact(model, x)[1])


# --- depthwise convs: MobileNetV2's inverted residual -----------------------------------------------------

class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8), InvertedResidual(8, 12, stride=2))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_depthwise_conv_is_coupled_with_the_expansion_conv():
    torch.manual_seed(0)
    model = MobileNetLike()
    graph = structure.channel_graph(model, torch.randn(1, 3, 8, 8))
    expansion = [g for g in graph.groups if any(s.module == "blocks.0.block.0" for s in g.producers)][0]
    kinds = {s.module: s.kind for s in expansion.producers}
    assert kinds == {"blocks.0.block.0": "conv", "blocks.0.block.1": "norm", "blocks.0.block.3": "depthwise",
                     "blocks.0.block.4": "norm"}
    assert [s.module for s in expansion.consumers] == ["blocks.0.block.6"]
    assert expansion.safe and [s.module for s in expansion.layers] == ["blocks.0.block.0"]


@pytest.mark.parametrize("method, mask_bias", [("pfec", True), ("softnet", True), ("pfec", False)])
def test_mobilenet_expansion_channels_leave_with_their_depthwise_filters(method, mask_bias):
    torch.manual_seed(0)
    model = _randomise_norms(MobileNetLike())
    x = torch.randn(6, 3, 8, 8, generator=_gen())
    prunelab.prune(model, method, channels=0.5, data=(x, torch.zeros(6, dtype=torch.long)), mask_bias=mask_bias)
    masks = prunelab.masks(model)
    # the expansion conv's filter norms chose the channels; the depthwise filters of the same channels go too
    rows = ~masks["blocks.0.block.0.weight"].reshape(32, -1).any(1)
    assert int(rows.sum()) == 16
    assert torch.equal(~masks["blocks.0.block.3.weight"].reshape(32, -1).any(1), rows)
    assert not masks["blocks.0.block.6.weight"][:, rows].any()
    small, report = prunelab.compact(model, x)
    _exact(report)
    for i, hidden in ((0, 16), (1, 16)):
        block = small.blocks[i].block
        assert block[0].out_channels == block[1].num_features == hidden
        assert block[3].in_channels == block[3].out_channels == block[3].groups == hidden
        assert block[6].in_channels == hidden
    assert small.stem[0].out_channels == 8  # the residual stream is left alone


def test_pfp_refuses_a_grouped_conv_naming_it():
    model = MobileNetLike()
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(PrunelabError, match=r"pfp: blocks\.0\.block\.3 is a grouped convolution") as error:
        prunelab.prune(model, "pfp", sparsity=0.3, data=(x, torch.zeros(4, dtype=torch.long)))
    assert "\n" not in str(error.value) and not masking.is_masked(model)


# --- refusals: a layer called twice, a tied weight, recurrent layers, a layer not called as a module ---

class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 20)
        self.shared = nn.Linear(20, 20)
        self.head = nn.Linear(20, 3)

    def forward(self, x):
        return self.head(torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.inp(x)))))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embedding(ids))))


@pytest.mark.parametrize("method", ["pfec", "softnet", "nisp"])
def test_a_layer_called_twice_is_refused_in_one_line(method):
    model = SharedLinear()
    data = (torch.randn(8, 10), torch.zeros(8, dtype=torch.long))
    with pytest.raises(PrunelabError, match=r"layer 'shared' is called 2 times per forward pass") as error:
        prunelab.prune(model, method, channels=0.25, data=data)
    assert "\n" not in str(error.value) and not masking.is_masked(model)
    graph = structure.channel_graph(model, data[0])
    assert graph.calls["shared"] == 2 and all(not g.safe for g in graph.groups)


@pytest.mark.parametrize("method", ["pfec", "softnet", "nisp"])
def test_channels_read_through_a_tied_weight_are_refused(method):
    model = Tied()
    ids = torch.randint(1, 50, (8, 6), generator=_gen())
    with pytest.raises(PrunelabError, match=r"no layer can lose channels \(mix: layer 'out' holds a weight tied"):
        prunelab.prune(model, method, channels=0.25, data=(ids, ids))
    assert not masking.is_masked(model)


def test_recurrent_layers_are_refused_naming_the_layer():
    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(5, 12, batch_first=True)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    data = (torch.randn(4, 6, 5), torch.zeros(4, dtype=torch.long))
    for method, target in (("pfec", {"channels": 0.25}), ("nisp", {"channels": 0.25}), ("pfp", {"sparsity": 0.3})):
        with pytest.raises(PrunelabError, match=r"GRU 'gru'"):
            prunelab.prune(GRUNet(), method, data=data, **target)


def test_pfp_refuses_a_layer_whose_weight_another_module_reads():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(F.linear(x, self.a.weight, self.a.bias)))

    model = Functional()
    with pytest.raises(PrunelabError, match=r"pfp: layer 'a' is not called as a module"):
        prunelab.prune(model, "pfp", sparsity=0.3, data=(torch.randn(8, 6), torch.zeros(8, dtype=torch.long)))
    assert not masking.is_masked(model)


def test_a_reshape_torch_pruning_cannot_follow_is_refused_not_masked_wrongly():
    class FixedView(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 8)
            self.fc2 = nn.Linear(4, 3)

        def forward(self, x):  # fc1's channels c and c + 4 are summed into fc2's input c
            return self.fc2(torch.relu(self.fc1(x)).view(-1, 2, 4).sum(1))

    model = FixedView()
    with pytest.raises(PrunelabError, match=r"no layer can lose channels \(fc1: torch-pruning maps two channels"):
        prunelab.prune(model, "pfec", channels=0.5, data=(torch.randn(8, 6), torch.zeros(8, dtype=torch.long)))
    assert not masking.is_masked(model)


# --- compact: token ids, dict inputs, structured outputs ------------------------------------------------

class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, ids, scale=None):
        h = self.embedding(ids).mean(1)
        if scale is not None:
            h = h * scale
        y = self.fc2(torch.relu(self.fc1(h)))
        return {"logits": y, "extra": (y.argmax(-1), h)}


def test_probes_never_invent_token_ids_or_dict_inputs():
    x = torch.randn(4, 3)
    assert len(probes(x)) == 2 and torch.equal(probes(x)[0], x)
    assert len(probes(torch.randint(0, 5, (4, 3)))) == 1
    assert len(probes({"ids": torch.randint(0, 5, (4, 3)), "scale": torch.rand(4, 1)})) == 1


def test_compact_takes_token_ids_and_dicts_and_compares_every_output():
    torch.manual_seed(0)
    model = TokenNet()
    ids = torch.randint(1, 50, (8, 6), generator=_gen())
    prunelab.prune(model, "pfec", channels=0.5, data=(ids, torch.zeros(8, dtype=torch.long)))
    small, report = prunelab.compact(model, ids)  # an integer batch: no random ids (out of range)
    _exact(report)
    assert small.fc1.out_features == 12 and report.plan["input_dtype"] == "int64"
    example = {"ids": ids, "scale": torch.rand(8, 1, generator=_gen(1))}
    small, report = prunelab.compact(model, example)
    _exact(report)
    assert report.plan["inputs"] == {"ids": {"shape": [6], "dtype": "int64"},
                                     "scale": {"shape": [1], "dtype": "float32"}}
    paths = [p for p, _ in output_tensors(small(**example))]
    assert paths == ["output['logits']", "output['extra'][0]", "output['extra'][1]"]


def test_equivalence_is_infinite_when_the_outputs_differ_in_structure():
    class Pair(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.n = n

        def forward(self, x):
            return tuple(self.fc(x) for _ in range(self.n))

    a, b = Pair(2), Pair(3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    assert structure.equivalence(a, a, x) == 0.0
    assert structure.equivalence(a, b, x) == float("inf")


def test_a_bad_example_is_refused_in_one_line():
    with pytest.raises(PrunelabError, match="dict of batch tensors"):
        prunelab.compact(TokenNet(), [torch.zeros(2, 3, dtype=torch.long)])


# --- nn.MultiheadAttention: left whole, the feed-forward layers are pruned ------------------------------

def test_transformer_encoder_keeps_attention_and_loses_feed_forward_neurons():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    x = torch.randn(4, 5, 6, generator=_gen())
    prunelab.prune(model, "pfec", channels=0.5, data=(x, torch.zeros(4, dtype=torch.long)))
    masks = prunelab.masks(model)
    assert not any("self_attn" in n for n in masks)
    small, report = prunelab.compact(model, x)
    _exact(report)
    for i in range(2):
        assert small[1].layers[i].linear1.out_features == 16
        assert small[1].layers[i].self_attn.in_proj_weight.shape == (48, 16)


# --- Hugging Face BERT: whole attention heads ----------------------------------------------------------

def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=24, max_position_embeddings=32, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():  # logits of a trained-like size, so that the check is not trivially small
        model.classifier.weight.mul_(50.0)
    ids = torch.randint(1, 50, (6, 8), generator=_gen())
    mask = torch.ones_like(ids)
    mask[::2, -3:] = 0
    items = Dicts([{"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)} for i in range(6)])
    return model, items, {"input_ids": ids, "attention_mask": mask}


def test_bert_self_attention_groups_are_heads():
    model, _, example = _bert()
    graph = structure.channel_graph(model, example)
    heads = [g for g in graph.groups if g.heads is not None]
    assert [g.heads for g in heads] == [f"bert.encoder.layer.{i}.attention.self" for i in range(2)]
    group = heads[0]
    assert group.size == 4 and group.safe
    assert {s.module.rpartition(".")[2] for s in group.producers} == {"query", "key", "value"}
    assert all(s.index[1] == (4, 5, 6, 7) for s in group.producers + group.consumers)


@pytest.mark.parametrize("method", ["pfec", "softnet"])
def test_bert_heads_are_removed_physically_and_outputs_agree(method):
    model, items, example = _bert()
    prunelab.prune(model, method, channels=0.5, data=items)
    masks = prunelab.masks(model)
    query = masks["bert.encoder.layer.0.attention.self.query.weight"]
    dead_heads = (~query.reshape(4, 4, 16).any(2).any(1)).sum()
    assert int(dead_heads) == 2
    small, report = prunelab.compact(model, example)
    _exact(report)
    for i in range(2):
        attention = small.bert.encoder.layer[i].attention
        assert attention.self.num_attention_heads == 2 and attention.self.all_head_size == 8
        assert attention.self.query.out_features == attention.self.key.out_features == 8
        assert attention.self.value.out_features == attention.output.dense.in_features == 8
        assert small.bert.encoder.layer[i].intermediate.dense.out_features == 12
    with torch.no_grad():
        model.eval()
        diff = (small(**example).logits - model(**example).logits).abs().max()
    assert float(diff) <= 1e-5 * max(1.0, report.output_scale)


def test_pfp_on_bert_treats_a_head_as_one_unit_of_the_output_layer():
    model, items, example = _bert()
    report = prunelab.prune(model, "pfp", sparsity=0.4, data=items, points=6)
    assert report.sparsity > 0.3
    dense = prunelab.masks(model)["bert.encoder.layer.0.attention.output.dense.weight"]
    columns = dense.any(0).reshape(4, 4)
    assert bool((columns.all(1) | ~columns.any(1)).all())  # whole heads or nothing
    _exact(prunelab.compact(model, example)[1])
