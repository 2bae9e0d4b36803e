"""Data-parallel runs: one run on many processes (``torchrun``), with the same masks on every rank.

How the ranks stay identical (docs/distributed.md):

* **Data.** Every rank holds the whole dataset and draws the same global batch a single process would
  draw (same per-epoch seed); rank r trains on its contiguous chunk of it (:func:`shard`). The loss of a
  chunk is weighted so that DDP's average of the ranks' gradients is the gradient of the global batch's
  mean loss, as in one process.
* **Pruning decisions.** Every rank scores the same examples (the seeded draws come from the whole
  dataset), then rank 0's result is made authoritative: its masks, weights and buffers are broadcast
  (:func:`sync_model`), and a schedule's whole state after ``epoch_end`` too (:class:`Synced`). So SNIP's
  ``|w * dL/dw|``, PFP's and NNrelief's statistics and LOBSTER's threshold are exactly what a single
  process computes on those examples, and no float noise between devices can split the ranks.
* **Check.** After every pruning step and every epoch :func:`check_masks` all-reduces a digest of the
  masks (per parameter: kept count and a weighted sum of the kept positions); a disagreement stops the
  run on every rank with one line naming the first parameter that differs.
* **Files.** Only rank 0 writes (run folder, checkpoints, logs); :func:`on_main` runs such work there
  and hands its result, or its error, to every rank.

Test hook: with ``PRUNELAB_TEST_DESYNC=1`` in the environment, rank 1 flips one mask entry before its
first mask check (:func:`check_masks`), so that the tests can see the check stop a run.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import masking
from .errors import PrunelabError

TEST_DESYNC = "PRUNELAB_TEST_DESYNC"  # test hook: rank 1 flips one mask entry (read in _test_desync only)
_PRIME = 2_147_483_629               # < 2**31: position weights of the mask digest
_desynced = False


class RanksDisagree(PrunelabError):
    """The ranks of a distributed run no longer hold the same masks."""


# -- where this process stands -----------------------------------------------------------------------------

def launched() -> bool:
    """True when started by ``torchrun`` (or any launcher setting ``WORLD_SIZE``) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (before the group is joined, the launcher's ``RANK``; 0 in a single process)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return rank() == 0


def setup(device: str | torch.device = "cpu") -> torch.device:
    """This process's device, joining the process group that ``torchrun`` describes in the environment
    (once; gloo on the CPU, NCCL on CUDA). ``device="cuda"`` under torchrun means one GPU per process:
    ``cuda:LOCAL_RANK``. Without a launcher it returns ``device`` and starts nothing."""
    device = torch.device(device)
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            raise PrunelabError(f"device {device} names one GPU, but each of the {os.environ['WORLD_SIZE']} "
                                "processes needs its own: give device = 'cuda' (process k uses cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise PrunelabError(f"process with LOCAL_RANK {local} has no GPU: this machine has "
                                f"{torch.cuda.device_count()}; start at most that many processes per machine")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives -------------------------------------------------------------------------------------------

def _comm_device() -> torch.device:
    """Where tensors must be for the backend: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value: Any = None, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (picklable objects)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``values`` (a new tensor on the values' device)."""
    if not active():
        return values
    total = values.detach().to(_comm_device()).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], device=_comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone (file work), its result on every rank. A PrunelabError there is raised on
    every rank with the same message; any other failure there stops the others with one line."""
    if not active():
        return fn()
    if is_main():
        try:
            result = fn()
        except PrunelabError as error:
            broadcast_object(("error", type(error), str(error)))
            raise
        except BaseException as error:
            broadcast_object(("failed", None, f"rank 0 failed: {type(error).__name__}: {error}"))
            raise
        return broadcast_object(("ok", None, result))[2]
    status, kind, payload = broadcast_object()
    if status == "ok":
        return payload
    if status == "error" and isinstance(kind, type) and issubclass(kind, PrunelabError):
        raise kind(payload)
    raise PrunelabError(payload)


# -- data --------------------------------------------------------------------------------------------------

def shard(inputs, targets):
    """This rank's contiguous chunk of a global batch, and the weight of its mean loss: chunk size x ranks /
    batch size, so that DDP's average of the ranks' gradients is the global batch's mean gradient (1 when
    the batch splits evenly). A single process gets the batch itself and weight 1."""
    from .data import feed

    if not active():
        return inputs, targets, 1.0
    n, ranks, r = feed.count(inputs), world_size(), rank()
    start, stop = r * n // ranks, (r + 1) * n // ranks
    part = slice(start, stop)
    chunk = feed.take(inputs, part)
    return chunk, (None if targets is None else targets[part]), (stop - start) * ranks / max(n, 1)


# -- the model ---------------------------------------------------------------------------------------------

def wrap(model: nn.Module, device: str | torch.device | None = None, **options) -> nn.Module:
    """``model`` in DistributedDataParallel (``options``: DDP's). The mask buffers are left out of DDP's
    buffer broadcast (:func:`sync_model` and :func:`check_masks` keep them equal), so a mask replaced
    later is never overwritten by a stale copy. Wrap after physical removal of channels
    (``prunelab.compact``): DDP fixes the set of parameters; wrap the compacted model again.
    A single process gets the model itself."""
    from torch.nn.parallel import DistributedDataParallel

    if not active() or isinstance(model, DistributedDataParallel):
        return model
    ignored = {name + masking.MASK_SUFFIX for name in masking.masks(model)}
    ignored |= set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))  # the user's own, kept
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **options)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


@torch.no_grad()
def sync_model(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, src: int = 0) -> None:
    """Rank ``src``'s masks, weights and buffers on every rank (an optimizer passed has its state cleaned
    where a mask changed). Call it on every rank after a pruning decision."""
    if not active():
        return
    model = unwrap(model)
    device = _comm_device()
    mine = masking.masks(model)
    names = broadcast_object(list(mine) if rank() == src else None, src=src)
    params = dict(model.named_parameters())
    changed = {}
    for name in names:
        reference = params[name]
        mask = (mine[name] if rank() == src and name in mine else torch.zeros(reference.shape, dtype=torch.bool))
        wire = mask.to(device, torch.uint8)
        dist.broadcast(wire, src=src)
        received = wire.bool()
        if rank() != src and (name not in mine or not torch.equal(mine[name].to(device), received)):
            changed[name] = received.to(reference.device)
    extra = [n for n in mine if n not in names]
    if extra:
        masking.remove(model, extra)
    if changed:
        masking.attach(model, changed, optimizer)
    for tensor in model.state_dict().values():  # detached views: in-place writes bump the weights' versions
        if tensor.device == device:
            dist.broadcast(tensor, src=src)
        else:
            wire = tensor.to(device)
            dist.broadcast(wire, src=src)
            tensor.copy_(wire)


def mask_digests(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Parameter names and, per parameter, (kept count, weighted sum of kept positions) of its mask
    (-1, -1 when unmasked): a flipped entry always changes the sum (every position's weight is non-zero)."""
    model = unwrap(model)
    current = masking.masks(model)
    names = [name for name, _ in model.named_parameters()]
    out = torch.full((len(names), 2), -1, dtype=torch.int64)
    for i, name in enumerate(names):
        if name in current:
            kept = current[name].flatten().nonzero().squeeze(1)
            weights = ((kept + 1) * 2_654_435_761) % _PRIME
            out[i, 0] = kept.numel()
            out[i, 1] = int(weights.sum())
    return names, out


def check_masks(model: nn.Module, where: str = "") -> None:
    """Stop with :class:`RanksDisagree` (one line, on every rank) unless every rank holds the same masks.
    Cheap: one all-reduce of two integers per parameter. Call it on every rank."""
    if not active():
        return
    _test_desync(unwrap(model))
    names, digests = mask_digests(model)
    both = torch.cat([digests.flatten(), -digests.flatten()]).to(_comm_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[:digests.numel()].view(-1, 2), -both[digests.numel():].view(-1, 2)
    differ = (high != low).any(dim=1).nonzero().flatten().tolist()
    if differ:
        first = names[differ[0]]
        more = f" and {len(differ) - 1} more parameter(s)" if len(differ) > 1 else ""
        at = f" after {where}" if where else ""
        raise RanksDisagree(f"the {world_size()} ranks hold different masks{at}: {first}{more} differ(s) between "
                            f"ranks; stopping (the ranks must make identical pruning decisions)")


def _test_desync(model: nn.Module) -> None:
    """Test hook (``PRUNELAB_TEST_DESYNC=1``): rank 1 flips the first entry of its first mask, once."""
    global _desynced
    if _desynced or rank() != 1 or os.environ.get(TEST_DESYNC, "") in ("", "0"):
        return
    current = masking.masks(model)
    if not current:
        return
    name, mask = next(iter(current.items()))
    flipped = mask.clone()
    flipped.view(-1)[0] = ~flipped.view(-1)[0]
    masking.attach(model, {name: flipped})
    _desynced = True


# -- schedules in a distributed loop ---------------------------------------------------------------------

class Synced:
    """A schedule (``prunelab.schedules``) driven on every rank of a DDP loop, rank 0's decisions binding.

    Use it as the schedule itself (``attach``, ``step``, ``epoch_end``, ``state``, ``load``, ``events``,
    ``done``). Every rank runs the schedule on the same data; after a pruning step, rank 0's masks and
    weights are broadcast (:func:`sync_model`); after every ``epoch_end`` rank 0's whole schedule state
    too (LOBSTER's plateau and threshold decision, the events), and the masks are checked
    (:func:`check_masks`). In a single process it is the schedule itself.
    """

    def __init__(self, schedule):
        from .schedules import Iterative, Lobster, Periodic

        self.schedule = schedule
        # schedules whose step() never prunes need no per-step agreement; others (Gradual, a user's) do
        self._prunes_in_step = not isinstance(schedule, (Iterative, Lobster, Periodic))

    def __getattr__(self, name):  # everything else is the schedule's
        if "schedule" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["schedule"], name)

    @property
    def model(self) -> nn.Module:
        return self.schedule.model

    def attach(self, optimizer) -> "Synced":
        self.schedule.attach(optimizer)
        return self

    def step(self):
        event = self.schedule.step()
        if active() and self._prunes_in_step and any_rank(event is not None):
            sync_model(self.schedule.model, self.schedule.optimizer)
            check_masks(self.schedule.model, f"the pruning step at step {self.schedule.steps}")
        return event

    def epoch_end(self, val_loss: float | None = None, epoch: int | None = None):
        event = self.schedule.epoch_end(val_loss, epoch=epoch)
        if not active():
            return event
        state, tensors = self.schedule.state()
        header = broadcast_object((state, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                                   event is not None) if is_main() else None)
        state, shapes, pruned = header
        if not is_main():
            tensors = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
        device = _comm_device()
        for key in shapes:
            wire = tensors[key].to(device)
            dist.broadcast(wire, src=0)
            tensors[key] = wire.to(tensors[key].device)
        sync_model(self.schedule.model, self.schedule.optimizer)
        if not is_main():
            reference = next(self.schedule.model.parameters())
            self.schedule.load(state, {k: v.to(reference.device) for k, v in tensors.items()})
        check_masks(self.schedule.model, f"epoch {self.schedule.epochs}")
        return self.schedule.events[-1] if pruned and self.schedule.events else None
