"""The model zoo: the architectures of the reproduced papers, by name.

    from prunelab.models import build_model, list_models
    model = build_model("lenet5-caffe", init="vs-h", seed=0, relu=True)
"""

from .init import SCHEMES as INIT_SCHEMES, initialize
from .registry import ModelInfo, build_model, list_models, model_info

# Importing an architecture module registers its models.
from . import lenet, resnet_cifar, rnn, vgg, wrn  # noqa: E402,F401
from .resnet_cifar import PadShortcut, torch_pruning_pruners  # noqa: E402
from .wrn import wrn as build_wrn  # noqa: E402

__all__ = ["build_model", "list_models", "model_info", "ModelInfo", "initialize", "INIT_SCHEMES",
           "PadShortcut", "torch_pruning_pruners", "build_wrn"]
