"""What this launch does: start a fresh run, continue one (from which checkpoint), or say it is already done.

Rank 0 decides (``decide_launch``) and every rank follows; the run directory is made here. Nothing is built yet.
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from runner.checkpoint import checkpoint_fingerprint, list_checkpoints, load_checkpoint, load_newest_valid
from runner.errors import ConfigError, Diverged
from runner.locks import locked
from runner.resume import (
    RUN_RECORD,
    RunRecord,
    config_fingerprint,
    describe_differences,
    find_runs,
    hold_run_dir,
    record_for_path,
    run_dir_of,
    split_settings,
)
from runner.sweep import override_key
from runner.tracking import check_store_reachable, flatten

log = logging.getLogger(__name__)

LAUNCH_LOCK = ".runner-launch.lock"  # in each search root: launches decide what they continue one at a time


@dataclass
class RunContext:
    """Where this launch's Hydra put it and how it was asked for (from Hydra, or made by hand in tests)."""

    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option, e.g. scheduler -> cosine
    sweep: dict[str, str] = field(default_factory=dict)  # sweep_id, sweep_dir, job_num: for a job of a multirun
    swept: list[str] = field(default_factory=list)  # the keys the multirun varies (runner.sweep.swept_keys)

    @property
    def run_name(self) -> str:
        """A multirun's job: the overrides that set it apart from the others (``scheduler=cosine optimizer.lr=0.1``);
        a single run: all of its overrides."""
        apart = [o for o in self.overrides if override_key(o.split("=", 1)[0]) in self.swept]
        return " ".join(apart) if apart else ",".join(self.overrides) or "defaults"


@dataclass
class RunSettings:
    """The resolved config, split into what decides the result (hashed into the fingerprint) and the rest."""

    config: dict[str, Any]
    result: dict[str, str]  # flattened; MLflow params
    operational: dict[str, str]  # flattened; MLflow tags, free to change between launches
    fingerprint: str

    @classmethod
    def of(cls, cfg: DictConfig) -> RunSettings:
        config = OmegaConf.to_container(cfg, resolve=True)
        result, operational = split_settings(flatten(config))
        return cls(config, result, operational, config_fingerprint(result))


@dataclass
class Launch:
    """What this launch continues: nothing (a fresh run), or a run directory and perhaps one checkpoint file."""

    record: RunRecord | None = None
    checkpoint: Path | None = None
    bundle: dict[str, Any] | None = None
    forced_from: Path | None = None  # a new run started from another run's checkpoint
    finished: bool = False  # resume=auto found this config already trained to the end
    extended_from: int | None = None  # the run continues with another trainer.epochs than it was planned for

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bundle": None}  # sent to the other ranks, which read the checkpoint file themselves

    def checkpoint_bundle(self) -> dict[str, Any] | None:
        if self.checkpoint is None:
            return None
        return self.bundle if self.bundle is not None else load_checkpoint(self.checkpoint)


def continued_config(cfg: DictConfig, context: RunContext) -> DictConfig:
    """``resume=RUN_DIR`` continues that run's own config (its ``resolved_config.yaml``), with this command's
    ``key=value`` overrides on top: ``python -m runner resume=RUN_DIR trainer.epochs=30`` takes a run further
    without its config typed again. The ``resume*`` keys are always this command's. A config group chosen on the
    command line (``scheduler=step``), ``+key``, ``~key``, ``resume_force=true`` (a new run from that checkpoint)
    or a sweep: the config this command composes, as for any other launch.
    """
    if cfg.resume in ("auto", "never") or cfg.resume_force or context.sweep:
        return cfg
    keys = [override.split("=", 1)[0] for override in context.overrides]
    if any(key.startswith(("+", "~")) or key in context.choices for key in keys):
        return cfg
    saved = run_dir_of(Path(cfg.resume).expanduser()) / "resolved_config.yaml"
    if not saved.is_file():
        return cfg
    continued = cfg.copy()  # keeps the schema's types: the run's values are checked as this command's are
    with open_dict(continued):
        for key, value in OmegaConf.load(saved).items():
            typed = OmegaConf.is_config(continued.get(key)) and OmegaConf.get_type(continued[key]) is not dict
            continued[key] = OmegaConf.merge(continued[key], value) if typed else value
        for key in [*keys, "resume", "resume_force", "resume_search"]:  # a key the saved node lacks may be added
            OmegaConf.update(continued, key, OmegaConf.select(cfg, key), merge=False)
    return continued


def refuse_sweep_under_torchrun(context: RunContext) -> None:
    if context.sweep and "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's processes would run every job in turn
        raise ConfigError(
            "a sweep (-m) under torchrun is not supported; start one torchrun per job, e.g. "
            "`for s in cosine linear; do torchrun --nproc_per_node=N -m runner scheduler=$s; done`."
        )


def decide_launch(cfg: DictConfig, context: RunContext, settings: RunSettings) -> Launch:
    """What this launch continues, its run directory made and held and the checkpoint to start from chosen (rank 0).

    Launches decide one at a time (a lock in each search root) and each holds the run directory it trains in
    (``hold_run_dir``) before its ``runner.json`` is written: of several launches of one command started at once,
    one trains and the others find its run held.

    Raises:
        RunInUse: the run this launch would continue is being trained by another process.
        Diverged: the run this launch would continue diverged (resume=never trains the config afresh).
    """
    check_store_reachable(cfg.tracking.uri)  # MLflow itself opens once training has started
    with _decision_locks(cfg, context):
        launch = _apply_resume(cfg, context, settings)
        if launch.record is not None and launch.record.finished and cfg.resume == "auto":
            launch.finished = True
            return launch
        if launch.record is not None and launch.record.diverged and cfg.resume != "never":
            raise Diverged(
                f"{launch.record.run_dir} diverged: {launch.record.diverged.removeprefix('training diverged: ')}. "
                f"Resuming it would diverge again; lower optimizer.lr (a changed config is a new run), or add "
                f"resume=never (and a new hydra.run.dir if you set one) to train this config afresh."
            )
        launch.record = launch.record or RunRecord.new(context.run_dir, settings.fingerprint)
        hold_run_dir(launch.record.run_dir)
        if launch.checkpoint is None and cfg.resume == "auto":
            # None: killed before its first checkpoint; start over. A checkpoint of another config is skipped.
            newest = load_newest_valid(launch.record.run_dir, settings.fingerprint)
            if newest is None and launch.record.earlier_fingerprints:  # taken further, killed before checkpointing
                newest = load_newest_valid(launch.record.run_dir, launch.record.earlier_fingerprints[-1])
                launch.extended_from = epochs_changed_from(newest[1]["config"], settings) if newest else None
                newest = newest if launch.extended_from is not None else None
            if newest is not None:
                launch.checkpoint, launch.bundle = newest
        if launch.extended_from is not None:  # from now on it is a run of this config, unfinished
            record = launch.record
            if record.fingerprint != settings.fingerprint:  # its checkpoints so far stay the run's (runner.evaluate)
                record.earlier_fingerprints = [*record.earlier_fingerprints, record.fingerprint]
            record.fingerprint, record.finished = settings.fingerprint, False
            record.stopped_early = record.test_metrics = None
        launch.record.save()  # a launch deciding next finds this run, and finds it held
    return launch


def _decision_locks(cfg: DictConfig, context: RunContext) -> ExitStack:
    """Launches that could find one another's runs take turns deciding: a lock in each ``resume_search`` folder that
    exists (Hydra has made this launch's own folder, in one of them by default), taken in one order for all."""
    roots = sorted({Path(root).resolve() for root in cfg.resume_search if Path(root).is_dir()})
    stack = ExitStack()
    for root in roots or [context.run_dir.parent]:
        stack.enter_context(locked(root / LAUNCH_LOCK))
    return stack


def _checkpoints_agree(record: RunRecord) -> bool:
    """Whether the run directory's checkpoints bear out its ``runner.json``: one of them has its fingerprint, or
    none can be read. A record copied from another run, or edited, gets one warning and is not continued."""
    others = set()
    for path in reversed(list_checkpoints(record.run_dir)):
        found = checkpoint_fingerprint(path)
        if found in (record.fingerprint, *record.earlier_fingerprints):
            return True
        if found is not None:
            others.add(found)
    if others:
        log.warning(
            f"run record {record.run_dir / RUN_RECORD} says config {record.fingerprint}, but the checkpoints beside it "
            f"are another config's ({', '.join(sorted(others))}); skipping that run directory"
        )
    return not others


def _apply_resume(cfg: DictConfig, context: RunContext, settings: RunSettings) -> Launch:
    """``resume``: auto (the newest run of this config), never, or a given run directory or checkpoint."""
    fingerprint = settings.fingerprint
    own = RunRecord.load(context.run_dir)  # a requeued cluster job, or a fixed hydra.run.dir, lands in its old dir
    if own is not None and (own.fingerprint != fingerprint or cfg.resume == "never"):
        why = "resume=never" if own.fingerprint == fingerprint else "this config differs from that run's"
        raise ConfigError(
            f"{context.run_dir} already holds a run and {why}; give this run another directory "
            f"(hydra.run.dir=... or hydra.sweep.dir=...) so that one is not overwritten."
        )
    if cfg.resume == "never":
        return Launch()
    if cfg.resume == "auto":
        if own is not None and not _checkpoints_agree(own):
            raise ConfigError(
                f"{context.run_dir} holds a runner.json of this config but only another config's checkpoints; give "
                f"this run another directory (hydra.run.dir=...) so that they are not overwritten."
            )
        runs = [own] if own is not None else find_runs([Path(root) for root in cfg.resume_search], fingerprint)
        return Launch(next((record for record in runs if record is own or _checkpoints_agree(record)), None))
    record, checkpoint = record_for_path(Path(cfg.resume))
    if checkpoint is None:
        newest = load_newest_valid(record.run_dir if record else Path(cfg.resume))
        if newest is None:
            raise ConfigError(f"resume={cfg.resume}: none of its checkpoints can be read.")
        checkpoint, bundle = newest
    else:
        bundle = load_checkpoint(checkpoint)
    if record is not None and record.fingerprint == fingerprint == bundle["fingerprint"]:
        return Launch(record, checkpoint, bundle)  # the same run: continue it in its own directory
    planned = epochs_changed_from(bundle["config"], settings)
    if record is not None and planned is not None and not cfg.resume_force:  # the same run, longer: in its directory
        newest = load_newest_valid(record.run_dir)
        if newest is None or newest[0] != checkpoint:  # an older one would train over epochs the run has
            raise ConfigError(
                f"resume={cfg.resume}: to take a run further, continue from its newest readable checkpoint "
                f"({newest[0] if newest else 'none'}): give resume={record.run_dir}."
            )
        trained = bundle["progress"]["epoch"]
        if cfg.trainer.epochs <= trained:
            raise ConfigError(
                f"resume={cfg.resume}: that run has trained {trained} epoch(s); trainer.epochs={cfg.trainer.epochs} "
                f"adds none. Give more epochs to take it further, or score it with python -m runner.evaluate "
                f"{record.run_dir}."
            )
        return Launch(record, checkpoint, bundle, extended_from=planned)
    if bundle["fingerprint"] != fingerprint and not cfg.resume_force:
        saved = split_settings(flatten(bundle["config"]))[0]
        raise ConfigError(
            f"resume={cfg.resume}: that run's config differs ({describe_differences(saved, settings.result)}); "
            f"add resume_force=true to start a new run from its checkpoint anyway, in the config this command composes."
        )
    return Launch(None, checkpoint, bundle, forced_from=checkpoint)  # a new run, starting from that state


def epochs_changed_from(saved_config: dict[str, Any], settings: RunSettings) -> int | None:
    """The epochs a checkpoint's run was planned for, when this launch's config differs from its in
    ``trainer.epochs`` alone (a run taken further); None otherwise."""
    saved = split_settings(flatten(saved_config))[0]
    differing = {key for key in saved.keys() | settings.result.keys() if saved.get(key) != settings.result.get(key)}
    return int(saved["trainer.epochs"]) if differing == {"trainer.epochs"} else None
