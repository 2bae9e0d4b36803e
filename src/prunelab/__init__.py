"""prunelab: neural-network pruning methods behind one API, and a lab that reproduces their papers.

    import prunelab
    report = prunelab.prune(model, "snip", sparsity=0.9, data=loader)   # your model, your DataLoader
    prunelab.masks(model)      # {"fc1.weight": bool tensor, ...}

The public API is ``__all__`` (documented in docs/api.md); ``prunelab.schedules`` drives pruning from
your training loop, ``prunelab.structure`` removes pruned channels physically.
"""

__version__ = "0.2.0"

from . import distributed, export, inference, masking, metrics, schedules, sparse, structure
from .checkpoint import load_model, save_model
from .data import ArrayDataset, list_datasets, load_dataset
from .data.feed import Feed
from .errors import PrunelabError, TrainingDiverged
from .masking import make_permanent, masks
from .methods import Method, get_method, register
from .models import build_model, list_models
from .options import Options, option
from .pruning import LayerCollapseWarning, PruneReport, list_methods, prune, scores
from .structure import compact, load_compact, save_compact
from .training import TrainConfig, Trainer, evaluate

__all__ = [
    "ArrayDataset", "Feed", "LayerCollapseWarning", "Method", "Options", "PruneReport", "PrunelabError",
    "TrainConfig", "Trainer", "TrainingDiverged", "build_model", "compact", "distributed", "evaluate", "export",
    "get_method", "inference", "list_datasets", "list_methods", "list_models", "load_compact", "load_dataset",
    "load_model", "make_permanent", "masking", "masks", "metrics", "option", "prune", "register", "save_compact",
    "save_model", "schedules", "scores", "sparse", "structure",
]
