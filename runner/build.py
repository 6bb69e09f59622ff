"""Build what a run trains: data, model, loss, metrics, optimizer and scheduler, from their config nodes.

What can be refused before the data loads (the optimizer's arguments, the scheduler's settings) is refused
first, so those errors come at once; the schedule is then run through every epoch and step once the data gives
the number of steps per epoch, and one batch goes through the model and the loss, long before any training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from runner.callbacks import Callbacks, EarlyStopping
from runner.data import DataSplits, complete_splits, steps_per_epoch
from runner.errors import ConfigError
from runner.losses import Loss, build_loss, check_loss_fits
from runner.metrics import RunMetrics, build_run_metrics, monitor_direction
from runner.schedules import SchedulePlan, build_scheduler, check_lambda_mode, check_schedule, plan_schedule
from runner.targets import build_node, resolve_target, signature_parameters

# Keys of the data node the runner reads (unless the data function takes them itself): they win over what is
# read from the data.
DATA_SETTINGS = ("task", "num_classes", "input_shape")


@dataclass
class Built:
    data: DataSplits
    model: torch.nn.Module
    loss: Loss
    metrics: RunMetrics
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: SchedulePlan
    callbacks: Callbacks


def build_data(cfg: DictConfig) -> DataSplits:
    """Call the data function and complete what it returns (shapes, task, classes).

    Raises:
        ConfigError: bad settings or a result that is not datasets; UserCodeError: the user's function raised.
    """
    target = resolve_target("data", cfg.data)
    parameters = signature_parameters(target) or {}
    runner_keys = [key for key in DATA_SETTINGS if key in cfg.data and key not in parameters]
    result = build_node("data", cfg.data, leave_out=runner_keys, seed=cfg.trainer.seed)  # the user's failure: theirs
    settings = {key: cfg.data.get(key) for key in DATA_SETTINGS}
    return complete_splits(result, f"data ({cfg.data._target_})", settings)


def build_model(cfg: DictConfig, data: DataSplits) -> torch.nn.Module:
    return build_node("model", cfg.model, input_shape=data.input_shape, num_outputs=data.num_outputs)


def optimizer_builder(cfg: DictConfig):
    """A function of the parameters to train that builds the configured optimizer over them."""

    def build_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_node("optimizer", cfg.optimizer, params=params)

    return build_optimizer


def check_before_data(cfg: DictConfig) -> None:
    """What can be refused before the data loads: the optimizer's arguments and the scheduler's settings."""
    plan_schedule(cfg.scheduler, cfg.trainer.epochs)
    optimizer_builder(cfg)([torch.zeros(1, requires_grad=True)])


def sample_batch(data: DataSplits, device: torch.device, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The first few validation samples as a batch: no augmentation, no random numbers drawn."""
    from torch.utils.data import default_collate

    inputs, targets = default_collate([data.val[i] for i in range(min(size, len(data.val)))])
    return inputs.to(device), targets.to(device)


def build_everything(cfg: DictConfig, device: torch.device, world_size: int = 1) -> Built:
    """Build everything a run trains, and run the schedule through every epoch (and step) first."""
    check_before_data(cfg)
    data = build_data(cfg)
    metrics = build_run_metrics(cfg.get("metrics"), data.task, data.num_classes)
    steps = steps_per_epoch(len(data.train), cfg.trainer.batch_size, world_size, cfg.trainer.accumulate_grad_batches)
    plan = plan_schedule(cfg.scheduler, cfg.trainer.epochs, steps, metrics)
    build_optimizer = optimizer_builder(cfg)
    check_schedule(plan, build_optimizer)  # a NaN, negative or failing LR at some epoch fails here, not mid-run
    model = build_model(cfg, data).to(device)
    loss = build_loss(cfg.loss, data.task)
    if isinstance(loss, torch.nn.Module):
        loss = loss.to(device)
    check_loss_fits(loss, model, *sample_batch(data, device))
    optimizer = build_optimizer(list(model.parameters()))
    scheduler = build_scheduler(plan, optimizer)
    check_lambda_mode(scheduler)
    return Built(data, model, loss, metrics, optimizer, scheduler, plan, build_callbacks(cfg, metrics))


def build_callbacks(cfg: DictConfig, metrics: RunMetrics) -> Callbacks:
    """``callbacks``: a mapping of names to ``_target_`` nodes (null entries switched off), and
    ``trainer.early_stopping`` as the callback ``early_stopping`` when its patience is set."""
    nodes = cfg.get("callbacks") or {}
    built = {name: build_node(f"callbacks.{name}", node) for name, node in nodes.items() if node is not None}
    stopping = cfg.trainer.early_stopping
    if stopping.patience:
        if "early_stopping" in built:
            raise ConfigError(
                "callbacks.early_stopping: the name is taken by trainer.early_stopping; give yours another name."
            )
        higher = monitor_direction(cfg.trainer.monitor, cfg.trainer.monitor_mode, metrics)
        built["early_stopping"] = EarlyStopping(cfg.trainer.monitor, higher, stopping.patience, stopping.min_delta)
    return Callbacks(built)
