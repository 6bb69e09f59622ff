"""Schemas for the plain settings (trainer, tracking, resume), registered in Hydra's ConfigStore, and their checks.

The schemas make a misspelled key fail when Hydra composes the config, with the key path in the message.
Swappable parts (model, data, optimizer, scheduler) are ``_target_`` nodes checked against their constructors
in :mod:`runner.build`. This module must not import torch: ``python -m runner --cfg job`` loads it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from runner.errors import ConfigError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


PRECISIONS = ("32", "bf16", "16-mixed")
STRATEGIES = ("auto", "ddp", "single")
BACKENDS = ("auto", "nccl", "gloo")
# Validation and test keep no gradients, so a batch several times the training one fits where training does; on
# in-memory data the per-batch Python is most of a small model's validation (digits: 12 batches of 32 took ~1 ms).
EVAL_BATCH_FACTOR = 4
# What torchrun (or any launcher of torch.distributed's env:// kind) gives each process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class EarlyStoppingConfig:
    patience: int = 0  # N > 0: stop after N epochs without improvement of trainer.monitor; 0: off
    min_delta: float = 0.0  # an improvement must beat the best so far by more than this


@dataclass
class TrainerConfig:
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None  # validation and test batches (global); None: EVAL_BATCH_FACTOR x batch_size
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True
    num_workers: int = 0
    checkpoint_every: int = 1
    checkpoint_min_seconds: float = 1.0
    checkpoint_every_steps: int = 0  # 0: at epoch ends only; N: also after every N-th optimizer step, mid-epoch
    keep_checkpoints: int = 2
    precision: str = "32"  # 32 | bf16 (autocast) | 16-mixed (autocast to float16 + GradScaler)
    compile: bool = False  # torch.compile the model
    strategy: str = "auto"  # auto (DDP when started by torchrun) | ddp | single
    backend: str = "auto"  # DDP's process group: auto (NCCL on CUDA, Gloo on the CPU) | nccl | gloo
    detect_nonfinite: bool = True  # a NaN or infinite training loss ends the run (checked once per epoch: no sync)
    monitor: str = "val_loss"  # the logged value that picks the best epoch (checkpoints/best.pt)
    monitor_mode: str | None = None  # min | max; None: the metric's own direction (runner.metrics)
    keep_best: int = 1  # best-epoch-EEEE.pt for the K best epochs, best.pt the best: never pruned
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    gradient_clip_val: float | None = None  # clip gradients before each optimizer step; None: never
    gradient_clip_algorithm: str = "norm"  # norm: the total 2-norm at most the value | value: each element within +-it
    accumulate_grad_batches: int = 1  # N > 1: one optimizer step per N batches of trainer.batch_size
    test_with: str = "best"  # the checkpoint scored on the test split at the end: best | last


@dataclass
class TrackingConfig:
    # None: MLflow's own default (MLFLOW_TRACKING_URI, else ./mlflow.db), so a plain `mlflow ui` finds the runs.
    uri: str | None = None
    experiment: str = "runner"
    log_every_n_steps: int = 0  # > 0: also log `lr_step`, the LR every N optimizer steps (0: per epoch only)
    # Seconds the runner waits, in all, for a tracking server that stops answering; then it stops asking, trains on,
    # and at the end says how many epochs MLflow lacks (exit 75: the same command logs them).
    wait_s: float = 30.0
    # The trained model (best.pt's weights when there is one, else the last) as an MLflow model at the run's end.
    log_model: bool = True
    registered_model_name: str | None = None  # also register it under this name in MLflow's model registry
    system_metrics: bool = False  # MLflow's own CPU, memory, disk, network (and GPU) sampling into system/*


@dataclass
class RunnerConfig:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    loss: Any = MISSING
    # null: the task's default metrics; else a list of names from runner.metrics.METRICS, or {name, _target_} nodes
    metrics: Any = None
    callbacks: Any = field(default_factory=dict)  # name -> a _target_ node (runner.callbacks.Callback)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # auto: continue the newest unfinished run of this config; never: a fresh run; or a run directory/checkpoint.
    resume: str = "auto"
    resume_force: bool = False  # with resume=PATH: start from a checkpoint of a different config
    resume_search: list[str] = field(default_factory=lambda: ["outputs", "multirun"])  # where resume=auto looks


def register_schemas() -> None:
    """Put the schemas where ``conf/config.yaml``'s defaults list finds them."""
    ConfigStore.instance().store(name="runner_schema", node=RunnerConfig)


def eval_batch_size(trainer) -> int:
    """The global batch of validation and test: ``trainer.eval_batch_size``, else EVAL_BATCH_FACTOR x the training
    batch (also for runs saved before the setting existed, which ``python -m runner.evaluate`` reads)."""
    size = trainer.get("eval_batch_size")
    return size if size is not None else EVAL_BATCH_FACTOR * trainer.batch_size


def torchrun_world_size() -> int | None:
    """The number of processes torchrun started, or None when this process was not started by it."""
    if all(key in os.environ for key in TORCHRUN_ENV):
        return int(os.environ["WORLD_SIZE"])
    return None


def check_strategy(trainer: DictConfig) -> None:
    """Refuse a strategy that does not fit how this process was started, and a batch that does not split."""
    if trainer.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={trainer.strategy}: use one of {', '.join(STRATEGIES)}.")
    if trainer.backend not in BACKENDS:
        raise ConfigError(f"trainer.backend={trainer.backend}: use one of {', '.join(BACKENDS)}.")
    world_size = torchrun_world_size()
    if trainer.strategy == "ddp" and world_size is None:
        raise ConfigError(
            "trainer.strategy=ddp needs the processes torchrun starts; launch with "
            "`torchrun --nproc_per_node=N -m runner trainer.strategy=ddp ...`, or use trainer.strategy=auto for one "
            "process."
        )
    if trainer.strategy == "single" and (world_size or 1) > 1:
        raise ConfigError(
            f"trainer.strategy=single, but torchrun started {world_size} processes, which would each train the "
            f"same run; use trainer.strategy=ddp (or auto), or start one process."
        )
    if world_size and trainer.strategy != "single" and trainer.batch_size % world_size:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is the global batch and must split evenly over the "
            f"{world_size} processes; use a multiple of {world_size}."
        )
    if world_size and trainer.strategy != "single" and eval_batch_size(trainer) % world_size:
        raise ConfigError(
            f"trainer.eval_batch_size={trainer.eval_batch_size} is the global batch of validation and must split "
            f"evenly over the {world_size} processes; use a multiple of {world_size}."
        )


def check_outcome_settings(trainer: DictConfig) -> None:
    """Gradient clipping, the best checkpoints and early stopping: values that cannot work, in one line each."""
    if trainer.gradient_clip_val is not None and not trainer.gradient_clip_val > 0:
        raise ConfigError(
            f"trainer.gradient_clip_val must be above 0 (or null: no clipping), got {trainer.gradient_clip_val}."
        )
    if trainer.accumulate_grad_batches < 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches must be at least 1 (1: a step per batch), got "
            f"{trainer.accumulate_grad_batches}."
        )
    if trainer.test_with not in ("best", "last"):
        raise ConfigError(f"trainer.test_with={trainer.test_with!r}: use best (checkpoints/best.pt) or last.")
    if trainer.gradient_clip_algorithm not in ("norm", "value"):
        raise ConfigError(f"trainer.gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}: use norm or value.")
    if trainer.monitor_mode not in (None, "min", "max"):
        raise ConfigError(
            f"trainer.monitor_mode={trainer.monitor_mode!r}: use min, max, or null (the metric's own direction)."
        )
    if trainer.keep_best < 1:
        raise ConfigError(f"trainer.keep_best must be at least 1, got {trainer.keep_best}.")
    stopping = trainer.early_stopping
    if stopping.patience < 0 or stopping.min_delta < 0:
        raise ConfigError(
            f"trainer.early_stopping: patience {stopping.patience}, min_delta {stopping.min_delta}; give patience "
            f">= 1 (0 turns it off) and min_delta >= 0."
        )


def check_settings(cfg: DictConfig) -> None:
    """Refuse impossible plain settings before anything is built.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        given = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} must be set (??? in the config); add {given} to the command.")
    trainer = cfg.trainer
    if trainer.epochs < 1:
        raise ConfigError(f"trainer.epochs must be at least 1, got {trainer.epochs}.")
    if trainer.batch_size < 1:
        raise ConfigError(f"trainer.batch_size must be at least 1, got {trainer.batch_size}.")
    if trainer.eval_batch_size is not None and trainer.eval_batch_size < 1:
        raise ConfigError(
            f"trainer.eval_batch_size must be at least 1 (or null: {EVAL_BATCH_FACTOR} x trainer.batch_size), got "
            f"{trainer.eval_batch_size}."
        )
    if trainer.checkpoint_every < 1:
        raise ConfigError(f"trainer.checkpoint_every must be at least 1 (epochs), got {trainer.checkpoint_every}.")
    if trainer.checkpoint_min_seconds < 0:
        raise ConfigError(
            f"trainer.checkpoint_min_seconds must be 0 (every checkpoint_every epochs) or more, got "
            f"{trainer.checkpoint_min_seconds}."
        )
    if trainer.checkpoint_every_steps < 0:
        raise ConfigError(
            f"trainer.checkpoint_every_steps must be 0 (at epoch ends only) or more, got "
            f"{trainer.checkpoint_every_steps}."
        )
    if trainer.keep_checkpoints < 1:
        raise ConfigError(f"trainer.keep_checkpoints must be at least 1, got {trainer.keep_checkpoints}.")
    if trainer.num_workers < 0:
        raise ConfigError(f"trainer.num_workers must be 0 or more, got {trainer.num_workers}.")
    if not DEVICE_PATTERN.match(str(trainer.device)):
        raise ConfigError(f"trainer.device={trainer.device!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if not cfg.tracking.wait_s > 0:
        raise ConfigError(f"tracking.wait_s must be above 0 seconds, got {cfg.tracking.wait_s}.")
    if cfg.tracking.log_every_n_steps < 0:
        raise ConfigError(f"tracking.log_every_n_steps must be 0 (off) or more, got {cfg.tracking.log_every_n_steps}.")
    if cfg.tracking.registered_model_name is not None and not cfg.tracking.log_model:
        raise ConfigError(
            "tracking.registered_model_name needs the model logged: drop tracking.log_model=false, or the name."
        )
    if cfg.tracking.system_metrics:
        _check_system_metrics_installed()
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision}: use one of {', '.join(PRECISIONS)}.")
    check_strategy(trainer)
    check_outcome_settings(trainer)
    lr = cfg.optimizer.get("lr")
    if lr is None or not isinstance(lr, int | float) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a number above 0, got {lr!r}.")


def _check_system_metrics_installed() -> None:
    """MLflow samples CPU and memory with psutil, which it does not install itself."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        raise ConfigError("tracking.system_metrics=true needs psutil: pip install psutil (and nvidia-ml-py for GPUs).")
