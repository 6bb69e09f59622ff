"""One run, top to bottom: seed, build, resume?, track, train, finish. No Hydra here: ``__main__`` passes a RunContext.

Under DDP every rank runs this; rank 0 decides what the launch continues and shares it, writes the checkpoints
(with every rank's RNG streams) and the run record, and logs to MLflow.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from runner import __version__
from runner.build import Built, build_everything
from runner.checkpoint import CheckpointError, StepCheckpoints, capture_rng_state, load_checkpoint, load_newest_valid, restore_rng_state, save_checkpoint
from runner.config import check_settings
from runner.data import make_batcher
from runner.distributed import AgreedStop, Distributed, adopt_submitit_tasks, start_distributed
from runner.errors import ConfigError, RunnerError
from runner.persist import Persister
from runner.resume import (
    RunRecord,
    adopt_run_dir,
    config_fingerprint,
    describe_differences,
    find_latest_run,
    record_for_path,
    split_settings,
)
from runner.signals import EXIT_STOPPED, StopFlag
from runner.tracking import Tracker, check_store_reachable, flatten, git_commit
from runner.train import EpochResult, Loop, Progress, train

log = logging.getLogger(__name__)


class Stopped(RunnerError):
    """A stop signal ended the launch after a checkpoint; the same command resumes."""

    exit_code = EXIT_STOPPED


@dataclass
class RunContext:
    """Where this launch's Hydra put it and how it was asked for (from Hydra, or made by hand in tests)."""

    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option, e.g. scheduler -> cosine
    sweep: dict[str, str] = field(default_factory=dict)  # sweep_id, sweep_dir, job_num: for a job of a multirun

    @property
    def run_name(self) -> str:
        return ",".join(self.overrides) or "defaults"


@dataclass
class Start:
    """What this launch continues: nothing (a fresh run), or a run directory and perhaps one checkpoint file."""

    record: RunRecord | None = None
    checkpoint: Path | None = None
    bundle: dict[str, Any] | None = None
    forced_from: Path | None = None  # a new run started from another run's checkpoint
    finished: bool = False  # resume=auto found this config already trained to the end

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bundle": None}  # sent to the other ranks, which read the checkpoint file themselves


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


def precision_settings(precision: str, device: torch.device) -> dict[str, Any]:
    """Loop settings for trainer.precision: the autocast dtype, and a GradScaler for float16.

    Raises:
        ConfigError: bf16 on a GPU without bfloat16.
    """
    precision = str(precision)
    if precision == "32":
        return {}
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16 but this GPU has no bfloat16; use trainer.precision=16-mixed.")
        return {"autocast_dtype": torch.bfloat16}
    return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler(device.type)}


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


def decide_start(cfg: DictConfig, context: RunContext, fingerprint: str, settings: dict[str, str]) -> Start:
    """Apply ``resume``: auto (the newest run of this config), never, or a given run directory/checkpoint."""
    own = RunRecord.load(context.run_dir)  # a requeued cluster job, or a fixed hydra.run.dir, lands in its old directory
    if own is not None and (own.fingerprint != fingerprint or cfg.resume == "never"):
        why = "resume=never" if own.fingerprint == fingerprint else "this config differs from that run's"
        raise ConfigError(f"{context.run_dir} already holds a run and {why}; give this run another directory "
                          f"(hydra.run.dir=... or hydra.sweep.dir=...) so that one is not overwritten.")
    if cfg.resume == "never":
        return Start()
    if cfg.resume == "auto":
        return Start(own or find_latest_run([Path(root) for root in cfg.resume_search], fingerprint))
    record, checkpoint = record_for_path(Path(cfg.resume))
    if checkpoint is None:
        newest = load_newest_valid(record.run_dir if record else Path(cfg.resume))
        if newest is None:
            raise ConfigError(f"resume={cfg.resume}: none of its checkpoints can be read.")
        checkpoint, bundle = newest
    else:
        bundle = load_checkpoint(checkpoint)
    if record is not None and record.fingerprint == fingerprint == bundle["fingerprint"]:
        return Start(record, checkpoint, bundle)  # the same run: continue it in its own directory
    if bundle["fingerprint"] != fingerprint and not cfg.resume_force:
        saved = split_settings(flatten(bundle["config"]))[0]
        raise ConfigError(
            f"resume={cfg.resume}: that run's config differs ({describe_differences(saved, settings)}); "
            f"add resume_force=true to start a new run from its checkpoint anyway."
        )
    return Start(None, checkpoint, bundle, forced_from=checkpoint)  # a new run, starting from that state


def rank_state(progress: Progress, device: torch.device) -> dict[str, Any]:
    """What differs between the ranks: their RNG streams, and each one's running loss of the epoch in progress."""
    loss_sum = progress.loss_sum.detach().cpu() if progress.loss_sum is not None else None
    return {"rng": capture_rng_state(device), "loss_sum": loss_sum, "samples": progress.samples}


def state_bundle(loop: Loop, progress: Progress, history: list[dict[str, float]], lr_steps: dict[int, float], record: RunRecord,
                 config: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything that decides the rest of the run, as tensors and plain values (``weights_only`` loads it).

    ``ranks`` holds each rank's ``rank_state``; ``progress`` holds the running loss summed over them.
    """
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    summed = progress.state_dict()
    if summed["loss_sum"] is not None:
        summed["loss_sum"] = sum((r["loss_sum"] for r in ranks[1:]), ranks[0]["loss_sum"])
        summed["samples"] = sum(r["samples"] for r in ranks)
    return {
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "progress": summed,
        "ranks": ranks,
        "grad_scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "history": history,
        "lr_steps": lr_steps,  # per-step LRs of finished epochs (tracking.log_every_n_steps)
        "best_val_loss": min(val_losses, default=None),
        "mlflow_run_id": record.mlflow_run_id,
        "config": config,
        "fingerprint": record.fingerprint,
        "torch_version": str(torch.__version__),
        "runner_version": __version__,
        "finished": progress.epoch >= loop.epochs,
    }


def restore(loop: Loop, path: Path, bundle: dict[str, Any], ranks: Distributed) -> Progress:
    """Put the checkpoint's state into the built objects, and this rank's RNG streams and running loss.

    A run continued on another number of processes gives rank 0 the epoch's running loss and every rank rank 0's
    RNG streams: the data order is the same (a function of seed and epoch), the floating-point sums may differ.

    Raises:
        CheckpointError: when the checkpoint does not fit them (a forced resume across configs).
    """
    try:
        loop.model.load_state_dict(bundle["model"])
        loop.optimizer.load_state_dict(bundle["optimizer"])
        loop.scheduler.load_state_dict(bundle["scheduler"])  # holds last_epoch and base LRs: no initial_lr pitfall
        if loop.scaler is not None and bundle.get("grad_scaler"):
            loop.scaler.load_state_dict(bundle["grad_scaler"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit this config's model/optimizer/scheduler: {str(err).splitlines()[0]}") from None
    progress = Progress.from_state_dict(bundle["progress"], ranks.device)
    saved = bundle.get("ranks") or [{"rng": bundle["rng"]}]  # checkpoints before DDP held one "rng"
    if len(saved) == ranks.world_size:
        mine = saved[ranks.rank]
        if "loss_sum" in mine and mine["loss_sum"] is not None:
            progress.loss_sum, progress.samples = mine["loss_sum"].to(ranks.device), mine["samples"]
    else:
        if ranks.is_main:
            log.warning(f"{path.name} was written by {len(saved)} process(es), this launch has {ranks.world_size}: "
                        f"same data order, floating-point sums may differ from an uninterrupted run.")
        mine = saved[0]
        if not ranks.is_main and progress.loss_sum is not None:
            progress.loss_sum, progress.samples = torch.zeros_like(progress.loss_sum), 0
    restore_rng_state(mine["rng"], ranks.device)
    return progress


def plan_start(cfg: DictConfig, context: RunContext, fingerprint: str, settings: dict[str, str]) -> Start:
    """What this launch continues, its run directory made and the checkpoint to start from chosen (rank 0)."""
    check_store_reachable(cfg.tracking.uri)  # MLflow itself opens once training has started
    start = decide_start(cfg, context, fingerprint, settings)
    if start.record is not None and start.record.finished and cfg.resume == "auto":
        start.finished = True
        return start
    if start.record is not None and start.checkpoint is None:
        newest = load_newest_valid(start.record.run_dir)  # None: killed before its first checkpoint; start over
        if newest is not None:
            start.checkpoint, start.bundle = newest
    start.record = start.record or RunRecord.new(context.run_dir, fingerprint)
    start.record.run_dir.mkdir(parents=True, exist_ok=True)
    return start


def make_loop(cfg: DictConfig, built: Built, ranks: Distributed) -> Loop:
    """The loop over the built objects: this rank's batchers, the model wrapped in DDP and compiled if asked."""
    trainer = cfg.trainer
    wrapped = ranks.wrap(built.model) if ranks.enabled else None
    compiled = torch.compile(wrapped or built.model) if trainer.compile else None
    batches = {split: make_batcher(dataset, trainer.batch_size, ranks.device, trainer.seed, split == "train", trainer.num_workers,
                                   ranks.rank, ranks.world_size)
               for split, dataset in (("train", built.data.train), ("val", built.data.val))}
    return Loop(
        model=built.model,
        optimizer=built.optimizer,
        scheduler=built.scheduler,
        train_batches=batches["train"],
        val_batches=batches["val"],
        classification=built.data.is_classification,
        epochs=trainer.epochs,
        progress_bar=trainer.progress_bar and ranks.is_main,
        **precision_settings(trainer.precision, ranks.device),
        forward=None if ranks.enabled else compiled,  # under DDP validation runs the plain model: no collectives
        train_forward=(compiled or wrapped) if ranks.enabled else None,
        ranks=ranks if ranks.enabled else None,
        scheduler_per_batch=built.plan.stepped_per_batch,
        monitor=built.plan.monitor,
        log_lr_every=cfg.tracking.log_every_n_steps,
    )


def run(cfg: DictConfig, context: RunContext) -> float | None:
    """Train the configured model, or continue it, and return the final validation loss."""
    adopt_submitit_tasks()
    check_settings(cfg)
    if context.sweep and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's processes would run every job in turn
        raise ConfigError("a sweep (-m) under torchrun is not supported; start one torchrun per job, e.g. "
                          "`for s in cosine linear; do torchrun --nproc_per_node=N -m runner scheduler=$s; done`.")
    ranks = start_distributed(cfg.trainer, select_device)
    try:
        result = train_run(cfg, context, ranks)
    except Stopped:
        ranks.close()  # every rank stopped after the same step and leaves together
        raise
    ranks.close()  # not on an error: another rank may still wait on this one, and torchrun stops them all
    return result


def train_run(cfg: DictConfig, context: RunContext, ranks: Distributed) -> float | None:
    config = OmegaConf.to_container(cfg, resolve=True)
    settings, operational = split_settings(flatten(config))
    fingerprint = config_fingerprint(settings)
    start = ranks.share(lambda: plan_start(cfg, context, fingerprint, settings))
    record = start.record
    adopt_run_dir(context.run_dir, record.run_dir, keep_log=ranks.is_main)
    if start.finished:
        log.info(f"already finished: {record.run_dir} ran this config to the end (val_loss {record.final_val_loss}); "
                 f"nothing to do. Add resume=never to train it again in a new run.")
        return record.final_val_loss

    device = ranks.device
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    built = build_everything(cfg, device, ranks.world_size)
    if ranks.world_size > 1:
        torch.manual_seed(cfg.trainer.seed + ranks.rank)  # the model is built alike everywhere; dropout differs per rank
    loop = make_loop(cfg, built, ranks)
    trainer = cfg.trainer

    progress, history, lr_steps = Progress(), [], {}
    if start.checkpoint is not None:
        bundle = start.bundle if start.bundle is not None else load_checkpoint(start.checkpoint)
        progress, history = restore(loop, start.checkpoint, bundle, ranks), list(bundle["history"])
        lr_steps = dict(bundle.get("lr_steps", {}))
        log.info(f"resuming {record.run_dir} from {start.checkpoint.name}: epoch {progress.epoch + 1}/{loop.epochs}, "
                 f"batch {progress.batch} of {len(loop.train_batches)}")

    resolved_path = record.run_dir / "resolved_config.yaml"
    if ranks.is_main:
        record.save()
        OmegaConf.save(config, resolved_path)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, context.run_name)
    logged_before = list(history), dict(lr_steps)  # the loop appends to both while MLflow opens

    def open_tracking() -> None:
        """MLflow opens on the persist thread, while the first steps run: importing it and opening its store take
        seconds. It is that thread's first job, so every metric is logged after it."""
        tracker.open(run_id=record.mlflow_run_id)
        record.mlflow_run_id = tracker.run_id
        record.save()
        if not tracker.resumed:
            tracker.log_params(settings)
            tracker.log_artifact(resolved_path)
        tracker.set_tags(_tags(context, record, device, operational, start, ranks))  # runs `git`: off the training thread
        tracker.log_epochs(list(enumerate(logged_before[0])))  # epochs checkpointed but not logged when the last launch died
        tracker.log_series("lr_step", logged_before[1])
        log.info(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {cfg.tracking.experiment!r})")

    log.info(f"training on {device} in {record.run_dir}{ranks.describe(trainer.batch_size)}")
    persister = Persister()
    if ranks.is_main:
        persister.submit(open_tracking)
    on_epoch_end = EpochPersistence(loop, progress, history, lr_steps, record, config, tracker, persister, trainer, ranks)
    flag = StopFlag().install()
    stop = AgreedStop(flag, ranks) if ranks.enabled else flag
    if trainer.checkpoint_every_steps:
        stop = StepCheckpoints(stop, trainer.checkpoint_every_steps, on_epoch_end.checkpoint,
                               mid_epoch=lambda: 0 < progress.batch < len(loop.train_batches))
    try:
        completed = train(loop, progress, on_epoch_end, stop)
        path = None if completed else on_epoch_end.checkpoint()
        persister.close()  # every epoch logged before the run is called stopped or finished
    except BaseException as err:
        flag.uninstall()
        _close_quietly(persister)
        if tracker.opened:
            tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if not completed:
        flag.uninstall()
        if tracker.opened:
            tracker.finish("KILLED")
        ranks.barrier()  # no rank exits before rank 0 has written: torchrun stops the others when one exits
        stopped = Stopped(f"stopped by {stop.signal_name} at epoch {progress.epoch + 1}, batch {progress.batch}; "
                          f"checkpoint {path}. Run the same command again to resume.")
        stopped.hand_over = stop.hand_over  # __main__ calls it once the stop is logged and the ranks have left their group
        raise stopped
    if ranks.is_main:
        record.finished, record.final_val_loss = True, history[-1]["val_loss"]
        record.save()
        tracker.finish("FINISHED")
    # Only now: a stop signal until the run is marked finished, in runner.json and in MLflow, is ignored. Handed
    # on, submitit's handler would requeue the job and exit between the two, leaving the MLflow run RUNNING.
    flag.uninstall()
    return history[-1]["val_loss"]


class EpochPersistence:
    """The end of each epoch: record its metrics and, when a checkpoint is due, write it, then hand the MLflow
    logging of every epoch since the last checkpoint to the persist thread.

    A checkpoint is due every ``trainer.checkpoint_every`` epochs, but not sooner than
    ``trainer.checkpoint_min_seconds`` after the last one (and always after the last epoch): a 15 ms epoch would
    otherwise spend a fifth of its time writing. Checkpoints are written here, on the training thread, so one is
    on disk when the epoch ends; MLflow, slow to open and to write to, logs on the persist thread, and only
    epochs a checkpoint already holds, so it never shows an epoch a restart would train again.

    Under DDP every rank takes part (rank 0's decision is shared; every rank's RNG streams go into the
    checkpoint) and rank 0 alone writes and logs.
    """

    def __init__(self, loop: Loop, progress: Progress, history: list[dict[str, float]], lr_steps: dict[int, float],
                 record: RunRecord, config: dict[str, Any], tracker: Tracker, persister: Persister, trainer: DictConfig,
                 ranks: Distributed):
        self.loop, self.progress, self.history, self.lr_steps = loop, progress, history, lr_steps
        self.record, self.config, self.tracker, self.persister, self.trainer = record, config, tracker, persister, trainer
        self.ranks = ranks
        self.unlogged: list[tuple[int, dict[str, float], dict[int, float]]] = []  # (epoch, metrics, lr_steps)
        self.last_checkpoint = time.monotonic()

    def __call__(self, result: EpochResult) -> None:
        metrics = epoch_metrics(result)
        self.history.append(metrics)
        self.lr_steps.update(result.lr_steps)
        self.unlogged.append((result.epoch, metrics, result.lr_steps))
        epoch, trainer = self.progress.epoch, self.trainer
        due = epoch == self.loop.epochs or self.ranks.share(
            lambda: epoch % trainer.checkpoint_every == 0 and time.monotonic() - self.last_checkpoint >= trainer.checkpoint_min_seconds)
        if due:
            self.checkpoint()

    def checkpoint(self) -> Path | None:
        """Write a checkpoint of where training stands, then have the epochs it holds logged (on rank 0)."""
        rank_states = self.ranks.gather(rank_state(self.progress, self.ranks.device))
        if not self.ranks.is_main:
            return None
        bundle = state_bundle(self.loop, self.progress, self.history, self.lr_steps, self.record, self.config, rank_states)
        path = save_checkpoint(self.record.run_dir, bundle, self.trainer.keep_checkpoints)
        self.last_checkpoint = time.monotonic()
        epochs, self.unlogged = self.unlogged, []
        partial = dict(self.progress.lr_steps)  # a stopped epoch's steps so far; its checkpoint holds them too
        self.persister.submit(lambda: self.log(epochs, partial))
        return path

    def log(self, epochs: list[tuple[int, dict[str, float], dict[int, float]]], partial: dict[int, float]) -> None:
        self.tracker.log_epochs([(epoch, metrics) for epoch, metrics, _ in epochs])
        steps = {step: lr for _, _, epoch_steps in epochs for step, lr in epoch_steps.items()}
        self.tracker.log_series("lr_step", {**steps, **partial})


def _close_quietly(persister: Persister) -> None:
    """Let the persist thread finish what it has while another error is on its way up; that error is the one to report."""
    try:
        persister.close()
    except Exception as err:  # noqa: BLE001
        log.warning(f"while stopping on an error, writing a checkpoint or logging also failed: {err}")


def _tags(context: RunContext, record: RunRecord, device: torch.device, operational: dict[str, str], start: Start,
          ranks: Distributed) -> dict[str, str]:
    """Tags may change between launches (device, number of processes, tracking settings); params may not."""
    tags = {"run_dir": str(record.run_dir.resolve()), "overrides": " ".join(context.overrides) or "(none)", "device": str(device),
            "world_size": str(ranks.world_size), "config_fingerprint": record.fingerprint, **context.choices, **context.sweep,
            **operational}
    if start.forced_from is not None:
        tags["started_from"] = str(start.forced_from)
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
