"""The channel graph: which output channels of a model are coupled and must be removed together.

Coupling comes from torch-pruning's ``DependencyGraph`` (a traced graph of which layers must lose a
channel together: residual adds, flatten -> Linear, BatchNorm after a conv). :func:`channel_graph`
turns it into plain data, keyed by the module names of ``model.named_modules()``:

* a :class:`ChannelGroup` is one set of coupled channels, named by its root layer (the first Conv2d or
  Linear that produces it). Its ``producers`` write the channel (weight rows of Conv2d/Linear,
  BatchNorm entries, the zero-padding shortcut of option-A ResNets), its ``consumers`` read it (input
  slices of Conv2d/Linear, the shortcut's input). ``index[r]`` lists, for channel ``r`` of the group,
  the positions along that module's channel dimension (a Linear after a flatten reads one conv
  channel as H*W features).
* a group is *safe* when exactly one Conv2d/Linear produces it (plus BatchNorm) and only Conv2d/Linear
  layers read it: removing a channel then touches one filter and its readers, with no residual add.
  PFEC/SoftNet prune only safe groups (PFEC's "first conv of each residual block").
* a group without consumers is the network output: never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PrunelabError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Slice:
    """One module's share of a channel group: ``index[r]`` = its positions for group channel ``r``.

    ``kind``: "conv" (Conv2d, groups=1), "linear", "norm" (BatchNorm), "shortcut" (option-A zero-pad
    shortcut) or "other" (anything else that carries parameters or channel maps; blocks removal).
    """

    module: str
    kind: str
    index: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGroup:
    root: str                      # the Conv2d/Linear whose output channels define the group
    size: int                      # number of channels
    producers: tuple[Slice, ...]   # output dims (weight rows, bias, BatchNorm entries, shortcut outputs)
    consumers: tuple[Slice, ...]   # input dims (weight columns / input-channel slices, shortcut inputs)

    @property
    def is_output(self) -> bool:
        """No layer reads this group: it is (part of) the network output and is never removed."""
        return not self.consumers

    @property
    def layers(self) -> list[Slice]:
        """The Conv2d/Linear producers (weight rows)."""
        return [s for s in self.producers if s.kind in ("conv", "linear")]

    @property
    def safe(self) -> bool:
        """One Conv2d/Linear (plus BatchNorm) writes the channels and only Conv2d/Linear layers read them."""
        return (not self.is_output and len(self.layers) == 1
                and all(s.kind in ("conv", "linear", "norm") for s in self.producers)
                and all(s.kind in ("conv", "linear") for s in self.consumers))

    @property
    def has_other(self) -> bool:
        return any(s.kind == "other" for s in self.producers + self.consumers)


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    _dg: Any = field(default=None, repr=False)       # the torch-pruning DependencyGraph (for compact)
    _model: Any = field(default=None, repr=False)

    def producing(self, module: str) -> tuple[int, Slice] | None:
        """(group index, slice) of the group whose channels ``module`` writes."""
        for g, group in enumerate(self.groups):
            for s in group.producers:
                if s.module == module:
                    return g, s
        return None

    def consuming(self, module: str) -> tuple[int, Slice] | None:
        """(group index, slice) of the group whose channels ``module`` reads (None: the model input)."""
        for g, group in enumerate(self.groups):
            for s in group.consumers:
                if s.module == module:
                    return g, s
        return None


def _kind(module: nn.Module) -> str | None:
    from ..models.resnet_cifar import PadShortcut

    if isinstance(module, nn.Conv2d):
        return "conv" if module.groups == 1 else "other"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, PadShortcut):
        return "shortcut"
    if any(True for _ in module.parameters(recurse=False)):
        return "other"
    return None  # parameter-free (activation, pooling): carries channels unchanged


def shortcut_destination(module, i: int):
    """The output channel that input channel ``i`` of an option-A shortcut (PadShortcut) lands in."""
    dst = module.dst
    return (module.pad_front + i) if dst is None else dst[i]


def _pruners() -> dict:
    from ..models import torch_pruning_pruners
    return torch_pruning_pruners()


def _dependency_graph(model: nn.Module, example: torch.Tensor):
    import torch_pruning as tp

    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                       customized_pruners=_pruners(), verbose=False)
    except Exception as error:  # tracing failures come in every type; name the model and the cause
        raise PrunelabError(f"cannot trace {type(model).__name__} for channel coupling "
                            f"(torch-pruning): {type(error).__name__}: {error}") from None
    finally:
        for module, mode in modes.items():  # tracing switches to eval() and does not switch back
            module.train(mode)
    return dg


def channel_graph(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """The coupled output-channel groups of ``model`` (traced on ``example_input``; model unchanged)."""
    if not torch.is_tensor(example_input) or example_input.dim() < 2:
        raise PrunelabError("example_input must be a batch tensor (N, ...) that the model accepts")
    device = next(model.parameters()).device
    dg = _dependency_graph(model, example_input[:1].to(device))
    names = {id(m): n for n, m in model.named_modules()}
    groups = [_group(dg, group, names) for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear))]
    return ChannelGraph(groups, dg, model)


def _group(dg, group, names: dict[int, str]) -> ChannelGroup:
    """One torch-pruning group as a ChannelGroup: per named module, its positions of each root channel."""
    size = len(group[0].idxs)
    producers: dict[str, tuple[str, list[list[int]]]] = {}
    consumers: dict[str, tuple[str, list[list[int]]]] = {}
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        name = names.get(id(module))
        if name is None:
            continue  # torch-pruning's pseudo nodes (elementwise, reshape, slice)
        kind = _kind(module)
        if kind is None:
            continue
        out = dg.is_out_channel_pruning_fn(dep.handler)
        if kind == "norm":
            out = True  # BatchNorm prunes its in and out channels with one function
        side = producers if out else consumers
        entry = side.setdefault(name, (kind, [[] for _ in range(size)]))
        for idx, root in zip(idxs, item.root_idxs):
            if int(idx) not in entry[1][int(root)]:
                entry[1][int(root)].append(int(idx))

    def freeze(side):
        return tuple(Slice(n, k, tuple(tuple(sorted(ix)) for ix in index)) for n, (k, index) in side.items())

    return ChannelGroup(names[id(group[0].dep.target.module)], size, freeze(producers), freeze(consumers))
