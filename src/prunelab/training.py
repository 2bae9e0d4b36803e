"""Train and evaluate: optimizers, learning-rate schedules, a fast epoch loop, top-1/top-5 error.

The loop is deliberately plain (tensor slicing for batches, no DataLoader workers): on two CPU cores it
is the loop itself that costs, not the data. Masks need nothing here: the hooks in ``masking`` keep
pruned weights at zero through every step. Every epoch's shuffling, augmentation and dropout come from
a seed derived from (run seed, stage, epoch), so an epoch replays identically after a resume.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PrunelabError, TrainingDiverged

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "multistep", "cosine")


@dataclass
class TrainConfig:
    """How to train. ``milestones``, ``step_size`` and ``warmup`` count epochs when the budget is in
    epochs and iterations when it is in iterations; exactly one of the two budgets is used."""

    epochs: int | None = 10
    iterations: int | None = None
    batch_size: int = 100
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    milestones: list[int] = field(default_factory=list)
    step_size: int = 0
    gamma: float = 0.1
    warmup: int = 0
    eval_batch_size: int = 1000

    def __post_init__(self):
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


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 1000, device: str | torch.device = "cpu") -> dict:
    """Top-1 and top-5 error (fractions) and mean cross-entropy of ``model`` on ``data``."""
    if len(data) == 0:
        return {"error": None, "top5_error": None, "loss": None}
    was_training = model.training
    model.eval()
    wrong1 = wrong5 = 0
    loss = 0.0
    try:
        for inputs, targets in data.batches(batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            wrong1 += int((top[:, 0] != targets).sum())
            wrong5 += int((top != targets[:, None]).all(dim=1).sum())
    finally:
        model.train(was_training)
    n = len(data)
    return {"error": wrong1 / n, "top5_error": wrong5 / n, "loss": loss / n}


class Trainer:
    """Runs epochs of one training stage: fresh optimizer, schedule by global step."""

    def __init__(self, model: nn.Module, data, config: TrainConfig, seed: int, stage: int = 0,
                 device: str | torch.device = "cpu", progress: bool | None = None):
        self.model, self.data, self.config = model, data, config
        self.seed, self.stage, self.device = seed, stage, torch.device(device)
        self.optimizer = make_optimizer(model, config)
        self.steps_per_epoch = max(data.num_batches(config.batch_size, drop_last=False), 1)
        self.total_steps = config.total_steps(self.steps_per_epoch)
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.step_hooks: list[Callable[[int], None]] = []  # called after each step with the step count

    def run_epoch(self, epoch: int) -> dict:
        """Train epoch ``epoch`` (0-based); the last epoch stops at the step budget."""
        from tqdm import tqdm

        model, config = self.model, self.config
        step = epoch * self.steps_per_epoch
        steps = min(self.steps_per_epoch, self.total_steps - step)
        epoch_seed = derive_seed(self.seed, self.stage, epoch)
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        wrong = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        model.train()
        bar = tqdm(total=steps, desc=f"stage {self.stage} epoch {epoch + 1}/{self.epochs}",
                   disable=not self.progress, leave=False, unit="step")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed)  # dropout and any other global-RNG use in the model
            batches = self.data.batches(config.batch_size, shuffle=True, seed=epoch_seed)
            for _, (inputs, targets) in zip(range(steps), batches):
                lr = lr_at(config, step, self.steps_per_epoch)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                inputs, targets = inputs.to(self.device), targets.to(self.device)
                logits = model(inputs)
                loss = F.cross_entropy(logits, targets)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                step += 1
                loss_sum += loss.detach() * len(targets)
                wrong += (logits.detach().argmax(1) != targets).sum()
                seen += len(targets)
                for hook in self.step_hooks:
                    hook(step)
                bar.update()
        bar.close()
        if seen and not math.isfinite(loss_sum.item()):
            raise TrainingDiverged(f"training diverged (loss is {loss_sum.item()}) in stage {self.stage} "
                                   f"epoch {epoch + 1}; lower the learning rate")
        return {"stage": self.stage, "epoch": epoch + 1, "steps": step, "lr": lr_at(config, step - 1, self.steps_per_epoch),
                "train_loss": loss_sum.item() / max(seen, 1), "train_error": wrong.item() / max(seen, 1),
                "seconds": time.perf_counter() - started}
