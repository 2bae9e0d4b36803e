"""The public API is what docs/api.md documents; method options are typed, checked once, and become CLI flags."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import prunelab
from prunelab import Method, Options, PrunelabError, option, register
from prunelab.methods import METHODS

API = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


def test_all_is_the_documented_api():
    documented = set(re.findall(r"^\| `(\w+)", API, flags=re.M)) | set(re.findall(r", `(\w+)[`(]", API))
    assert set(prunelab.__all__) <= documented, set(prunelab.__all__) - documented
    assert all(hasattr(prunelab, name) for name in prunelab.__all__)


def test_every_method_declares_typed_options_with_help():
    for method in prunelab.list_methods():
        assert issubclass(method.options, Options), method.name
        for name in method.options.defaults():
            assert method.options.help(name).strip(), (method.name, name)
        method.options.parse(method.name, {})  # the defaults pass their own checks


@pytest.mark.parametrize("method, options, message", [
    ("snip", {"batchsize": 10}, "unknown option\\(s\\) batchsize for method 'snip'; allowed: batch_size, batches, bn_mode"),
    ("snip", {"batches": "2"}, "option batches must be int, got '2'"),
    ("snip", {"batches": 0}, "option batches must be a positive integer, got 0"),
    ("snip", {"bn_mode": "live"}, "option bn_mode must be one of: eval, train"),
    ("grasp", {"temperature": 0}, r"option temperature must be in \(0, inf\), got 0"),
    ("pfp", {"delta": 1.0}, r"option delta must be in \(0, 1\)"),
    ("isparse", {"use_input": 1}, "option use_input must be bool"),
    ("lobster", {"lambda": -1.0}, r"option lambda must be in \[0, inf\)"),
    ("lobster", {"lamda": 1e-4}, "unknown option\\(s\\) lamda for method 'lobster'; allowed: lambda, pwe"),
])
def test_bad_options_are_refused_by_one_shared_check(method, options, message):
    with pytest.raises(PrunelabError, match=message):
        prunelab.get_method(method).parse_options(options)


def test_an_int_may_stand_for_a_float_but_not_a_bool():
    assert prunelab.get_method("grasp").parse_options({"temperature": 100})["temperature"] == 100
    with pytest.raises(PrunelabError, match="temperature must be float"):
        prunelab.get_method("grasp").parse_options({"temperature": True})


def test_a_user_adds_a_method_in_a_few_lines():
    @dataclass(frozen=True)
    class Power(Options):
        p: float = option(1.0, "exponent of |w|", low=0, open_low=True)

    def powered(model, params, *, data, generator, p=Power.p, **_):
        return {name: w.detach().abs() ** p for name, w in params.items()}

    spec = register(Method("test-power", "|w|^p", powered, options=Power))
    try:
        model = nn.Linear(10, 10)
        report = prunelab.prune(model, "test-power", sparsity=0.7, p=2.0)
        assert report.kept == 30
        kept = prunelab.masks(model)["weight"]
        assert model.weight[kept].abs().min() >= model.weight[~kept].abs().max()  # the largest survive
        with pytest.raises(PrunelabError, match="option p must be in"):
            prunelab.prune(nn.Linear(10, 10), "test-power", sparsity=0.5, p=-1.0)
        with pytest.raises(PrunelabError, match="already registered"):
            register(spec)
    finally:
        METHODS.pop("test-power")


def test_cli_flags_and_help_come_from_the_options(capsys):
    from prunelab.cli import main
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--alpha-fc" in text and "--lambda" in text and "--round-to" in text
    assert "plateau waiting epochs" in text  # lobster's pwe help, from its options dataclass


def test_masks_hold_for_an_optimizer_the_library_never_saw():
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # momentum everywhere before pruning
        optimizer.zero_grad()
        model(torch.randn(5, 8)).sum().backward()
        optimizer.step()
    prunelab.prune(model, "magnitude", sparsity=0.5)  # the optimizer is not passed
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).sum().backward()
        optimizer.step()
    assert (model.weight[~prunelab.masks(model)["weight"]] == 0).all()
