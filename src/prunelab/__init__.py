"""prunelab: neural-network pruning methods behind one API, and a lab that reproduces their papers.

    import prunelab
    train, val, test = prunelab.load_dataset("mnist")
    model = prunelab.build_model("lenet300-100", seed=0)
    report = prunelab.prune(model, "magnitude", sparsity=0.9)
    prunelab.masks(model)      # {"fc1.weight": bool tensor, ...}
"""

__version__ = "0.1.0"

from .checkpoint import load_model, save_model
from .data import list_datasets, load_dataset
from .errors import PrunelabError, TrainingDiverged
from .masking import make_permanent, masks
from .models import build_model, list_models
from .pruning import LayerCollapseWarning, PruneReport, list_methods, prune, scores
from .structure import compact, load_compact, save_compact
from .training import TrainConfig, Trainer, evaluate

__all__ = [
    "LayerCollapseWarning", "PruneReport", "PrunelabError", "TrainConfig", "Trainer", "TrainingDiverged",
    "build_model", "compact", "evaluate", "list_datasets", "list_methods", "list_models", "load_compact",
    "load_dataset", "load_model", "make_permanent", "masks", "prune", "save_compact", "save_model", "scores",
]
