"""The GPU-sized CIFAR study files (studies/cifar/): every run they name resolves, and each method of each
file runs here on the CPU for a step or two (one round) on 64 images, with the file's own settings otherwise
(channels-last, device "auto", the methods' options), so a typo or a broken combination shows before
anyone spends GPU hours on it."""

from pathlib import Path

import pytest
import torch

from prunelab.data.arrays import ArrayDataset
from prunelab.data.registry import DatasetSplits
from prunelab.lab import run as lab_run
from prunelab.lab.config import defaults, make_config
from prunelab.study import expand, load_spec

STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies" / "cifar").glob("*.toml"))
TINY = {"iterations": 1, "batch_size": 8, "eval_batch_size": 32, "latency": False}


def first_run_of_each_method(path):
    """The study's own methods (the dense control and the baselines run in every other study test)."""
    runs = {}
    for run in expand(load_spec(path)):
        if run.config["method"] not in ("none", "random", "magnitude"):
            runs.setdefault(run.config["method"], run)
    return runs


def test_the_cifar_studies_are_there():
    assert {p.stem for p in STUDIES} >= {"snip", "structured_resnet56_vgg16", "lobster_resnet32", "relief_resnet56",
                                         "relief_vgg16"}


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_run_resolves_for_the_gpu_when_there_is_one(path):
    for run in expand(load_spec(path)):
        config = lab_run.resolve(make_config({**defaults(), **run.config}))
        assert config.channels_last and config.device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def few_images(monkeypatch, data_root):
    """The lab's datasets cut to 64 training, 32 validation and 32 test images."""
    load = lab_run.load_dataset

    def cut(*args, **kwargs):
        sizes = (64, 32, 32)
        parts = [ArrayDataset(d.inputs[:n], d.targets[:n], d.classes, d.augment)
                 for d, n in zip(load(*args, **kwargs), sizes)]
        return DatasetSplits(*parts)

    monkeypatch.setattr(lab_run, "load_dataset", cut)
    return data_root


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_each_method_runs_a_step_on_the_cpu(path, few_images, tmp_path):
    for method, run in first_run_of_each_method(path).items():
        tiny = dict(TINY, data_root=few_images, out=str(tmp_path / Path(run.folder).name))
        if run.config.get("when", "") == "trained" or method == "relief":
            tiny.update(finetune_epochs=1, rounds=1)
        if method == "lobster":  # every epoch after the first is a plateau: a pruning phase at epoch 2
            options = {**run.config["method_options"], "pwe": 1, "plateau_tolerance": -0.5}
            tiny.update(iterations=None, epochs=2, method_options=options)
        result = lab_run.run(make_config({**defaults(), **run.config, **tiny}), progress=False, echo=None)
        assert result["error"]["test"] is not None, (path.stem, method)
        if method == "lobster":  # its file's TWT = 0 may keep every weight of an untrained network
            assert [e["epoch"] for e in result["prune_events"]] == [2]
        else:
            assert result["sparsity_all"] > 0, (path.stem, method)
