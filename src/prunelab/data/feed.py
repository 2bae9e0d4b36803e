"""Any PyTorch data, resolved once: how to draw examples from it, batch it, and feed a model with it.

Every function of prunelab that takes data (``prune``, ``scores``, ``Trainer``, ``evaluate``, each
criterion) turns it into a :class:`Feed` here, so that all of them accept the same forms:

* a torch ``Dataset`` (map-style: ``__len__`` and ``__getitem__``), our ``ArrayDataset`` included;
* a ``DataLoader`` (training and evaluation iterate it as it is: its batch size, sampler and workers;
  seeded draws of examples index its ``dataset`` and use its ``collate_fn``);
* an ``(inputs, targets)`` pair of tensors, or a tensor of inputs alone;
* any other iterable of batches (an ``IterableDataset``, a generator function's result): used in order.

A sample or batch is a ``(inputs, targets, ...)`` tuple or list, a dict, or a tensor of inputs. A dict
gives its targets under ``target_key`` (default: the first of ``labels``, ``label``, ``targets``,
``target``, ``y``); the rest are the model's inputs, passed as keyword arguments (``model(**inputs)``, as
Hugging Face models take them), unless a single entry named ``x``, ``input``, ``inputs``, ``image`` or
``images`` remains, which is passed positionally. Inputs may have any shape and dtype (token ids too).

Seeded draws (:meth:`Feed.draw`) pick examples by index: ``randperm(len, generator)[:n]``, or every
example in order when the data holds no more than ``n``. The same seed therefore draws the same examples
from a pair, a ``TensorDataset``, a ``Dataset`` of dicts and a ``DataLoader`` over any of them; an
iterable without ``__len__`` gives its first ``n`` examples instead (:attr:`Feed.seekable` is False).

A model's output may be a tensor, a dict or an object with ``logits`` (a Hugging Face ``ModelOutput``), or
a tuple whose first entry is the logits; ``get_logits=`` takes a callable for anything else. The loss is
``loss_fn(logits, targets)``, by default cross-entropy over the last dimension (sequence outputs are
flattened; targets of -100 are ignored, the Hugging Face convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from ..errors import PrunelabError

Inputs = Tensor | dict[str, Tensor]
TARGET_KEYS = ("labels", "label", "targets", "target", "y")
POSITIONAL_KEYS = ("x", "input", "inputs", "image", "images")
IGNORE_INDEX = -100


# --- inputs: a tensor or a dict of tensors, indexed along the first dimension ----------------------------

def count(inputs: Inputs) -> int:
    """Number of examples in a batch of inputs."""
    if isinstance(inputs, Mapping):
        return len(next(iter(inputs.values())))
    return inputs.shape[0]


def take(inputs: Inputs, index) -> Inputs:
    """Rows ``index`` (a slice, an index tensor) of every input tensor."""
    if isinstance(inputs, Mapping):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def chunks(inputs: Inputs, size: int | None) -> Iterator[Inputs]:
    """Consecutive batches of at most ``size`` examples (one batch when ``size`` is None)."""
    n = count(inputs)
    size = size or max(n, 1)
    for start in range(0, n, size):
        yield take(inputs, slice(start, start + size))


def concat(parts: list) -> Any:
    """Batches (inputs or targets) joined along the first dimension."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def to_model(model: nn.Module, inputs: Inputs) -> Inputs:
    """Inputs on the model's device; floating ones in its dtype (integer token ids stay integers)."""
    reference = next(model.parameters(), None)
    if reference is None:  # a model without parameters takes the inputs as they are
        return inputs

    def move(t: Tensor) -> Tensor:
        return t.to(reference.device, reference.dtype) if t.is_floating_point() else t.to(reference.device)

    if isinstance(inputs, Mapping):
        return {k: move(v) for k, v in inputs.items()}
    return move(inputs)


def channels_last(inputs: Inputs) -> Inputs:
    """A 4-D tensor (an image batch) in the channels-last memory layout; any other input as it is."""
    if isinstance(inputs, Tensor) and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def call(model: nn.Module, inputs: Inputs):
    """``model(inputs)``, or ``model(**inputs)`` for a dict of keyword inputs."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def default_logits(output) -> Tensor:
    """The logits of a model's output: the tensor itself, ``.logits``, ``["logits"]``, or a tuple's first."""
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not torch.is_tensor(logits):
        raise PrunelabError(f"cannot find the logits in the model's output ({type(output).__name__}); pass "
                            "get_logits=callable that returns them")
    return logits


def default_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the last dimension; sequence outputs flattened, targets of -100 ignored."""
    if logits.dim() > 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)


def parse_shape(shape, what: str) -> tuple[int, ...]:
    """One example's input shape from a sequence of ints, an int, or text such as ``1,28,28`` / ``1x28x28``."""
    if isinstance(shape, str):
        try:
            shape = [int(p) for p in shape.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise PrunelabError(f"{what}: input_shape must be integers like 1,28,28; got {shape!r}") from None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise PrunelabError(f"{what}: input_shape must be a sequence of integers, got {shape!r}") from None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise PrunelabError(f"{what}: input_shape must be positive integers, got {shape!r}")
    return shape


def example_input(model: nn.Module, data=None, input_shape=None, what: str = "method") -> Inputs:
    """One example batch to trace ``model`` with, on its device and in its dtype: the first example of
    ``data``, else zeros of ``input_shape``, else zeros of a ``model.input_shape`` attribute."""
    if data is not None:
        return to_model(model, as_feed(data).example())
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise PrunelabError(f"{what} needs an example input to trace the model: pass data=... or the "
                            "input_shape option, e.g. input_shape=(1, 28, 28)")
    return to_model(model, torch.zeros(1, *parse_shape(shape, what)))


# --- the feed ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Draw:
    """Examples drawn from a feed: inputs, targets (None for unlabelled data) and how they were drawn."""

    inputs: Inputs
    targets: Tensor | None
    source: str  # "drawn with the seed", "all, in order", "the first N in iteration order"

    def __len__(self) -> int:
        return count(self.inputs)


class Feed:
    """Data in any PyTorch form, with the loss and the logits adapter used to score a model on it."""

    def __init__(self, data, *, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                 get_logits: Callable[[Any], Tensor] | None = None, target_key: str | None = None):
        if data is None:
            raise PrunelabError("no data given (pass data=...)")
        self.data = data
        self.loss_fn = loss_fn or default_loss
        self.get_logits = get_logits or default_logits
        self.target_key = target_key
        self.examples_drawn = 0  # examples handed out by draw()/rows(): what a method reports it used
        self._tensors = _as_tensors(data)   # (inputs, targets) when the examples already sit in tensors
        self._loader = data if isinstance(data, DataLoader) else None
        dataset = data.dataset if self._loader is not None else data
        self._map = dataset if _is_map_style(dataset) else None  # indexable by example
        self._collate = self._loader.collate_fn if self._loader is not None else default_collate
        if self._tensors is None and self._map is None and not isinstance(data, Iterable):
            raise PrunelabError(f"data must be a torch Dataset, a DataLoader, an iterable of batches or an "
                                f"(inputs, targets) pair of tensors, got {type(data).__name__}")

    def __repr__(self) -> str:
        return f"Feed({type(self.data).__name__}, examples={self.length})"

    # -- what it holds --
    @property
    def seekable(self) -> bool:
        """True when examples can be drawn by index (a seeded draw); False for a plain iterable."""
        return self._tensors is not None or self._map is not None

    @property
    def length(self) -> int | None:
        """Number of examples, or None for an iterable of unknown length."""
        if self._tensors is not None:
            return count(self._tensors[0])
        if self._map is not None:
            return len(self._map)
        return None

    def __len__(self) -> int:
        if self.length is None:
            raise PrunelabError(f"the data ({type(self.data).__name__}) has no length")
        return self.length

    def example(self) -> Inputs:
        """The inputs of the first example, as a batch of one (to trace a model's structure)."""
        if self._tensors is not None:
            if count(self._tensors[0]) == 0:
                raise PrunelabError("the data holds no examples")
            return take(self._tensors[0], slice(0, 1))
        if self._map is not None:
            if len(self._map) == 0:
                raise PrunelabError("the data holds no examples")
            return self._split(self._collate([self._map[0]]))[0]
        for inputs, _ in self.batches():
            return take(inputs, slice(0, 1))
        raise PrunelabError("the data holds no examples")

    def input_shape(self) -> tuple[int, ...]:
        """One example's input shape (without the batch dimension); a dict of inputs has none."""
        example = self.example()
        if isinstance(example, Mapping):
            raise PrunelabError("the inputs are a dict of tensors: give the method's input_shape option")
        return tuple(example.shape[1:])

    def targets(self) -> Tensor:
        """Every example's target, in order (GraSP's class-balanced draws need them)."""
        if self._tensors is not None and self._tensors[1] is not None:
            return self._tensors[1]
        if self._map is not None:
            targets = [self._split(self._collate([self._map[i]]))[1] for i in range(len(self._map))]
            if any(t is None for t in targets):
                raise PrunelabError("this needs labelled data: the examples hold no targets")
            return torch.cat(targets)
        raise PrunelabError(f"the targets of every example are needed: give a Dataset or an (inputs, targets) "
                            f"pair, not {type(self.data).__name__}")

    # -- drawing examples --
    def draw(self, n: int, generator: torch.Generator | None = None) -> Draw:
        """``n`` examples drawn without replacement with ``generator`` (every example, in order, when the
        data holds no more than ``n``; the first ``n`` of an iterable)."""
        drawn = self._draw(n, generator)
        self.examples_drawn += len(drawn)
        return drawn

    def _draw(self, n: int, generator: torch.Generator | None) -> Draw:
        if self.seekable:
            total = len(self)
            if total == 0:
                raise PrunelabError("the data holds no examples")
            if n >= total:
                return self._rows(None, "all, in order")
            return self._rows(torch.randperm(total, generator=generator)[:n], "drawn with the seed")
        inputs, targets, seen = [], [], 0
        for x, y in self.batches():
            inputs.append(x)
            targets.append(y)
            seen += count(x)
            if seen >= n:
                break
        if not inputs:
            raise PrunelabError("the data holds no examples")
        inputs, targets = concat(inputs), concat(targets)
        if seen > n:
            inputs, targets = take(inputs, slice(0, n)), None if targets is None else targets[:n]
        return Draw(inputs, targets, f"the first {min(seen, n)} in iteration order")

    def rows(self, index: Tensor) -> Draw:
        """The examples at ``index`` (a seekable feed only)."""
        if not self.seekable:
            raise PrunelabError(f"examples cannot be drawn by index from {type(self.data).__name__}; give a "
                                "Dataset or an (inputs, targets) pair")
        drawn = self._rows(index, "drawn with the seed")
        self.examples_drawn += len(drawn)
        return drawn

    def _rows(self, index: Tensor | None, source: str) -> Draw:
        if self._tensors is not None:
            inputs, targets = self._tensors
            if index is None:
                return Draw(inputs, targets, source)
            return Draw(take(inputs, index), None if targets is None else targets[index], source)
        order = range(len(self._map)) if index is None else index.tolist()
        inputs, targets = self._split(self._collate([self._map[i] for i in order]))
        return Draw(inputs, targets, source)

    # -- batches --
    def batches(self, batch_size: int | None = None, *, shuffle: bool = False, seed: int | None = None,
                drop_last: bool = False) -> Iterator[tuple[Inputs, Tensor | None]]:
        """``(inputs, targets)`` batches. A DataLoader or plain iterable gives its own batches (shuffled by its
        own sampler, which draws from the global RNG that the trainer seeds); other data is cut into
        ``batch_size`` batches, shuffled with ``seed``."""
        if self._loader is not None or not self.seekable:
            for batch in self.data:
                yield self._split(batch)
            return
        if hasattr(self.data, "batches"):  # ArrayDataset: tensor slicing, its augmentation when shuffled
            yield from self.data.batches(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
            return
        if batch_size is None or batch_size < 1:
            raise PrunelabError(f"batch_size must be a positive integer, got {batch_size!r}")
        total = len(self)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        stop = total - total % batch_size if drop_last else total
        for start in range(0, stop, batch_size):
            index = torch.arange(start, min(start + batch_size, total)) if order is None else \
                order[start:start + batch_size]
            draw = self._rows(index, "")
            yield draw.inputs, draw.targets

    def num_batches(self, batch_size: int | None = None, drop_last: bool = False) -> int:
        """Batches per pass (``len(loader)`` for a DataLoader)."""
        if self._loader is not None:
            return len(self._loader)
        if self.length is None:
            raise PrunelabError(f"the data ({type(self.data).__name__}) has no length: give a training budget "
                                "in iterations")
        total = len(self)
        return total // batch_size if drop_last else -(-total // batch_size)

    def _split(self, batch) -> tuple[Inputs, Tensor | None]:
        """A collated batch as (inputs, targets)."""
        if torch.is_tensor(batch):
            return batch, None
        if isinstance(batch, Mapping):
            key = self.target_key or next((k for k in TARGET_KEYS if k in batch), None)
            if self.target_key is not None and key not in batch:
                raise PrunelabError(f"batch has no {key!r} entry; it has: {', '.join(batch)}")
            inputs = {k: v for k, v in batch.items() if k != key}
            if not inputs:
                raise PrunelabError(f"batch holds targets but no inputs (keys: {', '.join(batch)})")
            if len(inputs) == 1 and next(iter(inputs)) in POSITIONAL_KEYS:
                inputs = next(iter(inputs.values()))
            return inputs, (batch[key] if key is not None else None)
        if isinstance(batch, (tuple, list)) and batch:
            return batch[0], (batch[1] if len(batch) > 1 else None)
        raise PrunelabError(f"a batch must be a tensor, a (inputs, targets) tuple or a dict, got "
                            f"{type(batch).__name__}")

    # -- the model on it --
    def logits(self, model: nn.Module, inputs: Inputs) -> Tensor:
        return self.get_logits(call(model, to_model(model, inputs)))

    def loss(self, model: nn.Module, inputs: Inputs, targets: Tensor) -> Tensor:
        if targets is None:
            raise PrunelabError("this needs labelled data: batches hold no targets")
        logits = self.logits(model, inputs)
        return self.loss_fn(logits, targets.to(logits.device))


def as_feed(data, *, loss_fn=None, get_logits=None, target_key: str | None = None) -> Feed | None:
    """``data`` as a :class:`Feed` (None stays None; a Feed is returned as it is unless overrides are given)."""
    if data is None or (isinstance(data, Feed) and loss_fn is None and get_logits is None and target_key is None):
        return data
    if isinstance(data, Feed):
        return Feed(data.data, loss_fn=loss_fn or data.loss_fn, get_logits=get_logits or data.get_logits,
                    target_key=target_key or data.target_key)
    return Feed(data, loss_fn=loss_fn, get_logits=get_logits, target_key=target_key)


def _is_map_style(data) -> bool:
    return (isinstance(data, Dataset) and not isinstance(data, IterableDataset)
            and hasattr(data, "__getitem__") and hasattr(data, "__len__"))


def _as_tensors(data) -> tuple[Inputs, Tensor | None] | None:
    """(inputs, targets) when the examples already sit in tensors: a pair, a tensor, a 1- or 2-tensor
    TensorDataset, an ArrayDataset (or a DataLoader over one of these)."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if torch.is_tensor(data):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0]:
            raise PrunelabError(f"inputs ({inputs.shape[0]}) and targets ({targets.shape[0]}) must hold the same "
                                "number of examples")
        return inputs, targets
    if isinstance(data, TensorDataset) and len(data.tensors) in (1, 2):
        return data.tensors[0], (data.tensors[1] if len(data.tensors) == 2 else None)
    inputs, targets = getattr(data, "inputs", None), getattr(data, "targets", None)
    if isinstance(data, Dataset) and torch.is_tensor(inputs) and torch.is_tensor(targets):
        return inputs, targets
    return None
