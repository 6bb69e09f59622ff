"""Build what a run trains: data, model, optimizer and scheduler, from their config nodes.

What can be refused before the data loads (the optimizer's arguments, the scheduler's settings) is refused
first, so those errors come at once; the schedule is then run through every epoch and step once the data gives
the number of steps per epoch, before the model is built and long before any training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from runner.data import DataSplits, steps_per_epoch
from runner.schedules import SchedulePlan, build_scheduler, check_lambda_mode, check_schedule, plan_schedule
from runner.targets import build_node


@dataclass
class Built:
    data: DataSplits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: SchedulePlan


def build_data(cfg: DictConfig) -> DataSplits:
    return build_node("data", cfg.data, seed=cfg.trainer.seed)


def build_model(cfg: DictConfig, data: DataSplits) -> torch.nn.Module:
    num_outputs = data.num_classes if data.is_classification else 1
    return build_node("model", cfg.model, input_shape=data.input_shape, num_outputs=num_outputs)


def optimizer_builder(cfg: DictConfig):
    """A function of the parameters to train that builds the configured optimizer over them."""

    def build_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_node("optimizer", cfg.optimizer, params=params)

    return build_optimizer


def check_before_data(cfg: DictConfig) -> None:
    """What can be refused before the data loads: the optimizer's arguments and the scheduler's settings."""
    plan_schedule(cfg.scheduler, cfg.trainer.epochs)
    optimizer_builder(cfg)([torch.zeros(1, requires_grad=True)])


def build_everything(cfg: DictConfig, device: torch.device, world_size: int = 1) -> Built:
    """Build data, model, optimizer and scheduler, and run the schedule through every epoch (and step) first."""
    check_before_data(cfg)
    data = build_data(cfg)
    steps = steps_per_epoch(len(data.train), cfg.trainer.batch_size, world_size)
    plan = plan_schedule(cfg.scheduler, cfg.trainer.epochs, steps, data.is_classification)
    build_optimizer = optimizer_builder(cfg)
    check_schedule(plan, build_optimizer)  # a NaN, negative or failing LR at some epoch fails here, not mid-run
    model = build_model(cfg, data).to(device)
    optimizer = build_optimizer(list(model.parameters()))
    scheduler = build_scheduler(plan, optimizer)
    check_lambda_mode(scheduler)
    return Built(data, model, optimizer, scheduler, plan)
