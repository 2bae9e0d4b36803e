"""GraSP, SynFlow, SNIP, NNrelief and iSparse on the models users bring (issue 16): each works, or refuses
in one line naming the layer and the reason before touching the model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import prunelab
from prunelab import masking
from prunelab.errors import PrunelabError
from prunelab.pruning import LayerCollapseWarning
from families import bert, gru, shared_linear, tied, token_ids, transformer


def _refuses(model, method, match, **kwargs):
    """The call is refused with a one-line PrunelabError matching ``match``; the model is left as it was."""
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunelabError, match=match) as caught:
        prunelab.prune(model, method, **kwargs)
    assert "\n" not in str(caught.value)
    assert not masking.masks(model), "a refusal attached masks"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    return str(caught.value)


# --- GraSP ---------------------------------------------------------------------------------------------------

def test_grasp_on_a_transformer_equals_a_finite_difference_hessian_product():
    """H g through nn.MultiheadAttention (double backward on SDPA's math backend), against central
    differences of the gradient along g, in float64."""
    model, data = transformer()
    model.double()
    x, y = data.tensors
    scores = prunelab.scores(model, "grasp", (x, y), temperature=200.0)  # 24 examples < 10 per class: all
    params = masking.prunable_parameters(model)
    halves = [(x[:12], y[:12]), (x[12:], y[12:])]

    def gradient():
        loss = sum(F.cross_entropy(model(a.double()) / 200.0, b) for a, b in halves)
        return torch.autograd.grad(loss, list(params.values()))

    model.eval()
    g = gradient()
    norm = torch.sqrt(sum((v ** 2).sum() for v in g))
    eps = 1e-4
    with torch.no_grad():
        for p, v in zip(params.values(), g):
            p.add_(eps * v / norm)
    plus = gradient()
    with torch.no_grad():
        for p, v in zip(params.values(), g):
            p.sub_(2 * eps * v / norm)
    minus = gradient()
    with torch.no_grad():
        for p, v in zip(params.values(), g):
            p.add_(eps * v / norm)
    for (name, p), a, b in zip(params.items(), plus, minus):
        reference = (p.detach() * (a - b) / (2 * eps) * norm).to(torch.float64)
        assert torch.isfinite(scores[name]).all()
        assert torch.allclose(scores[name], reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max())), name
    assert torch.backends.mha.get_fastpath_enabled()  # the attention settings are restored


def test_grasp_on_hugging_face_bert_gives_finite_signed_scores():
    model, data = bert()
    scores = prunelab.scores(model, "grasp", data)
    values = torch.cat([s.flatten() for s in scores.values()])
    assert torch.isfinite(values).all() and (values > 0).any() and (values < 0).any()


def test_grasp_refuses_an_operation_without_a_second_derivative():
    class Prototypes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.centres = nn.Linear(6, 3)

        def forward(self, x):
            return -torch.cdist(self.fc(x), self.centres.weight)  # cdist has no double backward

    torch.manual_seed(0)
    data = (torch.randn(12, 4), torch.arange(12) % 3)
    message = _refuses(Prototypes(), "grasp", "grasp needs second derivatives", sparsity=0.5, data=data)
    assert "_cdist_backward" in message


# --- SynFlow -------------------------------------------------------------------------------------------------

def test_synflow_on_token_ids_treats_the_embedding_as_a_linear_layer_on_ones():
    """Token ids -> Embedding -> mean -> fc1 -> ReLU -> fc2: the all-ones signal enters as 1ᵀ|E| (an
    embedding is a Linear map of a one-hot vector), so every score follows by hand."""
    model, data = token_ids()
    scores = prunelab.scores(model, "synflow", data, include=nn.Embedding)
    E, W1, b1 = model.embedding.weight.detach().abs(), model.fc1.weight.detach().abs(), model.fc1.bias.detach().abs()
    W2 = model.fc2.weight.detach().abs()
    c = E.sum(0).double()                      # each position's embedding output; their mean is the same
    h = W1.double() @ c + b1.double()
    u = W2.double().sum(0)                     # dR/dh
    assert torch.allclose(scores["fc2.weight"], W2.double() * h[None, :])
    assert torch.allclose(scores["fc1.weight"], W1.double() * torch.outer(u, c))
    assert torch.allclose(scores["embedding.weight"], E.double() * (W1.double().T @ u)[None, :])
    assert all(bool((s > 0).all()) for s in scores.values())
    report = prunelab.prune(model, "synflow", 0.5, data=data, rounds=5)
    assert report.kept == round(0.5 * report.total)


def test_synflow_takes_a_dict_of_integer_inputs():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(20, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            x = self.embedding(input_ids) * attention_mask[..., None]
            return self.fc(x.sum(1) / attention_mask.sum(1, keepdim=True))

    class Items(Dataset):
        def __init__(self, ids):
            self.ids = ids

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(5, dtype=torch.long), "labels": i % 3}

    torch.manual_seed(0)
    items = Items(torch.randint(0, 20, (10, 5)))
    model = Masked()
    scores = prunelab.scores(model, "synflow", items)
    expected = model.fc.weight.detach().abs().double() * model.embedding.weight.detach().abs().double().sum(0)
    assert torch.allclose(scores["fc.weight"], expected)
    assert prunelab.prune(model, "synflow", 0.5, data=items, rounds=3).kept == 12


@pytest.mark.parametrize("build, where", [(transformer, "encoder.layers.0.self_attn computes attention"),
                                          (bert, "bert.embeddings.LayerNorm applies a normalisation")])
def test_synflow_refuses_attention_and_normalisation(build, where):
    model, data = build()
    _refuses(model, "synflow", where, sparsity=0.5, data=data)


def test_synflow_refuses_a_layer_a_saturated_activation_cuts_off():
    model, data = tied()  # tanh(mix(1ᵀ|E|)) saturates at exactly 1: mix gets no flow
    _refuses(model, "synflow", "no synaptic flow reaches mix.weight", sparsity=0.5, data=data)


def test_synflow_prunes_a_weight_that_cannot_reach_the_output_without_refusing():
    """The backward GRU's recurrent weights do not act on the last step's output (its first step starts
    from a zero state): no flow, rightly, and SynFlow goes on."""
    model, data = gru()
    scores = prunelab.scores(model, "synflow", data)
    assert not scores["gru.weight_hh_l0_reverse"].any() and scores["gru.weight_hh_l0"].any()
    with pytest.warns(LayerCollapseWarning, match="gru.weight_hh_l0_reverse"):
        report = prunelab.prune(model, "synflow", 0.5, data=data, rounds=5)
    assert report.kept == round(0.5 * report.total)


# --- SNIP ----------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::prunelab.pruning.LayerCollapseWarning")  # SNIP empties Q/K at init
def test_snip_on_hugging_face_bert():
    model, data = bert()
    report = prunelab.prune(model, "snip", 0.5, data=data)
    assert report.kept == round(0.5 * report.total)


# --- NNrelief and iSparse: inputs measured by hooks on the layer ------------------------------------------------

@pytest.mark.parametrize("method, kwargs", [("relief", {}), ("isparse", {"sparsity": 0.5}),
                                            ("retrain-free", {"sparsity": 0.5})])
def test_a_linear_inside_multihead_attention_is_refused_with_the_true_reason(method, kwargs):
    model, data = transformer()
    message = _refuses(model, method, "encoder.layers.0.self_attn.out_proj is used inside MultiheadAttention",
                       data=data, exclude="*in_proj_weight", **kwargs)
    assert "did not run" not in message


def test_relief_refuses_a_layer_that_never_runs():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.unused = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    data = (torch.randn(16, 6), torch.arange(16) % 3)
    _refuses(Spare(), "relief", "relief: layer 'unused' did not run in the forward pass", data=data)


def test_relief_refuses_a_weight_tied_across_two_layers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
            self.c = nn.Linear(6, 6)
            self.c.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.c(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    data = (torch.randn(16, 6), torch.arange(16) % 3)
    _refuses(Tied(), "relief", "relief: a.weight is tied to c.weight", data=data)


def test_relief_scores_a_linear_used_twice_on_both_of_its_inputs():
    model, data = shared_linear()
    seen = []
    handle = model.shared.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().double()))
    with torch.no_grad():
        model.eval()(data.tensors[0])
    handle.remove()
    scores = prunelab.scores(model, "relief", data)
    mean = torch.cat(seen).abs().mean(0)             # the mean over every input the neurons received
    contrib = model.shared.weight.detach().double().abs() * mean[None, :]
    bias = model.shared.bias.detach().double().abs()
    expected = contrib / (contrib.sum(1, keepdim=True) + bias[:, None])
    assert torch.allclose(scores["shared.weight"], expected)


def test_isparse_names_a_shared_module_not_a_residual_addition():
    model, data = shared_linear()
    message = _refuses(model, "isparse", "layer 'shared' is called 2 times", sparsity=0.5, data=data)
    assert "residual" not in message
