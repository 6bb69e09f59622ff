"""Schemas for the plain settings (trainer, tracking, resume), registered in Hydra's ConfigStore, and their checks.

The schemas make a misspelled key fail when Hydra composes the config, with the key path in the message.
Swappable parts (model, data, optimizer, scheduler) are ``_target_`` nodes checked against their constructors
in :mod:`runner.build`. This module must not import torch: ``python -m runner --cfg job`` loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from runner.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


PRECISIONS = ("32", "bf16", "16-mixed")


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    num_workers: int = 0
    checkpoint_every: int = 1
    checkpoint_min_seconds: float = 1.0
    keep_checkpoints: int = 2
    precision: str = "32"  # 32 | bf16 (autocast) | 16-mixed (autocast to float16 + GradScaler)
    compile: bool = False  # torch.compile the model


@dataclass
class TrackingConfig:
    # None: MLflow's own default (MLFLOW_TRACKING_URI, else ./mlflow.db), so a plain `mlflow ui` finds the runs.
    uri: str | None = None
    experiment: str = "runner"
    log_every_n_steps: int = 0  # > 0: also log `lr_step`, the LR every N optimizer steps (0: per epoch only)


@dataclass
class RunnerConfig:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # auto: continue the newest unfinished run of this config; never: a fresh run; or a run directory/checkpoint.
    resume: str = "auto"
    resume_force: bool = False  # with resume=PATH: start from a checkpoint of a different config
    resume_search: list[str] = field(default_factory=lambda: ["outputs", "multirun"])  # where resume=auto looks


def register_schemas() -> None:
    """Put the schemas where ``conf/config.yaml``'s defaults list finds them."""
    ConfigStore.instance().store(name="runner_schema", node=RunnerConfig)


def check_settings(cfg: DictConfig) -> None:
    """Refuse impossible plain settings before anything is built.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    trainer = cfg.trainer
    if trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs must be at least 1, got {trainer.epochs}.")
    if trainer.batch_size < 1:
        raise ConfigError(f"trainer.batch_size must be at least 1, got {trainer.batch_size}.")
    if trainer.checkpoint_every < 1:
        raise ConfigError(f"trainer.checkpoint_every must be at least 1 (epochs), got {trainer.checkpoint_every}.")
    if trainer.checkpoint_min_seconds < 0:
        raise ConfigError(f"trainer.checkpoint_min_seconds must be 0 (every checkpoint_every epochs) or more, got {trainer.checkpoint_min_seconds}.")
    if trainer.keep_checkpoints < 1:
        raise ConfigError(f"trainer.keep_checkpoints must be at least 1, got {trainer.keep_checkpoints}.")
    if trainer.num_workers < 0:
        raise ConfigError(f"trainer.num_workers must be 0 or more, got {trainer.num_workers}.")
    if not DEVICE_PATTERN.match(str(trainer.device)):
        raise ConfigError(
            f"trainer.device={trainer.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps."
        )
    if cfg.tracking.log_every_n_steps < 0:
        raise ConfigError(f"tracking.log_every_n_steps must be 0 (off) or more, got {cfg.tracking.log_every_n_steps}.")
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision}: use one of {', '.join(PRECISIONS)}.")
    lr = cfg.optimizer.get("lr")
    if lr is None or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a number above 0, got {lr!r}.")
