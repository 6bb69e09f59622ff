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
from runner.errors import RunnerError, Stopped, full_traceback_wanted, report_error
from runner.sweep import SWEEP_ID_ENV, record_failed_job

log = logging.getLogger("runner")
register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runner.run import RunContext, run

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


def sweep_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """How MLflow groups the jobs of one sweep; the id is set by SweepCallback in the launching process."""
    sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve())
    return {"sweep_id": os.environ.get(SWEEP_ID_ENV) or sweep_dir, "sweep_dir": sweep_dir, "job_num": str(hydra_cfg.job.num)}


if __name__ == "__main__":
    main()
