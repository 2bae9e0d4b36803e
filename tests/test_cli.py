"""The command line: listing, help, and every bad input giving one line, exit status 2, nothing lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import cli
from prunelab.models import registry as model_registry
from prunelab.training import Trainer


def run_cli(*argv, capsys):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("what,expected", [("models", "lenet300-100"), ("datasets", "fashion-mnist"),
                                           ("methods", "magnitude")])
def test_list(what, expected, capsys):
    code, out, _ = run_cli("list", what, capsys=capsys)
    assert code == 0 and expected in out


def test_help_everywhere():
    for argv in (["--help"], ["run", "--help"], ["list", "--help"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 0


BAD = [
    (["--model", "lenet9000"], ["unknown model 'lenet9000'", "lenet300-100"]),
    (["--model", "lenet300-100", "--dataset", "imagenet"], ["unknown dataset 'imagenet'", "mnist"]),
    (["--model", "lenet300-100", "--method", "prayer", "--sparsity", "0.5"], ["unknown method 'prayer'", "magnitude"]),
    (["--model", "lenet300-100", "--method", "magnitude", "--sparsity", "1.0"], ["sparsity must be in [0, 1)"]),
    (["--model", "lenet300-100", "--method", "magnitude", "--sparsity", "-0.2"], ["sparsity must be in [0, 1)"]),
    (["--model", "lenet300-100", "--method", "magnitude", "--sparsity", "lots"], ["invalid value for sparsity: 'lots'", "float"]),
    (["--model", "lenet300-100", "--epochs", "ten"], ["invalid value for epochs: 'ten'", "int"]),
    (["--model", "lenet300-100", "--method", "magnitude", "--sparsity", "0.5", "--scope", "row"], ["invalid scope 'row'", "global, layer"]),
    (["--model", "lenet300-100", "--optimizer", "lion"], ["unknown optimizer 'lion'", "sgd, adam"]),
    (["--model", "resnet20", "--dataset", "mnist"], ["expects inputs of shape (3, 32, 32)", "(1, 28, 28)"]),
    (["--model", "lenet300-100", "--model-option", "relu=true"], ["unknown option 'relu' for model 'lenet300-100'"]),
    (["--model", "lenet300-100", "--bogus-flag", "1"], ["unrecognized arguments: --bogus-flag"]),
    (["--method", "magnitude"], ["no model given", "lenet300-100"]),
    (["--model", "lenet300-100", "--method", "snip", "--sparsity", "0.9", "--method-option", "bn=eval"],
     ["unknown option(s) bn for method 'snip'", "bn_mode"]),
    (["--model", "lenet300-100", "--lr", "-1"], ["lr must be > 0, got -1.0"]),
    (["--model", "lenet300-100", "--weight-decay=-1e-4"], ["weight_decay must be >= 0"]),
    (["--model", "lenet300-100", "--nesterov", "--momentum", "0"], ["nesterov needs the sgd optimizer with momentum > 0"]),
    (["--model", "lenet300-100", "--milestones", "2,3"], ["milestones apply to lr_schedule 'multistep', not 'constant'"]),
    (["--model", "lenet300-100", "--device", "toaster"], ["invalid device 'toaster'"]),
    (["--model", "lenet300-100", "--threads", "0"], ["threads must be >= 1"]),
    (["--model", "lenet300-100", "--method", "snip", "--sparsity", "0.9", "--finetune-epochs", "3"],
     ["finetune_epochs, finetune_lr and finetune_milestones apply to pruning a trained model", "not when = 'init'"]),
    (["--model", "lenet300-100", "--method", "snip", "--sparsity", "0.9", "--reinit-init", "vs-x"],
     ["reinit_init names the initialisation of reinit's fresh draw: set reinit = true"]),
    (["--model", "lenet300-100", "--method", "snip", "--sparsity", "0.9", "--reinit", "--reinit-init", "vsx"],
     ["unknown init scheme 'vsx'"]),
    (["--model", "lstm", "--method", "pfec", "--channels", "0.5"],
     ["method 'pfec' prunes", "LSTM 'rnn'"]),
    (["--model", "lenet300-100", "--method", "pfp", "--sparsity", "0.5", "--delta", "0.1", "--method-option",
      "delta=0.2"], ["method option delta given twice"]),
]


@pytest.mark.parametrize("argv,fragments", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line_exit_2(argv, fragments, capsys, tmp_path):
    code, _, err = run_cli("run", *argv, "--out", str(tmp_path / "r"), capsys=capsys)
    assert_usage_error(code, err, *fragments)
    assert not (tmp_path / "r").exists()  # rejected before any work


@pytest.mark.parametrize("method", ["isparse", "nisp"])
def test_residual_net_refused_before_training(method, data_root, capsys, tmp_path, monkeypatch):
    if not (data_root / "cifar10" / "cifar-10-batches-py").is_dir():
        pytest.skip("CIFAR-10 not under the data root")
    monkeypatch.setattr(Trainer, "run_epoch", lambda *a, **k: pytest.fail("trained before refusing"))
    target = "--channels" if method == "nisp" else "--sparsity"
    code, _, err = run_cli("run", "--model", "resnet20", "--dataset", "cifar10", "--method", method,
                           target, "0.5", "--data-root", str(data_root), "--out", str(tmp_path / "r"),
                           capsys=capsys)
    assert_usage_error(code, err, f"{method} propagates significance along plain Conv2d/Linear chains",
                       "residual addition")
    assert not (tmp_path / "r").exists()


def test_invalid_config_key_and_bad_toml(tmp_path, capsys):
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('model = "lenet300-100"\nsparsty = 0.9\n')
    code, _, err = run_cli("run", str(bad_key), capsys=capsys)
    assert_usage_error(code, err, "invalid config key 'sparsty'", "sparsity")
    broken = tmp_path / "broken.toml"
    broken.write_text("model = \n")
    code, _, err = run_cli("run", str(broken), capsys=capsys)
    assert_usage_error(code, err, "not valid TOML")
    code, _, err = run_cli("run", str(tmp_path / "missing.toml"), capsys=capsys)
    assert_usage_error(code, err, "does not exist")
    code, _, err = run_cli("run", str(tmp_path), capsys=capsys)  # a folder
    assert_usage_error(code, err, "cannot read config file")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"model = \"\xff\xfe\"\n")
    code, _, err = run_cli("run", str(binary), capsys=capsys)
    assert_usage_error(code, err, "not valid TOML")
    for text, message in (("method_options = 3", "invalid value for method_options: 3 (expected a table)"),
                          ("milestones = [1.5, 2]", "invalid value for milestones"),
                          ('method = "pfp"\ndelta = 0.1\n[method_options]\ndelta = 0.3',
                           "method option delta given twice")):
        config = tmp_path / "c.toml"
        config.write_text(f'model = "lenet300-100"\n{text}\n')
        code, _, err = run_cli("run", str(config), capsys=capsys)
        assert_usage_error(code, err, message)


def test_a_method_flag_overrides_the_config_files_table(tmp_path, capsys):
    from prunelab.lab.config import fold_method_flags, read_toml
    config = tmp_path / "c.toml"
    config.write_text('model = "lenet300-100"\nmethod = "pfp"\nsparsity = 0.5\n[method_options]\ndelta = 0.3\n')
    assert read_toml(config)["method_options"] == {"delta": 0.3}
    code, _, err = run_cli("run", str(config), "--delta", "2", "--out", str(tmp_path / "r"), capsys=capsys)
    assert_usage_error(code, err, "delta must be in (0, 1), got 2")  # the flag's value is the one checked
    assert fold_method_flags({"delta": 0.1, "method_options": {"delta": 0.1}})["method_options"] == {"delta": 0.1}


def test_plot_and_figure_outputs_are_checked_first(tmp_path, capsys):
    code, _, err = run_cli("plot", str(tmp_path), "--out", str(tmp_path / "t.pdf"), capsys=capsys)
    assert_usage_error(code, err, "this writes a PNG file; give a name ending in .png")
    code, _, err = run_cli("figure", "snip", "--out", str(tmp_path), capsys=capsys)
    assert_usage_error(code, err, "give a name ending in .png")
    (tmp_path / "d.png").mkdir()
    code, _, err = run_cli("figure", "snip", "--out", str(tmp_path / "d.png"), capsys=capsys)
    assert_usage_error(code, err, "is a folder")
    code, _, err = run_cli("figure", "snip", "--out", str(tmp_path / "f.png"), "--dataset", "cifar10", capsys=capsys)
    assert_usage_error(code, err, "figure snip maps LeNet-300-100's 28x28 input pixels")
    assert not (tmp_path / "f.png").exists()


def test_model_with_no_prunable_layers(tmp_path, capsys, monkeypatch, data_root):
    from torch import nn
    info = model_registry.ModelInfo("identity", "no layers", "mnist", (1, 28, 28),
                                    lambda num_classes: nn.Sequential(nn.Flatten(), nn.ReLU()))
    monkeypatch.setitem(model_registry._REGISTRY, "identity", info)
    code, _, err = run_cli("run", "--model", "identity", "--data-root", str(data_root),
                           "--out", str(tmp_path / "r"), capsys=capsys)
    assert_usage_error(code, err, "no prunable parameters", "Linear")


def test_missing_and_corrupt_data_files(tmp_path, capsys, data_root):
    empty = tmp_path / "empty"
    (empty / "mnist").mkdir(parents=True)
    # a missing file would be downloaded; point the mirror at a closed local port so it fails fast
    os.environ["PRUNELAB_DATA_URL"] = "http://127.0.0.1:9/"
    try:
        code, _, err = run_cli("run", "--model", "lenet300-100", "--data-root", str(empty),
                               "--out", str(tmp_path / "r1"), capsys=capsys)
    finally:
        del os.environ["PRUNELAB_DATA_URL"]
    assert_usage_error(code, err, "train-images-idx3-ubyte.gz")
    corrupt = tmp_path / "corrupt" / "mnist"
    corrupt.mkdir(parents=True)
    for f in (data_root / "mnist").glob("*.gz"):
        data = bytearray(f.read_bytes())
        if f.name.startswith("t10k-labels"):
            data[100] ^= 0xFF
        (corrupt / f.name).write_bytes(bytes(data))
    code, _, err = run_cli("run", "--model", "lenet300-100", "--data-root", str(corrupt.parent),
                           "--out", str(tmp_path / "r2"), capsys=capsys)
    assert_usage_error(code, err, "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")


def test_failed_run_leaves_earlier_results_untouched(tmp_path, capsys, data_root):
    out = tmp_path / "r"
    argv = ["run", "--model", "lenet300-100", "--iterations", "20", "--data-root", str(data_root),
            "--no-latency", "--out", str(out), "--quiet"]
    code, printed, _ = run_cli(*argv, capsys=capsys)
    assert code == 0 and "test error" in printed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(*argv[:-1], "--method", "magnitude", "--sparsity", "2", capsys=capsys)
    assert_usage_error(code, err, "sparsity")
    code, _, err = run_cli(*argv[:-1], "--lr", "0.5", capsys=capsys)  # a different config, same folder
    assert_usage_error(code, err, "different config")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert json.loads((out / "result.json").read_text())["method"] == "none"


def test_config_file_flags_override_and_roundtrip(tmp_path, capsys, data_root):
    config = tmp_path / "c.toml"
    config.write_text(f'model = "lenet300-100"\nmethod = "random"\nsparsity = 0.5\niterations = 10\n'
                      f'latency = false\ndata_root = "{data_root}"\nout = "{tmp_path / "r"}"\n')
    code, _, _ = run_cli("run", str(config), "--sparsity", "0.8", "--quiet", capsys=capsys)
    assert code == 0
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["target"]["sparsity"] == 0.8 and result["sparsity"] == pytest.approx(0.8, abs=1e-12)
    # the stored config reproduces the run: running it again finds the finished run and resumes nothing
    code, _, _ = run_cli("run", str(tmp_path / "r" / "config.toml"), "--quiet", capsys=capsys)
    assert code == 0


def test_console_script_exit_status(tmp_path):
    script = Path(sys.executable).with_name("prunelab")
    if not script.exists():
        pytest.skip("prunelab is not installed as a console script in this environment")
    proc = subprocess.run([str(script), "run", "--model", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown model 'nope'" in proc.stderr


def test_every_config_key_is_a_documented_flag(capsys):
    from prunelab.lab.config import FIELDS, HELP
    assert set(HELP) == set(FIELDS)
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert (flag.removesuffix("s") if name.endswith("_options") else flag) in text, name


@pytest.mark.parametrize("argv, message", [
    (["--method", "relief", "--alpha-fc", "1.5"], "alpha_fc must be in (0, 1]"),
    (["--method", "snip", "--sparsity", "0.9", "--method-option", "bn_mode=bogus"], "bn_mode must be one of"),
    (["--method", "pfp", "--sparsity", "0.5", "--method-option", "delta=2"], "delta must be in (0, 1)"),
    (["--method", "pfp", "--sparsity", "0.5", "--mode", "greedy"], "mode must be one of"),  # --mode is shared
    (["--method", "pfp", "--sparsity", "0.5", "--round-to", "0"], "round_to must be a positive integer"),
    (["--method", "snip", "--sparsity", "0.5", "--delta", "0.1"], "delta"),  # not a snip option
    (["--method", "isparse", "--sparsity", "0.5", "--method-option", "output=max"], "output must be one of"),
    (["--method", "lobster", "--pwe", "many"], "option pwe must be int"),
    (["--method", "synflow", "--sparsity", "0.9", "--method-option", "rounds=2.5"], "option rounds must be int"),
])
def test_method_flags_take_dashes_and_bad_values_stop_before_training(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    code, _, err = run_cli("run", "--model", "lenet300-100", *argv, "--out", str(out), capsys=capsys)
    assert_usage_error(code, err, message)
    assert not out.exists()


def test_corrupt_run_files_give_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text("[1]")
    code, _, err = run_cli("plot", str(run), "--out", str(tmp_path / "t.png"), capsys=capsys)
    assert_usage_error(code, err, "result.json is corrupt: expected a JSON object, found list")
    (run / "result.json").unlink()
    (run / "state.json").write_text("[1]")
    code, _, err = run_cli("run", "--model", "lenet300-100", "--out", str(run), capsys=capsys)
    assert_usage_error(code, err, "state.json is corrupt")
