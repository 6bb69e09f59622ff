"""The training loop: epochs of optimizer steps, a validation pass, the scheduler stepped once per epoch.

It receives built objects and knows nothing of Hydra, MLflow or files; what happens at the end of an epoch
(logging, checkpointing) is the caller's ``on_epoch_end``. Losses are summed on the device, so there is no
host sync per step except when the progress bar actually refreshes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

log = logging.getLogger(__name__)

PROGRESS_REFRESH_SECONDS = 0.5


class Batches(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class EpochResult:
    epoch: int  # 0-based
    lrs: list[float]  # each param group's LR, used for every step of this epoch
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, epochs: int) -> str:
        values = " ".join(f"{key} {value:.4g}" for key, value in self.metrics.items())
        return f"epoch {self.epoch + 1}/{epochs} lr {self.lrs[0]:.4g} {values} ({self.seconds:.2f}s)"


@dataclass
class Loop:
    """Everything the loop needs, already built."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_batches: Batches
    val_batches: Batches
    classification: bool
    epochs: int
    progress_bar: bool = True

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.classification:
            return F.cross_entropy(outputs, targets)
        return F.mse_loss(outputs, targets)


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def train_one_epoch(loop: Loop, epoch: int) -> float:
    """Run every optimizer step of ``epoch``; return the mean training loss."""
    loop.model.train()
    device = next(loop.model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    samples = 0
    bar = tqdm(total=len(loop.train_batches), desc=f"epoch {epoch + 1}/{loop.epochs}", leave=False, dynamic_ncols=True,
               disable=None if loop.progress_bar else True)  # None: only on a terminal, not in job logs
    next_refresh = time.monotonic() + PROGRESS_REFRESH_SECONDS
    with bar:
        for inputs, targets in loop.train_batches.epoch(epoch):
            loop.optimizer.zero_grad(set_to_none=True)
            loss = loop.loss(loop.model(inputs), targets)
            loss.backward()
            loop.optimizer.step()
            loss_sum += loss.detach() * len(targets)
            samples += len(targets)
            bar.update()
            if not bar.disable and time.monotonic() >= next_refresh:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{loop.optimizer.param_groups[0]['lr']:.3g}", refresh=False)
                next_refresh = time.monotonic() + PROGRESS_REFRESH_SECONDS
    return loss_sum.item() / max(samples, 1)


@torch.no_grad()
def evaluate(loop: Loop) -> dict[str, float]:
    """Mean validation loss, and accuracy for classification."""
    loop.model.eval()
    device = next(loop.model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = 0
    for inputs, targets in loop.val_batches.epoch(0):
        outputs = loop.model(inputs)
        loss_sum += loop.loss(outputs, targets) * len(targets)
        if loop.classification:
            correct += (outputs.argmax(dim=1) == targets).sum()
        samples += len(targets)
    metrics = {"val_loss": loss_sum.item() / max(samples, 1)}
    if loop.classification:
        metrics["val_accuracy"] = correct.item() / max(samples, 1)
    return metrics


def train(loop: Loop, on_epoch_end: Callable[[EpochResult], None], start_epoch: int = 0) -> list[EpochResult]:
    """Train from ``start_epoch`` to ``loop.epochs``; the scheduler steps once per epoch, after its steps."""
    results = []
    for epoch in range(start_epoch, loop.epochs):
        started = time.perf_counter()
        result = EpochResult(epoch, current_lrs(loop.optimizer))
        result.metrics["train_loss"] = train_one_epoch(loop, epoch)
        loop.scheduler.step()
        result.metrics.update(evaluate(loop))
        result.seconds = time.perf_counter() - started
        log.info(result.summary(loop.epochs))
        on_epoch_end(result)
        results.append(result)
    return results
