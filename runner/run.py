"""One run, top to bottom: seed, build, track, train, finish. No Hydra here: ``__main__`` passes a RunContext."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from runner.build import build_everything
from runner.config import check_settings
from runner.data import make_batcher
from runner.errors import ConfigError
from runner.tracking import Tracker, flatten, git_commit
from runner.train import EpochResult, Loop, train

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Where the run lives and how it was asked for (from Hydra, or made by hand in tests)."""

    run_dir: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return ",".join(self.overrides) or "defaults"


def select_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name} but MPS is not available here; use trainer.device=auto or cpu.")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this to be reproducible; it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def epoch_metrics(result: EpochResult) -> dict[str, float]:
    """What MLflow gets for one epoch: ``lr`` (group 0), ``lr/group{i}`` when there are several, the losses."""
    metrics = {"lr": result.lrs[0]}
    if len(result.lrs) > 1:
        metrics.update({f"lr/group{i}": lr for i, lr in enumerate(result.lrs)})
    metrics.update(result.metrics)
    return metrics


def run(cfg: DictConfig, context: RunContext) -> float:
    """Train the configured model and return the final validation loss."""
    check_settings(cfg)
    device = select_device(cfg.trainer.device)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    built = build_everything(cfg, device)
    trainer = cfg.trainer
    loop = Loop(
        model=built.model,
        optimizer=built.optimizer,
        scheduler=built.scheduler,
        train_batches=make_batcher(built.data.train, trainer.batch_size, device, trainer.seed, True, trainer.num_workers),
        val_batches=make_batcher(built.data.val, trainer.batch_size, device, trainer.seed, False, trainer.num_workers),
        classification=built.data.is_classification,
        epochs=trainer.epochs,
        progress_bar=trainer.progress_bar,
    )

    context.run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved_path = context.run_dir / "resolved_config.yaml"
    OmegaConf.save(resolved, resolved_path)
    tags = {"run_dir": str(context.run_dir.resolve()), "overrides": " ".join(context.overrides) or "(none)", "device": str(device)}
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, context.run_name, tags)
    log.info(f"training on {device}; MLflow run {tracker.run_id} in {tracker.uri} (experiment {cfg.tracking.experiment!r})")
    tracker.log_params(flatten(resolved))
    tracker.log_artifact(resolved_path)

    try:
        results = train(loop, lambda result: tracker.log_metrics(epoch_metrics(result), step=result.epoch))
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return results[-1].metrics["val_loss"]
