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
from runner.errors import RunnerError

log = logging.getLogger("runner")
register_schemas()

# Jobs of a multirun that stopped on a user error; the sweep goes on and the process exits non-zero.
failed_jobs: list[str] = []


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from runner.run import RunContext, Stopped, run

    hydra_cfg = HydraConfig.get()
    context = RunContext(Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    try:
        return run(cfg, context)
    except Stopped as err:
        log.warning(str(err))
        sys.exit(err.exit_code)  # in a sweep too: the scheduler is stopping the whole job
    except RunnerError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error(f"error: {err}")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            failed_jobs.append(context.run_name)
            return None
        sys.exit(err.exit_code)


def entry() -> None:
    main()
    if failed_jobs:
        # Hydra's job logging is torn down once the sweep ends, so this goes straight to stderr.
        print(f"error: {len(failed_jobs)} job(s) failed: {'; '.join(failed_jobs)}", file=sys.stderr)
        sys.exit(RunnerError.exit_code)


if __name__ == "__main__":
    entry()
