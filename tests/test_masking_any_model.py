"""Masks on the models users bring: attention, tied and shared parameters, the eligibility policy, and
masks holding through load_state_dict, to(), dtype changes and deepcopy for every parameter kind."""

import copy

import pytest
import torch
from torch import nn

import prunelab
from prunelab import masking
from families import SharedLinear, TiedLanguageModel, TransformerClassifier, GRUClassifier


def _assert_zeros(model, current, after):
    params = dict(model.named_parameters())
    for name, mask in current.items():
        assert int((params[name].detach()[~mask] != 0).sum()) == 0, f"{name} revived after {after}"


def _sgd_steps(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


def test_attention_weights_are_prunable_and_counted():
    model = TransformerClassifier()
    names = list(masking.prunable_parameters(model))
    assert "encoder.layers.0.self_attn.in_proj_weight" in names
    assert "encoder.layers.0.self_attn.out_proj.weight" in names
    report = prunelab.prune(model, "magnitude", 0.5)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert report.total == weights  # every weight matrix, Q/K/V included
    assert report.kept == round(0.5 * weights)
    # a weight edited by hand and read by the module around it (MultiheadAttention reads out_proj.weight
    # without calling out_proj) is masked again before the forward pass reads it
    out_proj = model.encoder.layers[0].self_attn.out_proj
    mask = masking.masks(model)["encoder.layers.0.self_attn.out_proj.weight"]
    with torch.no_grad():
        out_proj.weight.fill_(1.0)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 8, 6))
    assert not out_proj.weight[~mask].any()


@pytest.mark.parametrize("build, x", [
    (TransformerClassifier, torch.randn(4, 8, 6)),
    (GRUClassifier, torch.randn(4, 8, 5)),
    (SharedLinear, torch.randn(4, 10)),
])
def test_masks_hold_through_load_to_dtype_and_deepcopy(build, x):
    torch.manual_seed(0)
    model = build()
    dense = copy.deepcopy(model.state_dict())
    prunelab.prune(model, "random", 0.6)
    current = masking.masks(model)
    model.load_state_dict(dense)  # no forward pass: the load itself re-applies the masks
    _assert_zeros(model, current, "load_state_dict")
    model.eval()
    with torch.no_grad():
        out_eval = model(x)  # nn.MultiheadAttention's fast path reads in_proj and out_proj directly
    clone = copy.deepcopy(model)
    clone.load_state_dict(dense)
    _assert_zeros(clone, current, "load_state_dict into a deep copy")
    clone.train()
    _sgd_steps(clone, x)
    _assert_zeros(clone, current, "SGD on a deep copy")
    model.double()
    _assert_zeros(model, current, "double()")
    model.train()
    _sgd_steps(model, x.double())
    _assert_zeros(model, current, "SGD in float64")
    fresh = build()
    fresh.load_state_dict(dense, assign=True)
    assert torch.isfinite(out_eval).all()


def test_a_pickled_model_keeps_its_masks_through_training():
    import io
    model = SharedLinear()
    prunelab.prune(model, "magnitude", 0.5)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)  # the tensors' gradient hooks are not pickled
    current = masking.masks(loaded)
    x = torch.randn(4, 10)
    _sgd_steps(loaded, x)  # momentum would carry a gradient into pruned entries without the hooks
    _sgd_steps(loaded, x)  # the forward pass re-links the hooks once: one hook per tensor
    _assert_zeros(loaded, current, "SGD on a pickled model")
    assert all(len(p._post_accumulate_grad_hooks) == 1 for n, p in loaded.named_parameters() if n in current)


def test_load_state_dict_assign_relinks_the_new_parameters():
    model = SharedLinear()
    prunelab.prune(model, "magnitude", 0.5)
    current = masking.masks(model)
    dense = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(dense, assign=True)  # new Parameter objects
    _assert_zeros(model, current, "load_state_dict(assign=True)")
    _sgd_steps(model, torch.randn(4, 10))
    _assert_zeros(model, current, "SGD after assign")


def test_a_tie_gets_one_mask_under_its_first_name():
    model = TiedLanguageModel()
    assert masking.aliases(model) == {"embedding.weight": ["out.weight"]}
    # an output layer tied to an embedding is an embedding: eligible only when embeddings are included
    assert list(masking.prunable_parameters(model)) == ["mix.weight"]
    params = masking.prunable_parameters(model, include=nn.Embedding)
    assert list(params) == ["embedding.weight", "mix.weight"]
    report = prunelab.prune(model, "magnitude", 0.5, include=nn.Embedding)
    assert report.layers[0]["aliases"] == ["out.weight"]
    assert report.kept == round(0.5 * report.total)
    assert model.out.weight is model.embedding.weight
    assert list(masking.masks(model)) == ["embedding.weight", "mix.weight"]
    # a mask given under the alias lands on the one tensor
    masking.attach(model, {"out.weight": torch.zeros_like(model.out.weight, dtype=torch.bool)})
    assert list(masking.masks(model)) == ["embedding.weight", "mix.weight"]
    assert not model.embedding.weight.any()


def test_tied_in_the_other_order_is_not_silently_pruned():
    class OutputFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 20, bias=False)
            self.embedding = nn.Embedding(20, 8)
            self.embedding.weight = self.out.weight

        def forward(self, ids):
            return self.out(self.embedding(ids))

    model = OutputFirst()
    assert masking.prunable_parameters(model) == {}
    with pytest.raises(prunelab.PrunelabError, match="no prunable parameters"):
        prunelab.prune(model, "magnitude", 0.5)
    assert list(masking.prunable_parameters(model, include="Embedding")) == ["out.weight"]


def test_a_shared_linear_is_one_parameter():
    model = SharedLinear()
    params = masking.prunable_parameters(model)
    assert list(params) == ["inp.weight", "shared.weight", "head.weight"]
    report = prunelab.prune(model, "magnitude", 0.5)
    assert report.total == sum(p.numel() for p in params.values())


def test_include_and_exclude_policy():
    model = TransformerClassifier()
    assert "head.weight" not in masking.prunable_parameters(model, exclude="head")
    assert not any(".self_attn." in n for n in masking.prunable_parameters(model, exclude="*.self_attn*"))
    assert not any(n.endswith("in_proj_weight")
                   for n in masking.prunable_parameters(model, exclude=nn.MultiheadAttention))
    only_norms = masking.prunable_parameters(model, include="LayerNorm", exclude=[nn.Linear, nn.MultiheadAttention])
    assert only_norms and all(".norm" in n for n in only_norms)
    with pytest.raises(prunelab.PrunelabError, match="module types or name patterns"):
        masking.prunable_parameters(model, include=[3])
    report = prunelab.prune(model, "magnitude", 0.5, exclude="head")
    assert "head.weight" not in masking.masks(model)
    assert all(layer["name"] != "head.weight" for layer in report.layers)
