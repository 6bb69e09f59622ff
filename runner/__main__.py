"""``python -m runner overrides…``: compose the config with Hydra, run it, and report user errors in one line.

Nothing here imports torch: ``python -m runner --cfg job`` only composes and prints the config.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config import register_schemas
from runner.errors import (
    RAISED_FOR_RUNNER_ENV,
    ConfigError,
    RunnerError,
    Stopped,
    full_traceback_wanted,
    is_config_error,
    report_error,
)
from runner.sweep import SWEEP_ID_ENV, SWEEP_PARENT_ENV, SWEPT_KEYS_ENV, record_failed_job

log = logging.getLogger("runner")
register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runner.tracking_process import prestart

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun:  # a sweep's process runs job after job: MLflow, imported once there, serves them all
        # MLflow's own process imports MLflow on another core while this one imports torch
        prestart(warm_model_logging=_wants_model_logged(cfg))
    from runner.run import RunContext, run

    context = RunContext(
        Path(hydra_cfg.runtime.output_dir),
        list(hydra_cfg.overrides.task),
        choices={
            group: str(option) for group, option in hydra_cfg.runtime.choices.items() if not group.startswith("hydra/")
        },
        sweep=sweep_tags(hydra_cfg) if multirun else {},
        swept=[key for key in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if key] if multirun else [],
    )
    try:
        return run(cfg, context)
    except RunnerError as err:
        if full_traceback_wanted() and not isinstance(err, Stopped):
            raise
        exit_code = report_error(err, log)
        if isinstance(err, Stopped):
            # Only now the signal goes on to the handler the runner displaced: submitit's requeues the job and exits
            # inside it, so the stop had to be logged first, and every rank had to leave the process group first.
            err.hand_over()
            sys.exit(exit_code)  # in a sweep too: the scheduler is stopping the whole job
        if multirun:
            record_failed_job(Path(hydra_cfg.sweep.dir), context.run_name)
            return None
        sys.exit(exit_code)
    finally:
        if multirun:
            settle_between_jobs()


def _wants_model_logged(cfg: DictConfig) -> bool:
    """``tracking.log_model``, read before the config is checked: a value that is not plainly true warms nothing
    up (the check then says what is wrong with it)."""
    try:
        return cfg.tracking.log_model is True
    except Exception:  # noqa: BLE001 - an interpolation that does not resolve, say: said by the check itself
        return False


def sweep_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """How MLflow groups the jobs of one sweep; the id is set by SweepCallback in the launching process."""
    sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve())
    tags = {
        "sweep_id": os.environ.get(SWEEP_ID_ENV) or sweep_dir,
        "sweep_dir": sweep_dir,
        "job_num": str(hydra_cfg.job.num),
        "mlflow.parentRunId": os.environ.get(SWEEP_PARENT_ENV),  # the UI shows the sweep as one expandable row
    }
    return {key: value for key, value in tags.items() if value}


def entry() -> None:
    """``main()``, with Hydra's own config errors (a misspelled key, an unknown option, an override its grammar
    cannot parse) reported in one line with exit code 2, as the runner's are.

    Hydra prints those itself, on several lines, and exits 1, unless HYDRA_FULL_ERROR=1 asks it to raise them: so
    that is set (marked as the runner's doing, see ``full_traceback_wanted``) and they are caught here. Other
    errors keep their traceback; a user's own HYDRA_FULL_ERROR=1 keeps Hydra's full one for everything.
    """
    if full_traceback_wanted():
        main()
        return
    os.environ.update({"HYDRA_FULL_ERROR": "1", RAISED_FOR_RUNNER_ENV: "1"})  # inherited by a sweep's workers too
    try:
        main()
    except Exception as err:
        if not is_config_error(err):
            raise
        sys.exit(report_error(ConfigError(one_line(err))))


def one_line(err: BaseException) -> str:
    """Hydra's or OmegaConf's multi-line message in one line: the message, its cause, the options it lists; for an
    override Hydra's grammar cannot parse, how to quote it."""
    from hydra.errors import OverrideParseException

    if isinstance(err, OverrideParseException):
        reason = str(err).strip().splitlines()[0] if str(err).strip() else "not valid"
        return (
            f"cannot parse the override {err.override!r}: {reason}. Quote a value with spaces, brackets, parentheses "
            f"or operators twice, for the shell and for Hydra: 'key=\"value\"', e.g. "
            f"'scheduler.lr_lambda=\"0.5 ** (epoch // 3)\"'."
        )
    own, caused = _lines(err), _lines(err.__cause__) if err.__cause__ is not None else []
    return "; ".join([*own[:1], *caused, *own[1:]]) or type(err).__name__


def _lines(err: BaseException) -> list[str]:
    """The lines of Hydra's message that say something, each option list folded into the line naming it."""
    parts: list[str] = []
    for line in str(err).splitlines():
        text = line.strip()
        if text.startswith(("Config search path", "See https://")):
            break
        if not text or text.split("=")[0].split(":")[0] in ("full_key", "reference_type", "object_type"):
            continue
        if line.startswith(("\t", "    ")) and parts and ":" in parts[-1]:
            parts[-1] += f" {text}" if parts[-1].endswith(":") else f", {text}"  # an option listed under it
        else:
            parts.append(text.rstrip("."))
    return parts


def settle_between_jobs() -> None:
    """After each job in a sweep's process (a joblib worker, or the launching process under the basic launcher),
    which runs job after job and ends with the sweep: collect what the job left, then freeze what survives (torch,
    MLflow, SQLAlchemy and their modules), so the next jobs' collections and the final one at the process's exit
    skip them. A 4-job joblib sweep of 5-epoch runs took 12.0 s instead of 13.4 (median of 3, 2 cores), most of
    it the workers' exit. Not ``end_quickly``: the process goes on."""
    import gc

    gc.collect()
    gc.freeze()


def end_quickly() -> None:
    """Spare the process the garbage collection of everything torch, MLflow and SQLAlchemy made (about 1.7 s of
    CPU at exit on a 2-core machine): the objects left are frozen, so the interpreter's final collections skip
    them. Only here, where the process really ends, after the run has closed its files, its MLflow run and its
    process group; ``atexit`` handlers (logging's flush among them) still run."""
    import gc

    gc.freeze()


if __name__ == "__main__":
    try:
        entry()
    finally:
        end_quickly()
