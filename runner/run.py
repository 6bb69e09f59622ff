"""One run, top to bottom: what this launch does, build, resume, track, train, finish. No Hydra here:
``__main__`` passes a RunContext.

Under DDP every rank runs this; rank 0 decides what the launch continues and shares it (runner.launch), writes
the checkpoints and the run record, and logs to MLflow (runner.session).
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from runner.build import build_everything
from runner.config import check_settings
from runner.device import seed_everything
from runner.distributed import Distributed, adopt_submitit_tasks, start_distributed
from runner.errors import RunnerError, Stopped
from runner.launch import Launch, RunContext, RunSettings, continued_config, decide_launch, refuse_sweep_under_torchrun
from runner.resume import adopt_run_dir
from runner.session import TrainingSession

log = logging.getLogger(__name__)

__all__ = ["RunContext", "run"]


def run(cfg: DictConfig, context: RunContext) -> float | None:
    """Train the configured model, or continue it, and return the final validation loss."""
    adopt_submitit_tasks()
    cfg = continued_config(cfg, context)
    check_settings(cfg)
    refuse_sweep_under_torchrun(context)
    ranks = start_distributed(cfg.trainer)
    try:
        result = train_run(cfg, context, ranks)
    except Stopped:
        ranks.close()  # every rank stopped after the same step and leaves together
        raise
    except RunnerError:
        if ranks.raised_together:  # rank 0's error, shared: no rank is left waiting in a collective
            ranks.close()
        raise
    ranks.close()  # not on another error: a rank may still wait on this one, and torchrun stops them all
    return result


def train_run(cfg: DictConfig, context: RunContext, ranks: Distributed) -> float | None:
    settings = RunSettings.of(cfg)
    launch = ranks.share(lambda: decide_launch(cfg, context, settings))
    record = launch.record
    adopt_run_dir(context.run_dir, record.run_dir, keep_log=ranks.is_main)
    if launch.finished:
        how = f"stopped early {record.stopped_early}" if record.stopped_early else "ran this config to the end"
        log.info(
            f"already finished: {record.run_dir} {how} (val_loss {record.final_val_loss}); nothing to do. Add "
            f"resume=never to train it again in a new run."
        )
        return record.final_val_loss

    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    built = build_everything(cfg, ranks.device, ranks.world_size)
    if ranks.world_size > 1:
        torch.manual_seed(
            cfg.trainer.seed + ranks.rank
        )  # the model is built alike everywhere; dropout differs per rank
    session = TrainingSession(cfg, built, record, settings, ranks)
    try:
        return _start_and_train(session, cfg, context, launch, ranks)
    finally:
        session.tracker.close()  # MLflow's own process, if any: every call was answered, it leaves


def _start_and_train(
    session: TrainingSession, cfg: DictConfig, context: RunContext, launch: Launch, ranks: Distributed
) -> float | None:
    record, settings = launch.record, session.settings
    if launch.checkpoint is not None:
        session.resume(launch)

    resolved_config = record.run_dir / "resolved_config.yaml"
    if ranks.is_main:
        record.save()
        OmegaConf.save(settings.config, resolved_config)
    sharing = ranks.describe(cfg.trainer.batch_size, cfg.trainer.accumulate_grad_batches)
    log.info(f"training on {ranks.device} in {record.run_dir}{sharing}")
    session.start_tracking(context, launch, resolved_config)
    return session.run()
