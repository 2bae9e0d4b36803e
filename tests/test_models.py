"""Model zoo: exact parameter counts, shapes, seeding, init schemes, option errors."""

import math

import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.models import (INIT_SCHEMES, ModelInfo, PadShortcut, build_model, initialize, list_models,
                             model_info)

# (name, options) -> exact parameter count for 10 classes, computed from the definitions
# (the papers' figures in comments).
COUNTS = [
    ("lenet300-100", {}, 266_610),
    ("lenet5-caffe", {}, 431_080),
    ("lenet5-caffe", {"relu": True}, 431_080),
    ("pfp-lenet5", {}, 81_194),
    ("vgg-like", {}, 14_991_946),                              # SNIP VGG-like, 14.99M
    ("vgg-like", {"classifier": "nnrelief-like"}, 14_990_922),  # NNrelief VGG-like, 14.99M
    ("vgg16", {}, 14_728_266),                                 # PFP VGG-16-BN, 14.73M
    ("vgg16", {"classifier": "like"}, 14_991_946),
    ("vgg16", {"classifier": "snip-d"}, 15_255_626),           # SNIP VGG-D, 15.26M
    ("vgg16", {"classifier": "nnrelief"}, 15_253_578),         # NNrelief VGG-16, 15.25M
    ("resnet20", {}, 269_722),
    ("resnet32", {}, 464_154),
    ("resnet56", {}, 853_018),
    ("resnet110", {}, 1_727_962),
    ("resnet20", {"shortcut": "B"}, 272_474),                  # + 2 x (1x1 conv + BN) = 2,752
    ("wrn-16-8", {}, 10_961_370),                              # "11.0M"
    ("wrn-16-10", {}, 17_116_634),
    ("wrn-22-8", {}, 17_158_106),
    ("lstm", {}, 82_186),
    ("lstm", {"hidden": 256}, 295_434),
    ("gru", {}, 61_962),
    ("gru", {"hidden": 256}, 222_218),
    ("lstm", {"embed": True}, 137_098),                        # SNIP Table 2: 137k
    ("lstm", {"hidden": 256, "embed": True}, 536_330),         # 536k
    ("gru", {"embed": True}, 104_074),                         # 104k
    ("gru", {"hidden": 256, "embed": True}, 404_746),          # 404k (TF's single bias: 403,978)
]

ALL_NAMES = ["gru", "lenet300-100", "lenet5-caffe", "lstm", "pfp-lenet5", "resnet110", "resnet20",
             "resnet32", "resnet56", "vgg-like", "vgg16", "wrn-16-10", "wrn-16-8", "wrn-22-8"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_sorted():
    infos = list_models()
    assert [i.name for i in infos] == ALL_NAMES
    for info in infos:
        assert isinstance(info, ModelInfo)
        assert info.default_dataset in ("mnist", "mnist32", "cifar10")
        from prunelab.data import dataset_info
        assert dataset_info(info.default_dataset).input_shape == info.input_shape  # runnable as is
        assert len(info.input_shape) == 3
        assert all(isinstance(v, str) and "default" in v for v in info.options.values())


@pytest.mark.parametrize("name,options,count", COUNTS,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o, _ in COUNTS])
def test_exact_parameter_counts(name, options, count):
    assert n_params(build_model(name, **options)) == count


def test_counts_scale_with_num_classes():
    # Only the last layer depends on the class count: 64 -> 100 adds 90 x 65 for ResNet-20.
    assert n_params(build_model("resnet20", num_classes=100)) == 269_722 + 90 * 65
    assert n_params(build_model("vgg-like", num_classes=100)) == 14_991_946 + 90 * 513


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_shape(name):
    info = model_info(name)
    model = build_model(name, seed=0)
    out = model(torch.randn(2, *info.input_shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_parameter_names():
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    assert names(build_model("lenet300-100")) == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}
    for relu in (False, True):
        assert names(build_model("lenet5-caffe", relu=relu)) == {
            f"{m}.{k}" for m in ("conv1", "conv2", "fc3", "fc4") for k in ("weight", "bias")}
    assert names(build_model("lstm")) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                                          "rnn.bias_hh_l0", "fc.weight", "fc.bias"}
    assert isinstance(build_model("gru").rnn, nn.GRU)
    resnet = build_model("resnet20")
    assert "linear.weight" in names(resnet)  # akamaster's names, so its checkpoints load
    assert all(m.bias is None for m in resnet.modules() if isinstance(m, nn.Conv2d))


def test_names_are_case_and_underscore_insensitive():
    assert n_params(build_model("LeNet5_Caffe")) == 431_080
    assert model_info("WRN_16_8").name == "wrn-16-8"
    assert n_params(build_model("vgg16", classifier="SNIP_D")) == 15_255_626


def test_pfp_lenet5_spatial_sizes():
    model = build_model("pfp-lenet5")
    x = torch.randn(1, 1, 32, 32)
    x = model.pool1(model.relu1(model.conv1(x)))
    assert x.shape[-2:] == (15, 15)
    x = model.pool2(model.relu2(model.conv2(x)))
    assert x.shape[-2:] == (6, 6)
    assert model.fc1(x).shape == (1, 120, 1, 1)


def _conv2_input(model, x):
    seen = {}
    def hook(module, inputs, output):
        seen["x"] = inputs[0]

    handle = model.conv2.register_forward_hook(hook)
    model(x)
    handle.remove()
    return seen["x"]


def test_lenet5_caffe_relu_option():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    plain = build_model("lenet5-caffe", seed=0)
    relu = build_model("lenet5-caffe", seed=0, relu=True)
    # SNIP/Caffe variant: nothing clips conv1's output, so conv2 sees negative values ...
    assert (_conv2_input(plain, x) < 0).any()
    assert not any(isinstance(m, nn.ReLU) for m in (plain.relu1, plain.relu2))
    # ... and with zero biases the conv stack is positively homogeneous: f(a x) = a f(x), a > 0.
    for m in (plain.conv1, plain.conv2):
        nn.init.zeros_(m.bias)
    stack = lambda t: plain.pool2(plain.conv2(plain.pool1(plain.conv1(t))))  # noqa: E731
    assert torch.allclose(stack(3 * x), 3 * stack(x), atol=1e-5)
    # NNrelief/LOBSTER variant: conv2's input is a ReLU output.
    assert (_conv2_input(relu, x) >= 0).all()
    # Same parameters under the same seed: only the activations differ.
    fresh, relu_state = build_model("lenet5-caffe", seed=0).state_dict(), relu.state_dict()
    assert all(torch.equal(v, relu_state[k]) for k, v in fresh.items())


# --- seeding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["default", "vs-h", "truncated-normal"])
def test_same_seed_same_weights_and_global_rng_untouched(init):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model("lenet5-caffe", init=init, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model("lenet5-caffe", init=init, seed=7)
    c = build_model("lenet5-caffe", init=init, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert torch.equal(torch.get_rng_state(), state)


def test_seed_reproducible_for_bn_and_rnn_models():
    for name in ("resnet20", "lstm"):
        a, b = build_model(name, init="vs", seed=3), build_model(name, init="vs", seed=3)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unseeded_builds_differ():
    a, b = build_model("lenet300-100"), build_model("lenet300-100")
    assert not torch.equal(a.fc1.weight, b.fc1.weight)


# --- init schemes -----------------------------------------------------------------------------

def _fc1(init, **kw):
    return build_model("lenet300-100", init=init, seed=0, **kw).fc1  # 300 x 784 = 235,200 weights


@pytest.mark.parametrize("init,expected_std", [
    ("vs-h", math.sqrt(2 / 784)),
    ("vs-x", math.sqrt(2 / (784 + 300))),
    ("vs", math.sqrt(1 / 784)),          # TF's correction makes the truncated std exact
    ("normal", 0.1),
    ("truncated-normal", 0.1 * 0.8796),  # truncation at 2 std, not rescaled
])
def test_init_std_matches_formula(init, expected_std):
    fc1 = _fc1(init)
    assert abs(fc1.weight.std().item() / expected_std - 1) < 0.10
    assert abs(fc1.weight.mean().item()) < 0.05 * expected_std
    assert torch.count_nonzero(fc1.bias) == 0


def test_truncated_schemes_stay_within_two_std():
    w = _fc1("truncated-normal").weight
    assert w.abs().max() <= 0.2
    assert w.abs().max() > 0.19  # the cut is at 2 std, not tighter
    s = math.sqrt(1 / 784) / 0.87962566103423978
    assert _fc1("vs").weight.abs().max() <= 2 * s
    assert _fc1("vs-h").weight.abs().max() > 2 * math.sqrt(2 / 784)  # the plain normal is not cut


def test_init_std_option():
    assert abs(_fc1("normal", init_std=0.02).weight.std().item() / 0.02 - 1) < 0.10
    assert _fc1("truncated-normal", init_std=0.05).weight.abs().max() <= 0.1
    with pytest.raises(PrunelabError, match="init_std"):
        build_model("lenet300-100", init="vs-h", init_std=0.1)
    with pytest.raises(PrunelabError):
        build_model("lenet300-100", init="normal", init_std=-1)


def test_init_bias_vs_draws_biases_as_the_snip_code():
    model = build_model("lenet300-100", init="vs", seed=0, init_bias="vs")
    for layer, n in ((model.fc1, 300), (model.fc2, 100)):  # TF: a 1-D tensor's fan_in is its length
        assert abs(layer.bias.std().item() / math.sqrt(1 / n) - 1) < 0.2
        assert layer.bias.abs().max() <= 2 * math.sqrt(1 / n) / 0.87962566103423978
    plain = build_model("lenet300-100", init="vs", seed=0)
    assert torch.count_nonzero(plain.fc1.bias) == 0
    assert torch.equal(plain.fc1.weight, model.fc1.weight)  # the weights are drawn first, unchanged
    lstm = build_model("lstm", init="vs", seed=0, init_bias="vs")
    assert torch.count_nonzero(lstm.rnn.bias_ih_l0) == 0 and torch.count_nonzero(lstm.fc.bias) > 0
    with pytest.raises(PrunelabError, match="init_bias 'he'; choose from: vs, zeros"):
        build_model("lenet300-100", init="vs", init_bias="he")
    with pytest.raises(PrunelabError, match="needs a non-default init"):
        build_model("lenet300-100", init="default", init_bias="vs")


def test_init_conv_rnn_and_batchnorm():
    # Conv fan_in = in_channels * k * k.
    conv = build_model("vgg16", init="vs-h", seed=0).features[-4]  # last conv (then BN, ReLU, pool)
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.kernel_size) == (512, (3, 3))
    assert abs(conv.weight.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.10
    assert torch.count_nonzero(conv.bias) == 0
    # RNN: TF's one-kernel fans, fan_in = input + hidden.
    lstm = build_model("lstm", hidden=256, init="vs-h", seed=0).rnn
    for w in (lstm.weight_ih_l0, lstm.weight_hh_l0):
        assert abs(w.std().item() / math.sqrt(2 / (28 + 256)) - 1) < 0.10
    assert torch.count_nonzero(lstm.bias_ih_l0) == 0 and torch.count_nonzero(lstm.bias_hh_l0) == 0
    # BatchNorm: weight 1, bias 0.
    bn = build_model("resnet20", init="vs-x", seed=0).bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))


def test_initialize_public_function():
    model = build_model("lenet300-100")
    gen = torch.Generator().manual_seed(1)
    assert initialize(model, "VS_H", generator=gen) is model
    w1 = model.fc1.weight.clone()
    initialize(model, "rn", generator=torch.Generator().manual_seed(1), std=0.3)
    assert abs(model.fc1.weight.std().item() / 0.3 - 1) < 0.10
    initialize(model, "vs-h", generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.fc1.weight, w1)
    # "default" with a generator is reproducible too and leaves the global RNG alone.
    state = torch.get_rng_state()
    initialize(model, "default", generator=torch.Generator().manual_seed(2))
    w2 = model.fc1.weight.clone()
    initialize(model, "default", generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.fc1.weight, w2)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(INIT_SCHEMES) == {"default", "vs-h", "vs-x", "vs", "normal", "truncated-normal"}


# --- errors -----------------------------------------------------------------------------------

def test_unknown_model_lists_names():
    with pytest.raises(PrunelabError, match="resnet20") as e:
        build_model("resnet18")
    assert "lenet300-100" in str(e.value)
    with pytest.raises(PrunelabError):
        model_info("nope")


def test_unknown_init_lists_schemes():
    with pytest.raises(PrunelabError, match="vs-h") as e:
        build_model("lenet300-100", init="kaiming")
    assert "truncated-normal" in str(e.value)
    with pytest.raises(PrunelabError):
        initialize(nn.Linear(2, 2), "xavier")


def test_unknown_option_lists_allowed():
    with pytest.raises(PrunelabError, match="relu") as e:
        build_model("lenet5-caffe", relus=True)
    assert "relus" in str(e.value)
    with pytest.raises(PrunelabError, match="none"):
        build_model("lenet300-100", relu=True)
    with pytest.raises(PrunelabError, match="hidden") as e:
        build_model("lstm", hiden=64)
    assert "embed" in str(e.value)


@pytest.mark.parametrize("name,options,fragment", [
    ("lstm", {"hidden": "128"}, "hidden"),
    ("lstm", {"hidden": 12.5}, "hidden"),
    ("gru", {"hidden": True}, "hidden"),
    ("lstm", {"hidden": 0}, "hidden"),
    ("lenet5-caffe", {"relu": "yes"}, "relu"),
    ("vgg16", {"classifier": "vgg-e"}, "snip-d"),
    ("vgg-like", {"classifier": "pfp"}, "nnrelief-like"),
    ("resnet20", {"shortcut": "C"}, "A, B"),
    ("wrn-16-8", {"dropout": 1.0}, "dropout"),
    ("lenet300-100", {"num_classes": 1}, "num_classes"),
    ("lenet300-100", {"num_classes": "10"}, "num_classes"),
    ("lenet300-100", {"seed": 1.5}, "seed"),
])
def test_bad_option_values(name, options, fragment):
    with pytest.raises(PrunelabError, match=fragment):
        build_model(name, **options)


def test_option_values_are_normalised():
    assert isinstance(build_model("resnet20", shortcut="b").layer2[0].shortcut, nn.Sequential)
    assert isinstance(build_model("resnet20").layer2[0].shortcut, PadShortcut)
    assert build_model("wrn-16-8", dropout=0.3).stage1[0].dropout.p == 0.3


def test_wrn_builder_checks_depth():
    from prunelab.models import build_wrn
    assert n_params(build_wrn(10, 1)) > 0
    with pytest.raises(PrunelabError, match="6n"):
        build_wrn(18, 2)


# --- option-A shortcut ------------------------------------------------------------------------

def test_pad_shortcut_matches_zero_padding_and_prunes():
    x = torch.randn(2, 4, 6, 6)
    sc = PadShortcut(4, 8, 2)
    ref = torch.zeros(2, 8, 3, 3)
    ref[:, 2:6] = x[:, :, ::2, ::2]  # identity in the middle channels, as akamaster pads
    assert torch.equal(sc(x), ref)
    # Removing input channel 1 zeroes its output channel; removing outputs drops them.
    sc.prune_in_channels([1])
    keep = [0, 2, 3]
    ref_in = ref.clone()
    ref_in[:, 3] = 0
    assert torch.equal(sc(x[:, keep]), ref_in)
    sc.prune_out_channels([0, 3, 5])
    assert (sc.in_channels, sc.out_channels) == (3, 5)
    assert torch.equal(sc(x[:, keep]), ref_in[:, [1, 2, 4, 6, 7]])


def test_resnet_option_a_prunes_with_torch_pruning():
    tp = pytest.importorskip("torch_pruning")
    from prunelab.models import torch_pruning_pruners
    model = build_model("resnet20", seed=0).eval()
    x = torch.randn(2, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.5, ignored_layers=[model.linear],
                                       customized_pruners=torch_pruning_pruners())
    pruner.step()
    assert model(x).shape == (2, 10)
    assert n_params(model) < 269_722 / 2
