"""The channel graph: which output channels of a model are coupled and must be removed together.

Coupling comes from torch-pruning's ``DependencyGraph`` (a traced graph of which layers must lose a
channel together: residual adds, flatten -> Linear, BatchNorm after a conv). :func:`channel_graph`
turns it into plain data, keyed by the module names of ``model.named_modules()``:

* a :class:`ChannelGroup` is one set of coupled channels, named by its root layer (the first Conv or
  Linear that produces it). Its ``producers`` write the channel (weight rows of Conv2d/Linear,
  BatchNorm entries, the zero-padding shortcut of option-A ResNets), its ``consumers`` read it (input
  slices of Conv2d/Linear, the shortcut's input). ``index[r]`` lists, for channel ``r`` of the group,
  the positions along that module's channel dimension (a Linear after a flatten reads one conv
  channel as H*W features).
* a group is *safe* when exactly one Conv/Linear produces it (plus BatchNorm and depthwise convs) and
  only Conv/Linear layers read it: removing a channel then touches one filter and its readers, with no
  residual add (a heads group is safe when only its query/key/value layers write it).
  PFEC/SoftNet prune only safe groups (PFEC's "first conv of each residual block").
* a group without consumers is the network output: never removed.
* Conv1d/Conv2d/Conv3d with ``groups=1`` are "conv"; a depthwise conv (``groups == in_channels ==
  out_channels``, MobileNet) is "depthwise": it carries channel c to channel c (one filter per channel),
  so it is coupled with the layer that writes its input and its channels leave together (weight row,
  BatchNorm entries, the next layer's input slice). Other grouped convs are "other" (not removed).
* attention heads (:func:`attention_modules`): a group written by exactly the query, key and value
  Linear layers of one Hugging Face style self-attention (``query``/``key``/``value`` children and an
  ``attention_head_size``, as in BERT/RoBERTa) has one *unit per head* (``heads`` names the attention
  module): ``index[h]`` lists the head's positions in each layer, so a removed unit is a whole head.
* a group is *blocked* (``blocked`` gives the reason) when one of its layers is called more than once
  per forward pass (a shared module: its channels feed itself, and torch-pruning's trace keeps one node
  per call), holds a weight tied to another module (removing channels would cut the other module too),
  or torch-pruning maps two of its channels to one position of a layer (a reshape such as
  ``view(-1, 2, 4).sum(1)`` that its index mapping does not follow): its channels are never removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import PrunelabError

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Slice:
    """One module's share of a channel group: ``index[r]`` = its positions for group channel ``r``.

    ``kind``: "conv" (Conv1d/2d/3d, groups=1), "linear", "norm" (BatchNorm), "depthwise" (a depthwise
    conv: channel c in, channel c out), "shortcut" (option-A zero-pad shortcut) or "other" (anything
    else that carries parameters or channel maps; blocks removal).
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
    heads: str | None = None       # the attention module whose heads are this group's units (q/k/v rows)
    blocked: str | None = None     # why no channel of this group may be removed (shared module, tied weight)

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
        """One Conv/Linear writes the channels (plus BatchNorm and depthwise convs that carry them on), or
        the query/key/value layers of one attention module write its heads, and only Conv/Linear layers
        read them; no layer of the group is shared or tied."""
        if self.is_output or self.blocked is not None:
            return False
        if not all(s.kind in ("conv", "linear") for s in self.consumers):
            return False
        if self.heads is not None:
            return all(s.kind == "linear" for s in self.producers)
        return (len(self.layers) == 1
                and all(s.kind in ("conv", "linear", "norm", "depthwise") for s in self.producers))

    @property
    def has_other(self) -> bool:
        """A layer that blocks removal: an unsupported layer, or the group is blocked (shared/tied)."""
        return self.blocked is not None or any(s.kind == "other" for s in self.producers + self.consumers)


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    _dg: Any = field(default=None, repr=False)       # the torch-pruning DependencyGraph (for compact)
    _model: Any = field(default=None, repr=False)
    calls: dict[str, int] = field(default_factory=dict)  # forward calls of each module in the traced pass

    def reused(self, modules=None) -> list[tuple[str, int]]:
        """(module, calls) of the layers called more than once in the traced pass (among ``modules``)."""
        return [(n, c) for n, c in self.calls.items() if c > 1 and (modules is None or n in modules)]

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


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise conv: one filter per channel (groups == in_channels == out_channels > 1)."""
    return (isinstance(module, _CONVS) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _kind(module: nn.Module) -> str | None:
    from ..models.resnet_cifar import PadShortcut

    if isinstance(module, _CONVS):
        if module.groups == 1:
            return "conv"
        return "depthwise" if is_depthwise(module) else "other"
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


def check_example(example_input, what: str = "example_input"):
    """Refuse, in one line, an example that is neither a batch tensor nor a dict of batch tensors."""
    if torch.is_tensor(example_input):
        if example_input.dim() < 1:
            raise PrunelabError(f"{what} must be a batch (N, ...) that the model accepts, got a scalar tensor")
        return
    if isinstance(example_input, Mapping) and example_input and all(
            torch.is_tensor(v) and v.dim() >= 1 for v in example_input.values()):
        if len({int(v.shape[0]) for v in example_input.values()}) != 1:
            raise PrunelabError(f"{what}: the tensors of the dict must hold the same number of examples")
        return
    raise PrunelabError(f"{what} must be a batch tensor (N, ...) or a dict of batch tensors (keyword inputs "
                        f"such as input_ids, attention_mask), got {type(example_input).__name__}")


def _dependency_graph(model: nn.Module, example, calls: dict[str, int] | None = None):
    """torch-pruning's DependencyGraph of ``model`` traced on ``example`` (a tensor, or a dict of keyword
    tensors); ``calls`` (filled in) counts the forward calls of each named module."""
    import torch_pruning as tp

    from ..data import feed

    modes = {m: m.training for m in model.modules()}
    example = feed.to_model(model, example)
    handles = []
    if calls is not None:
        for name, module in model.named_modules():
            if name and any(True for _ in module.parameters(recurse=False)):
                def count(_module, _args, name=name):
                    calls[name] = calls.get(name, 0) + 1
                handles.append(module.register_forward_pre_hook(count))
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=_pruners(), verbose=False,
                forward_fn=None if isinstance(example, Mapping) else (lambda m, x: m(x)))
    except Exception as error:  # tracing failures come in every type; name the model and the cause
        first = (str(error).strip().splitlines() or [""])[0]
        raise PrunelabError(f"cannot trace {type(model).__name__} for channel coupling "
                            f"(torch-pruning): {type(error).__name__}: {first}") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():  # tracing switches to eval() and does not switch back
            module.train(mode)
    return dg


def channel_graph(model: nn.Module, example_input) -> ChannelGraph:
    """The coupled output-channel groups of ``model`` (traced on ``example_input``, a batch tensor or a
    dict of keyword tensors; model unchanged)."""
    from ..data import feed

    check_example(example_input)
    calls: dict[str, int] = {}
    dg = _dependency_graph(model, feed.take(example_input, slice(0, 1)), calls)
    names = {id(m): n for n, m in model.named_modules()}
    heads = attention_modules(model)
    ties = _tied(model)
    groups = []
    for group in dg.get_all_groups(root_module_types=_CONVS + (nn.Linear,)):
        g = _blocked(_group(dg, group, names), calls, ties)
        groups.append(_as_heads(g, heads) if g.blocked is None else g)
    return ChannelGraph(groups, dg, model, calls)


def attention_modules(model: nn.Module) -> dict[str, tuple[tuple[str, str, str], int]]:
    """``{module: ((query, key, value), head size)}`` for each Hugging Face style self-attention: a
    module with ``query``, ``key`` and ``value`` Linear children of equal width and an
    ``attention_head_size`` (BERT, RoBERTa, ...)."""
    found = {}
    for name, module in model.named_modules():
        size = getattr(module, "attention_head_size", None)
        parts = [getattr(module, k, None) for k in ("query", "key", "value")]
        if not isinstance(size, int) or size < 1 or not all(isinstance(p, nn.Linear) for p in parts):
            continue
        if len({p.out_features for p in parts}) != 1 or parts[0].out_features % size:
            continue
        prefix = f"{name}." if name else ""
        found[name] = (tuple(prefix + k for k in ("query", "key", "value")), size)
    return found


def set_heads(model: nn.Module, attention: str) -> None:
    """Update an attention module's head count after its query/key/value rows were cut (whole heads)."""
    module = model.get_submodule(attention)
    size = module.attention_head_size
    heads = module.query.out_features // size
    module.num_attention_heads = heads
    if hasattr(module, "all_head_size"):
        module.all_head_size = heads * size


def _as_heads(group: ChannelGroup, heads: dict) -> ChannelGroup:
    """A group written by exactly the query/key/value layers of one attention module, in head units."""
    writers = {s.module for s in group.producers}
    for attention, (qkv, size) in heads.items():
        if writers != set(qkv) or group.size % size:
            continue
        n = group.size // size

        def per_head(s: Slice) -> Slice:
            index = tuple(tuple(sorted({i for c in range(h * size, (h + 1) * size) for i in s.index[c]}))
                          for h in range(n))
            return Slice(s.module, s.kind, index)

        return ChannelGroup(group.root, n, tuple(per_head(s) for s in group.producers),
                            tuple(per_head(s) for s in group.consumers), heads=attention)
    return group


def _tied(model: nn.Module) -> dict[str, str]:
    """``{module: other holder}`` for every module holding a parameter that another module holds too."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for _, p in module.named_parameters(recurse=False):
            if name not in holders.setdefault(id(p), []):
                holders[id(p)].append(name)
    tied = {}
    for names in holders.values():
        for n in names:
            others = [o for o in names if o != n]
            if others:
                tied.setdefault(n, others[0])
    return tied


def _blocked(group: ChannelGroup, calls: dict[str, int], ties: dict[str, str]) -> ChannelGroup:
    for s in group.producers + group.consumers:
        if s.kind in ("conv", "linear", "norm", "depthwise"):
            seen: set[int] = set()
            for ix in s.index:
                if seen.intersection(ix):
                    why = (f"torch-pruning maps two channels to one position of {s.module!r} (a reshape or "
                           f"reduction it cannot follow)")
                    return replace(group, blocked=why)
                seen.update(ix)
    for s in group.producers + group.consumers:
        if calls.get(s.module, 0) > 1:
            why = (f"layer {s.module!r} is called {calls[s.module]} times per forward pass (a shared module: "
                   f"its channels are coupled across the calls)")
            return replace(group, blocked=why)
        if s.module in ties:
            why = (f"layer {s.module!r} holds a weight tied to {ties[s.module] or 'the model'!r} (removing its "
                   f"channels would cut that module too)")
            return replace(group, blocked=why)
    return group


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
