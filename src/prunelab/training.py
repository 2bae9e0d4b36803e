"""Train and evaluate: optimizers, learning-rate schedules, a fast epoch loop, top-1/top-5 error.

The loop is deliberately plain (tensor slicing for batches, no DataLoader workers): on two CPU cores it
is the loop itself that costs, not the data. Masks need nothing here: the hooks in ``masking`` keep
pruned weights at zero through every step. Every epoch's shuffling, augmentation and dropout come from
a seed derived from (run seed, stage, epoch), so an epoch replays identically after a resume.

Under ``torchrun`` (an initialised process group of several processes) the trainer trains data-parallel:
the model is wrapped in DDP and every rank draws the same global batches, training on its chunk of each
(``prunelab.distributed.shard``), so that the steps are those of one process with the same batch size.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import feed
from .errors import PrunelabError, TrainingDiverged
from .options import option

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "multistep", "cosine")


@dataclass
class TrainConfig:
    """How to train. ``milestones``, ``step_size`` and ``warmup`` count epochs when the budget is in
    epochs and iterations when it is in iterations; exactly one of the two budgets is used."""

    epochs: int | None = option(10, "training budget in epochs")
    iterations: int | None = option(None, "training budget in steps (overrides epochs)")
    batch_size: int = option(100, "training batch size")
    optimizer: str = option("sgd", "sgd | adam")
    lr: float = option(0.1, "learning rate")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(0.0, "L2 weight decay")
    lr_schedule: str = option("constant", "constant | step | multistep | cosine")
    milestones: list[int] = option(None, "multistep decay points, in the budget's unit", factory=list)
    step_size: int = option(0, "step schedule period, in the budget's unit")
    gamma: float = option(0.1, "decay factor of step / multistep")
    warmup: int = option(0, "linear warm-up length, in the budget's unit")
    eval_batch_size: int = option(1000, "evaluation batch size")
    amp: bool = option(False, "mixed-precision training: float16 autocast with loss scaling on CUDA, bfloat16 "
                              "autocast on the CPU (evaluation stays in float32)")
    channels_last: bool = option(False, "train conv nets in the channels-last memory layout (NHWC: faster "
                                        "convolutions on GPUs with tensor cores, and often on CPUs)")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse an unknown optimizer or schedule, or a value out of range, in one line."""
        if self.optimizer not in OPTIMIZERS:
            raise PrunelabError(f"unknown optimizer {self.optimizer!r}; choose from: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise PrunelabError(f"unknown lr_schedule {self.lr_schedule!r}; choose from: {', '.join(SCHEDULES)}")
        if self.iterations is None and self.epochs is None:
            raise PrunelabError("give a training budget: epochs or iterations")
        for key in ("epochs", "iterations"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise PrunelabError(f"{key} must be >= 0, got {value}")
        if self.batch_size < 1:
            raise PrunelabError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr_schedule == "step" and self.step_size < 1:
            raise PrunelabError("lr_schedule 'step' needs step_size >= 1")
        for key in ("lr", "momentum", "weight_decay", "gamma"):
            if not math.isfinite(getattr(self, key)):
                raise PrunelabError(f"{key} must be a finite number, got {getattr(self, key)}")
        if not self.lr > 0:
            raise PrunelabError(f"lr must be > 0, got {self.lr}")
        for key in ("momentum", "weight_decay", "gamma", "warmup"):
            if not getattr(self, key) >= 0:
                raise PrunelabError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise PrunelabError("nesterov needs the sgd optimizer with momentum > 0")
        if self.milestones and self.lr_schedule != "multistep":
            raise PrunelabError(f"milestones apply to lr_schedule 'multistep', not {self.lr_schedule!r}")
        if self.step_size and self.lr_schedule != "step":
            raise PrunelabError(f"step_size applies to lr_schedule 'step', not {self.lr_schedule!r}")

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.iterations if self.iterations is not None else self.epochs * steps_per_epoch

    def as_dict(self) -> dict:
        return asdict(self)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (run seed, stage, epoch): stable across processes and platforms."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for global step ``step`` (0-based): a pure function, so resuming needs no state."""
    unit = 1 if config.iterations is not None else steps_per_epoch
    progress = step / unit  # in the schedule's own unit (epochs or iterations)
    if config.warmup and progress < config.warmup:
        return config.lr * (step + 1) / (config.warmup * unit)
    if config.lr_schedule == "step":
        return config.lr * config.gamma ** int(progress // config.step_size)
    if config.lr_schedule == "multistep":
        return config.lr * config.gamma ** sum(progress >= m for m in config.milestones)
    if config.lr_schedule == "cosine":
        total = config.total_steps(steps_per_epoch)
        return 0.5 * config.lr * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    return config.lr


def count_errors(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int]:
    """(top-1 wrong, top-5 wrong, counted) over the targets; sequence outputs are flattened and targets of
    -100 (padding, the Hugging Face convention) are not counted."""
    if logits.dim() > 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    counted = targets != feed.IGNORE_INDEX
    logits, targets = logits[counted], targets[counted]
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (int((top[:, 0] != targets).sum()), int((top != targets[:, None]).all(dim=1).sum()),
            int(targets.numel()))


def _top1_wrong(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Top-1 mistakes (a tensor: no device sync per step) and the number of counted targets."""
    if logits.dim() > 2:
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if targets.dtype.is_floating_point or targets.dim() != 1:  # not class indices: no error rate
        return torch.zeros((), dtype=torch.long, device=logits.device), len(targets)
    counted = targets != feed.IGNORE_INDEX
    return ((logits.argmax(1) != targets) & counted).sum(), int(counted.sum()) if (~counted).any() else len(targets)


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 1000, device: str | torch.device | None = None, *,
             loss_fn: Callable | None = None, get_logits: Callable | None = None,
             stop_above: float | None = None) -> dict:
    """Top-1 and top-5 error (fractions) and mean loss of ``model`` on ``data``.

    ``data``: a Dataset, a DataLoader (iterated as it is), an iterable of batches or an (inputs, targets)
    pair (see ``prunelab.data.feed``). ``loss_fn(logits, targets)`` defaults to cross-entropy and
    ``get_logits`` picks the logits from the model's output. ``device``: the model's, unless given.

    ``stop_above``: stop as soon as the mean loss is proven to exceed this value: with cross-entropy
    (never negative) on a classifier and data of known length, the sum so far divided by the number of
    examples is a lower bound of the mean. The result is then ``{"loss": that bound, "stopped": True}``
    with the errors None. Other losses and outputs always run to the end.
    """
    data = feed.as_feed(data, loss_fn=loss_fn, get_logits=get_logits)
    if data.length == 0:
        return {"error": None, "top5_error": None, "loss": None}
    can_stop = stop_above is not None and data.loss_fn is feed.default_loss and data.length is not None
    was_training = model.training
    model.eval()
    wrong1 = wrong5 = n = 0
    loss = 0.0
    try:
        for inputs, targets in data.batches(batch_size):
            if targets is None:
                raise PrunelabError("evaluate needs labelled data: the batches hold no targets")
            logits = data.logits(model, inputs)
            if not torch.isfinite(logits).all():
                raise PrunelabError("evaluate: the model's outputs are not finite (NaN or inf) on this data; check "
                                    "the inputs and the weights")
            targets = targets.to(logits.device)
            w1, w5, counted = count_errors(logits, targets)
            if data.loss_fn is feed.default_loss:  # summed exactly, as a mean of batch means would not be
                flat = logits.reshape(-1, logits.shape[-1]) if logits.dim() > 2 else logits
                loss += F.cross_entropy(flat, targets.reshape(-1) if logits.dim() > 2 else targets,
                                        reduction="sum", ignore_index=feed.IGNORE_INDEX).item()
            else:
                loss += data.loss_fn(logits, targets).item() * counted
            wrong1, wrong5, n = wrong1 + w1, wrong5 + w5, n + counted
            if can_stop and logits.dim() == 2 and loss / data.length > stop_above:
                return {"error": None, "top5_error": None, "loss": loss / data.length, "stopped": True}
    finally:
        model.train(was_training)
    if n == 0:
        return {"error": None, "top5_error": None, "loss": None}
    return {"error": wrong1 / n, "top5_error": wrong5 / n, "loss": loss / n}


class Trainer:
    """Runs epochs of one training stage: fresh optimizer (or the one given), schedule by global step.

    ``data`` is any form ``evaluate`` takes; a DataLoader is used with its own batch size and sampler (whose
    shuffling is seeded per epoch), other data is batched by ``config.batch_size``.

    ``distributed`` (default: whenever a process group of several processes is initialised, as under
    ``torchrun``): train data-parallel. The model is wrapped in DDP (``self.model`` stays the plain model);
    batches the trainer cuts itself are the global batches of one process, of which each rank trains on its
    chunk; a DataLoader's batches are each rank's own (give it a ``DistributedSampler``). The epoch's loss
    and error are summed over the ranks."""

    def __init__(self, model: nn.Module, data, config: TrainConfig, seed: int, stage: int = 0,
                 device: str | torch.device = "cpu", progress: bool | None = None, *,
                 loss_fn: Callable | None = None, get_logits: Callable | None = None,
                 optimizer: torch.optim.Optimizer | None = None, distributed: bool | None = None):
        from . import distributed as dist_

        self.model, self.config = dist_.unwrap(model), config
        self.channels_last = bool(getattr(config, "channels_last", False))
        if self.channels_last:  # the 4-D weights (and masks) in place, before any DDP wrap; inputs in run_epoch
            self.model.to(memory_format=torch.channels_last)
        self.data = feed.as_feed(data, loss_fn=loss_fn, get_logits=get_logits)
        self.seed, self.stage, self.device = seed, stage, torch.device(device)
        self.optimizer = optimizer or make_optimizer(model, config)
        self.distributed = dist_.active() if distributed is None else bool(distributed and dist_.active())
        self.forward_model = dist_.wrap(model) if self.distributed else model
        # the trainer cuts global batches and shards them; a DataLoader or plain iterable is already per rank
        self.sharded = self.distributed and self.data._loader is None and self.data.seekable
        self.amp = bool(getattr(config, "amp", False))
        # autocast where the weights are: float16 with loss scaling on CUDA, bfloat16 elsewhere
        self.amp_device = next(self.model.parameters(), torch.empty(0)).device.type
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.amp_device == "cuda" else None
        self.steps_per_epoch = max(self.data.num_batches(config.batch_size, drop_last=False), 1)
        self.total_steps = config.total_steps(self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.step_hooks: list[Callable[[int], None]] = []  # called after each step with the step count

    def run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (0-based); the last epoch stops at the step budget."""
        from tqdm import tqdm

        from . import distributed as dist_

        model, config = self.forward_model, self.config
        step = epoch * self.steps_per_epoch
        steps = min(self.steps_per_epoch, self.total_steps - step)
        epoch_seed = derive_seed(self.seed, self.stage, epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        wrong = torch.zeros((), dtype=torch.long, device=self.device)
        seen = torch.zeros((), dtype=torch.long, device=self.device)
        model.train()
        bar = tqdm(total=steps, desc=f"stage {self.stage} epoch {epoch + 1}/{self.epochs}",
                   disable=not self.progress, leave=False, unit="step")
        rank = dist_.rank() if self.distributed else 0
        # dropout and any other global-RNG use in the model; other ranks draw for their own chunks
        model_seed = epoch_seed if rank == 0 else derive_seed(epoch_seed, "rank", rank)
        autocast_dtype = torch.float16 if self.amp_device == "cuda" else torch.bfloat16
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_seed)
            batches = self.data.batches(config.batch_size, shuffle=True, seed=epoch_seed)
            for _, (inputs, targets) in zip(range(steps), batches):
                lr = lr_at(config, step, self.steps_per_epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                weight = 1.0
                if self.sharded:  # this rank's chunk of the global batch, and its loss's weight
                    inputs, targets, weight = dist_.shard(inputs, targets)
                if self.channels_last:
                    inputs = feed.channels_last(inputs)
                with torch.autocast(self.amp_device, dtype=autocast_dtype, enabled=self.amp):
                    logits = self.data.logits(model, inputs)
                    targets = targets.to(logits.device)
                    empty = feed.count(inputs) == 0
                    loss = logits.float().sum() * 0.0 if empty else self.data.loss_fn(logits, targets)
                self.optimizer.zero_grad(set_to_none=True)
                objective = loss * weight if weight != 1.0 else loss
                if self.scaler is not None:
                    self.scaler.scale(objective).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    objective.backward()
                    self.optimizer.step()
                step += 1
                if not empty:
                    wrong1, counted = _top1_wrong(logits.detach(), targets)
                    loss_sum += loss.detach().float() * counted
                    wrong += wrong1
                    seen += counted
                for hook in self.step_hooks:
                    hook(step)
                bar.update()
        bar.close()
        if self.distributed:  # the epoch's figures over every rank's chunks: those of the global batches
            totals = dist_.all_reduce_sum(torch.stack([loss_sum.double(), wrong.double(), seen.double()]))
            loss_sum, wrong, seen = totals[0], totals[1].long(), totals[2].long()
        seen = int(seen.item())
        if seen and not math.isfinite(loss_sum.item()):
            raise TrainingDiverged(f"training diverged (loss is {loss_sum.item()}) in stage {self.stage} "
                                   f"epoch {epoch + 1}; lower the learning rate")
        return {"stage": self.stage, "epoch": epoch + 1, "steps": step, "lr": lr_at(config, step - 1, self.steps_per_epoch),
                "train_loss": loss_sum.item() / max(seen, 1), "train_error": wrong.item() / max(seen, 1),
                "seconds": time.perf_counter() - started}
