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
from runner.errors import ConfigError, RunnerError
from runner.sweep import SWEEP_ID_ENV, failed_jobs, record_failed_job

log = logging.getLogger("runner")
register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runner.run import RunContext, Stopped, run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    context = RunContext(
        Path(hydra_cfg.runtime.output_dir),
        list(hydra_cfg.overrides.task),
        choices={group: str(option) for group, option in hydra_cfg.runtime.choices.items() if not group.startswith("hydra/")},
        sweep=sweep_tags(hydra_cfg) if multirun else {},
    )
    try:
        return run(cfg, context)
    except Stopped as err:
        if not reported_by_another_rank(err):
            log.warning(str(err))
        # Only now the signal goes on to the handler the runner displaced: submitit's requeues the job and exits
        # inside it, so the stop had to be logged first, and every rank had to leave the process group first.
        hand_over = getattr(err, "hand_over", None)
        if hand_over is not None:
            hand_over()
        sys.exit(err.exit_code)  # in a sweep too: the scheduler is stopping the whole job
    except RunnerError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not reported_by_another_rank(err):
            log.error(f"error: {err}")
        if multirun:
            record_failed_job(Path(hydra_cfg.sweep.dir), context.run_name)
            return None
        sys.exit(err.exit_code)


def reported_by_another_rank(err: RunnerError) -> bool:
    """Under torchrun every rank meets a bad setting, or a stop, alike: rank 0 reports it once for all."""
    from runner.run import Stopped

    if os.environ.get("RANK", "0") == "0":
        return False
    return getattr(err, "reported_by_rank_zero", False) or isinstance(err, ConfigError | Stopped)


def sweep_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """How MLflow groups the jobs of one sweep; the id is set by SweepCallback in the launching process."""
    sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve())
    return {"sweep_id": os.environ.get(SWEEP_ID_ENV) or sweep_dir, "sweep_dir": sweep_dir, "job_num": str(hydra_cfg.job.num)}


def entry() -> None:
    main()
    if failed_jobs:
        # Hydra's job logging is torn down once the sweep ends, so this goes straight to stderr.
        print(f"error: {len(failed_jobs)} job(s) failed: {'; '.join(failed_jobs)}", file=sys.stderr)
        sys.exit(RunnerError.exit_code)


if __name__ == "__main__":
    entry()
