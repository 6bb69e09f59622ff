"""The training loop: epochs of optimizer steps, a validation pass, the scheduler stepped per epoch or per batch.

It receives built objects and knows nothing of Hydra, MLflow or files; what happens at the end of an epoch
(logging, checkpointing) is the caller's ``on_epoch_end``. Losses are summed on the device, so there is no
host sync per step except when the progress bar actually refreshes. Under DDP the loop trains through the
wrapped model and sums its losses and metrics over the ranks at the end of each epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm import tqdm

from runner.errors import Diverged, UserCodeError, is_users_code, users_failures

log = logging.getLogger(__name__)

PROGRESS_REFRESH_SECONDS = 0.5
METRIC_CHUNK_ROWS = 8192  # validation outputs handed to torchmetrics in chunks of at least this many samples
METRIC_CHUNK_ELEMENTS = 2**24  # ...or this many output values (64 MiB of float32: segmentation maps, say)
DIVERGED_FIX = (
    "Checkpoints written before are kept and this run will not be resumed; lower optimizer.lr (a changed config is "
    "a new run), or add resume=never (and a new hydra.run.dir if you set one) to train this config afresh."
)


class Batches(Protocol):
    batch_size: int  # this rank's
    samples: int  # this rank's in one epoch: every batch is batch_size of them but the last

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class Ranks(Protocol):
    """The data-parallel collectives the loop needs (runner.distributed.Distributed)."""

    def sum(self, values: list[float | torch.Tensor]) -> list[float]: ...

    def sync_buffers(self, module: torch.nn.Module) -> None: ...


@dataclass
class EpochResult:
    epoch: int  # 0-based
    lrs: list[float]  # each param group's LR at the start of the epoch (for the whole epoch unless stepped per batch)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    lr_steps: dict[int, float] = field(default_factory=dict)  # global step -> LR of group 0, every N steps if asked
    note: str = ""  # set by the epoch's end handler: "best val_loss so far"

    def summary(self, epochs: int) -> str:
        values = " ".join(f"{key} {value:.4g}" for key, value in self.metrics.items())
        note = f", {self.note}" if self.note else ""
        return f"epoch {self.epoch + 1}/{epochs} lr {self.lrs[0]:.4g} {values} ({self.seconds:.2f}s{note})"


@dataclass
class Loop:
    """Everything the loop needs, already built."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_batches: Batches
    val_batches: Batches
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    epochs: int
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> torchmetrics.Metric, on the device
    progress_bar: bool = True
    autocast_dtype: torch.dtype | None = None  # bf16 / 16-mixed precision
    scaler: torch.amp.GradScaler | None = None  # 16-mixed: scales the loss so float16 gradients do not underflow
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # the compiled model, when trainer.compile
    scheduler_per_batch: bool = False  # scheduler.interval=step
    monitor: str | None = None  # the metric ReduceLROnPlateau steps on
    log_lr_every: int = 0  # record the LR every this many global steps (0: never)
    train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # DistributedDataParallel, for training steps
    ranks: Ranks | None = None  # under DDP: sums over the ranks
    detect_nonfinite: bool = True  # a NaN or infinite epoch training loss raises Diverged
    clip_value: float | None = None  # trainer.gradient_clip_val
    clip_by_norm: bool = True  # trainer.gradient_clip_algorithm == "norm"
    accumulate: int = 1  # trainer.accumulate_grad_batches: batches summed into each optimizer step
    test_batches: Batches | None = None  # the data's test split, scored once at the end
    no_sync: Callable[[], AbstractContextManager] | None = None  # DDP's: no all-reduce on a batch that does not step

    def ends_step(self, batch: int) -> bool:
        """Whether ``batch`` (0-based, in the epoch) is the last of the batches summed into one optimizer step."""
        return (batch + 1) % self.accumulate == 0 or batch + 1 == len(self.train_batches)

    def loss_weight(self, batch: int, samples: int) -> float:
        """What a batch of ``samples`` multiplies its mean loss by so that its step's gradient is the mean over all
        the samples of the step's batches, the epoch's short last batch included (1 without accumulation)."""
        if self.accumulate == 1:
            return 1.0
        size, start = self.train_batches.batch_size, batch - batch % self.accumulate
        return samples / (min((start + self.accumulate) * size, self.train_batches.samples) - start * size)

    def accumulating(self, batch: int) -> bool:
        """Whether gradients summed for a step not yet taken are in the parameters after ``batch`` batches."""
        return batch % self.accumulate > 0 and batch < len(self.train_batches)

    def steps_done(self, batch: int) -> int:
        """Optimizer steps taken in an epoch once ``batch`` of its batches are done."""
        return batch // self.accumulate + (batch == len(self.train_batches) and batch % self.accumulate > 0)

    def __post_init__(self) -> None:
        self._loss_call = direct_call(self.loss_fn)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        try:
            return self._loss_call(outputs.float(), targets)  # the loss in float32 under autocast too
        except Exception as err:
            if not is_users_code(self.loss_fn):
                raise
            raise UserCodeError(f"the loss ({type(self.loss_fn).__name__}) raised {type(err).__name__}: {err}") from err

    def outputs(self, inputs: torch.Tensor, training: bool = False) -> torch.Tensor:
        forward = (self.train_forward if training else None) or self.forward or self.model
        if self.autocast_dtype is None:
            return forward(inputs)  # no autocast context at all at full precision: it costs per step
        with torch.autocast(inputs.device.type, dtype=self.autocast_dtype):
            return forward(inputs)


def direct_call(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable:
    """torch's own loss modules (CrossEntropyLoss, MSELoss ...) as their ``forward``: nn.Module's call runs hooks, and
    the runner registers none on a loss it built, yet checking for them costs 1-2 µs a batch (~1% of a digits
    epoch). Any other loss, or one with hooks after all, is called as it is. Decided once, when the Loop is built:
    nothing of the user's sees the loss module before then, and nothing after."""
    hooks = ("forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")
    if type(loss).__module__ != "torch.nn.modules.loss" or any(
        getattr(loss, f"_{name}") or getattr(torch.nn.modules.module, f"_global_{name}") for name in hooks
    ):
        return loss
    return loss.forward


@dataclass
class Progress:
    """Where training stands: the epoch in progress, the batches of it already done, and its running loss."""

    epoch: int = 0
    batch: int = 0
    global_step: int = 0
    loss_sum: torch.Tensor | None = None  # sum of loss x batch size over this epoch's done batches, on the device
    samples: int = 0
    epoch_lrs: list[float] | None = None  # the LRs this epoch started with (a resumed epoch keeps them)
    lr_steps: dict[int, float] = field(default_factory=dict)  # this epoch's recorded per-step LRs
    grad_norm_sum: torch.Tensor | None = None  # with gradient clipping: this epoch's gradient norms, summed
    skipped_steps: torch.Tensor | None = None  # ...and under 16-mixed the steps GradScaler skipped, left out of it

    def start_epoch(self, device: torch.device, lrs: list[float]) -> None:
        if self.loss_sum is None or self.batch == 0:  # not an epoch resumed part-way through
            self.loss_sum = torch.zeros((), device=device)
            self.samples, self.epoch_lrs, self.lr_steps = 0, lrs, {}
            self.grad_norm_sum, self.skipped_steps = None, None
        # None: a fresh epoch, or one resumed from a checkpoint written before they existed
        self.grad_norm_sum = (
            torch.zeros((), device=device) if self.grad_norm_sum is None else self.grad_norm_sum.to(device)
        )
        self.skipped_steps = (
            torch.zeros((), device=device) if self.skipped_steps is None else self.skipped_steps.to(device)
        )

    def finish_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sum, self.samples = self.epoch + 1, 0, None, 0
        self.epoch_lrs, self.lr_steps, self.grad_norm_sum, self.skipped_steps = None, {}, None, None

    def state_dict(self) -> dict:
        """Where training stands; the running loss is each rank's own (runner.state.RankStreams saves it)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "global_step": self.global_step,
            "epoch_lrs": self.epoch_lrs,
            "lr_steps": dict(self.lr_steps),
            "grad_norm_sum": None if self.grad_norm_sum is None else self.grad_norm_sum.detach().cpu(),
            "skipped_steps": None if self.skipped_steps is None else self.skipped_steps.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.global_step = state["epoch"], state["batch"], state["global_step"]
        self.epoch_lrs, self.lr_steps = state["epoch_lrs"], dict(state["lr_steps"])
        self.grad_norm_sum = state.get("grad_norm_sum")  # absent from checkpoints written before clipping existed
        self.skipped_steps = state.get("skipped_steps")  # ...and before skipped steps were left out of grad_norm


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def _clip_gradients(loop: Loop, progress: Progress) -> None:
    """``trainer.gradient_clip_val``: torch's clip_grad_norm_ or clip_grad_value_; the total norm before clipping is
    summed on the device (no sync) for the epoch's mean ``grad_norm``.

    Under 16-mixed a step whose unscaled gradients are not finite is one GradScaler skips (the first steps, while
    it finds its scale, and one after each growth of the scale that overflows): its norm is left out of the mean,
    which would otherwise be inf for the whole epoch. At full precision an infinite norm is a step taken, and stays.
    """
    if loop.clip_value is None:
        return
    parameters = [p for p in loop.model.parameters() if p.grad is not None]
    if loop.clip_by_norm:
        norm = torch.nn.utils.clip_grad_norm_(parameters, loop.clip_value)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        torch.nn.utils.clip_grad_value_(parameters, loop.clip_value)
    norm = norm.to(progress.grad_norm_sum.device)
    if loop.scaler is not None:
        skipped = ~norm.isfinite()
        progress.skipped_steps.add_(skipped)
        norm = norm.masked_fill(skipped, 0.0)
    progress.grad_norm_sum.add_(norm)


def _optimizer_step(loop: Loop, progress: Progress) -> None:
    """``optimizer.step()``; an LR too large for the parameters' type (lr=1e300) is a divergence, not a traceback."""
    try:
        loop.optimizer.step()
    except RuntimeError as err:
        if "overflow" not in str(err):
            raise
        raise Diverged(
            f"training diverged: the optimizer step overflowed at epoch {progress.epoch + 1}/{loop.epochs}, step "
            f"{progress.global_step + 1} (lr {_lrs(loop.optimizer)}: {err}). {DIVERGED_FIX}"
        ) from None


def check_finite(loop: Loop, progress: Progress, train_loss: float) -> None:
    """Raise Diverged for a NaN or infinite training loss (``trainer.detect_nonfinite``), before the epoch counts."""
    if loop.detect_nonfinite and not math.isfinite(train_loss):
        first, last = progress.global_step - loop.steps_done(progress.batch) + 1, progress.global_step
        raise Diverged(
            f"training diverged: the training loss is {train_loss} over epoch {progress.epoch + 1}/{loop.epochs} "
            f"(steps {first}-{last}, lr now {_lrs(loop.optimizer)}). {DIVERGED_FIX}"
        )


def mean_grad_norm(loop: Loop, progress: Progress) -> float:
    """The epoch's mean gradient norm over the optimizer steps taken (NaN when GradScaler skipped them all)."""
    skipped = int(progress.skipped_steps.item()) if loop.scaler is not None else 0  # no second sync without one
    taken = loop.steps_done(progress.batch) - skipped
    return progress.grad_norm_sum.item() / taken if taken > 0 else math.nan


def _lrs(optimizer: torch.optim.Optimizer) -> str:
    return ", ".join(f"{lr:.4g}" for lr in current_lrs(optimizer))


def train_one_epoch(loop: Loop, progress: Progress, should_stop: Callable[..., bool]) -> bool:
    """Run the rest of ``progress.epoch``'s batches; False if a stop was asked for part-way.

    With ``loop.accumulate`` = N the gradients of N batches are summed (each loss weighted by its batch's share of
    the step's samples, so a step sees their mean) before each optimizer step; a stop may come between them, and
    the checkpoint then holds the gradients summed so far (runner.state.RankStreams).
    """
    loop.model.train()
    device = next(loop.model.parameters()).device
    progress.start_epoch(device, current_lrs(loop.optimizer))
    bar = tqdm(
        total=len(loop.train_batches),
        initial=progress.batch,
        desc=f"epoch {progress.epoch + 1}/{loop.epochs}",
        leave=False,
        dynamic_ncols=True,
        disable=None if loop.progress_bar else True,
    )  # None: only on a terminal
    next_refresh = time.monotonic() + PROGRESS_REFRESH_SECONDS
    with bar:
        for inputs, targets in loop.train_batches.epoch(progress.epoch, skip_batches=progress.batch):
            if progress.batch % loop.accumulate == 0:  # the first batch of an optimizer step
                if loop.log_lr_every and progress.global_step % loop.log_lr_every == 0:
                    progress.lr_steps[progress.global_step] = float(
                        loop.optimizer.param_groups[0]["lr"]
                    )  # a Python float: no sync
                loop.optimizer.zero_grad(set_to_none=True)
            steps_now = loop.ends_step(progress.batch)
            loss = _backward(loop, inputs, targets, loop.loss_weight(progress.batch, len(targets)), steps_now)
            if steps_now:
                _step(loop, progress)
            progress.loss_sum.add_(loss.detach(), alpha=len(targets))  # one kernel, no host sync
            progress.samples += len(targets)
            progress.batch += 1
            bar.update()
            if not bar.disable and time.monotonic() >= next_refresh:
                bar.set_postfix(
                    loss=f"{loss.item():.4f}", lr=f"{loop.optimizer.param_groups[0]['lr']:.3g}", refresh=False
                )
                next_refresh = time.monotonic() + PROGRESS_REFRESH_SECONDS
            if should_stop(progress.global_step) and progress.batch < len(loop.train_batches):
                return False
    return True


def _backward(loop: Loop, inputs: torch.Tensor, targets: torch.Tensor, weight: float, sync: bool) -> torch.Tensor:
    """One batch's forward and backward, its gradients (its loss times ``weight``) added to those of its step's
    batches so far; its loss."""
    if not sync and loop.no_sync is not None:  # DDP all-reduces once, at the step's last batch
        with loop.no_sync():
            return _backward(loop, inputs, targets, weight, sync=True)
    loss = loop.loss(loop.outputs(inputs, training=True), targets)
    scaled = loss if weight == 1.0 else loss * weight
    (scaled if loop.scaler is None else loop.scaler.scale(scaled)).backward()
    return loss


def _step(loop: Loop, progress: Progress) -> None:
    """The optimizer step on the summed gradients (clipped first if asked), and a per-step scheduler's step."""
    if loop.scaler is None:
        _clip_gradients(loop, progress)
        _optimizer_step(loop, progress)
    else:
        if loop.clip_value is not None:
            loop.scaler.unscale_(loop.optimizer)  # clip the true gradients, not the scaled ones
            _clip_gradients(loop, progress)
        loop.scaler.step(loop.optimizer)  # skipped when the scaled gradients overflowed
        loop.scaler.update()
    if loop.scheduler_per_batch:
        loop.scheduler.step()
    progress.global_step += 1


@torch.no_grad()
def evaluate(loop: Loop, split: str = "val") -> dict[str, float]:
    """The mean loss and every metric over the split (over every rank's shard under DDP: counts the runner keeps are
    summed with the loss in one host sync; torchmetrics syncs its own)."""
    if loop.ranks is not None:
        loop.ranks.sync_buffers(loop.model)
    loop.model.eval()
    device = next(loop.model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    samples = 0
    for metric in loop.metrics.values():
        metric.reset()
    # torchmetrics' own classes accumulate counts or sums, so one update with many batches gives what one per batch
    # gives, for a fraction of the per-call cost; the user's metrics get every batch as it comes.
    chunked = {name: m for name, m in loop.metrics.items() if type(m).__module__.startswith("torchmetrics.")}
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending_rows = 0
    for inputs, targets in getattr(loop, f"{split}_batches").epoch(0):
        outputs = loop.outputs(inputs).float()
        loss_sum.add_(loop.loss(outputs, targets), alpha=len(targets))  # one kernel
        samples += len(targets)
        for name, metric in loop.metrics.items():
            if name not in chunked:
                _update(name, metric, *metric_inputs(outputs, targets))
        if chunked:
            pending.append(metric_inputs(outputs, targets))
            pending_rows += len(targets)
            if pending_rows >= METRIC_CHUNK_ROWS or pending_rows * outputs[0].numel() >= METRIC_CHUNK_ELEMENTS:
                _update_chunked(chunked, pending)
                pending, pending_rows = [], 0
    if pending:
        _update_chunked(chunked, pending)
    counted = {name: metric for name, metric in loop.metrics.items() if hasattr(metric, "totals")}
    loss_total, samples, *totals = _summed(loop, loss_sum, samples, *(t for m in counted.values() for t in m.totals()))
    values = {f"{split}_loss": loss_total / max(samples, 1)}
    for name, metric in loop.metrics.items():
        if name in counted:
            count = len(metric.totals())
            values[f"{split}_{name}"], totals = metric.from_totals(*totals[:count]), totals[count:]
        else:
            values[f"{split}_{name}"] = float(metric.compute())  # a torchmetrics.Metric: syncs over the ranks itself
    return values


def _update_chunked(metrics: dict[str, Any], batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if len(batches) == 1:  # a split of one batch, or a chunk that filled at once: nothing to join
        outputs, targets = batches[0]
    else:
        outputs, targets = torch.cat([o for o, _ in batches]), torch.cat([t for _, t in batches])
    for name, metric in metrics.items():
        _update(name, metric, outputs, targets)


def _update(name: str, metric: Any, outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One batch into one metric; the user's own torchmetrics.Metric failing is their error, shown with their frames."""
    with users_failures(metric, f"the metric {name} ({type(metric).__name__})"):
        metric.update(outputs, targets)


def metric_inputs(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics takes one regression output as a vector, not an (N, 1) column."""
    if outputs.ndim == 2 and outputs.shape[1] == 1 and targets.is_floating_point():
        return outputs.squeeze(1), targets.reshape(-1)
    return outputs, targets


def _summed(loop: Loop, *values: float | torch.Tensor) -> list[float]:
    """The values as Python numbers, summed over the ranks under DDP (one host sync)."""
    if loop.ranks is None:
        return [value.item() if isinstance(value, torch.Tensor) else value for value in values]
    return loop.ranks.sum(list(values))


def train(
    loop: Loop,
    progress: Progress,
    on_epoch_end: Callable[[EpochResult], bool | None],
    should_stop: Callable[..., bool] = lambda step, epoch_end=False: False,
) -> bool:
    """Train from ``progress`` to ``loop.epochs``; True when done, False when a stop was asked for.

    ``on_epoch_end`` returning True ends training there, done (a callback's early stop).

    A scheduler stepped per epoch steps after the epoch's optimizer steps (ReduceLROnPlateau after validation,
    on its metric), so the LR recorded for an epoch is the LR of every one of its steps. A stop asked for
    mid-epoch returns after the current step; one asked for during the last step or validation returns once
    the epoch is complete. ``should_stop(global_step, epoch_end=False)`` is asked after every step and, with
    ``epoch_end=True``, after every epoch.
    """
    while progress.epoch < loop.epochs:
        started = time.perf_counter()
        if not train_one_epoch(loop, progress, should_stop):
            return False
        result = EpochResult(progress.epoch, list(progress.epoch_lrs), lr_steps=dict(progress.lr_steps))
        loss_sum, samples = _summed(loop, progress.loss_sum, progress.samples)
        check_finite(loop, progress, loss_sum / max(samples, 1))
        result.metrics["train_loss"] = loss_sum / max(samples, 1)
        if loop.clip_value is not None:  # the same on every rank (the gradients are all-reduced): no sum
            result.metrics["grad_norm"] = mean_grad_norm(loop, progress)
        if not loop.scheduler_per_batch and loop.monitor is None:
            loop.scheduler.step()
        result.metrics.update(evaluate(loop))
        if loop.monitor is not None:
            loop.scheduler.step(result.metrics[loop.monitor])
        result.seconds = time.perf_counter() - started
        progress.finish_epoch()
        ended = on_epoch_end(result)  # first: it may note the epoch as the best so far
        log.info(result.summary(loop.epochs))
        if ended:
            return True
        if should_stop(progress.global_step, epoch_end=True) and progress.epoch < loop.epochs:
            return False
    return True
