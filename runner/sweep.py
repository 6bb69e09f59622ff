"""What a multirun shares across its jobs: one sweep id, one ready MLflow store, one list of failed jobs.

Hydra calls ``SweepCallback`` in the launching process, before and after the jobs, whatever the launcher (basic,
joblib, submitit) and sweeper (basic, Optuna). Jobs may run in other processes or on other nodes, so what they
share goes through the environment (inherited by joblib workers and by SLURM jobs) and the sweep directory.
Nothing here imports torch; mlflow only when a multirun starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError, report_error

SWEEP_ID_ENV = "RUNNER_SWEEP_ID"
SWEPT_KEYS_ENV = "RUNNER_SWEPT_KEYS"  # the keys a multirun varies, comma-separated: its jobs are named by them
FAILED_JOBS_FILE = "failed_jobs.txt"


def sweep_id(config: DictConfig) -> str:
    """A short hash of the sweep as asked for: its config and its sweep overrides, but not the time it started.

    Running the same multirun command again (after an interruption, say) gives the same id, so resumed jobs,
    skipped finished jobs and jobs started only now are all found under one id in MLflow.
    """
    from runner.resume import split_settings
    from runner.tracking import flatten

    body = OmegaConf.to_container(config, resolve=False)
    body.pop("hydra", None)
    overrides = sorted(o for o in config.hydra.overrides.task if not _is_operational_override(o))
    settings = split_settings(flatten(body))[0]
    return hashlib.sha256(json.dumps([settings, overrides], sort_keys=True).encode()).hexdigest()[:12]


def override_key(key: str) -> str:
    """``+a.b``, ``~a.b``, ``a.b@pkg`` -> ``a.b``: an override's key, however it was written."""
    return key.lstrip("+~").split("@", 1)[0]


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: its sweep overrides (``a,b``, ``range()``, ``choice()``, ``glob()``) and the
    sweeper's own search space (``hydra.sweeper.params``, as Optuna's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [override_key(override.key_or_group) for override in parsed if override.is_sweep_override()]
    searched = [override_key(str(key)) for key in OmegaConf.select(config, "hydra.sweeper.params") or {}]
    return keys + [key for key in searched if key not in keys]


def _is_operational_override(override: str) -> bool:
    from runner.resume import split_settings

    key = override.split("=", 1)[0].lstrip("+~")
    return not split_settings({key: ""})[0]


def record_failed_job(sweep_dir: Path, name: str) -> None:
    """Note a failed job where the launching process finds it, even when the job ran in another process."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / FAILED_JOBS_FILE, "a", encoding="utf-8") as out:  # one short append: atomic enough
        out.write(name + "\n")


def prepare_tracking_store(uri: str | None, experiment: str) -> None:
    """Create the MLflow store's tables and the experiment once, before parallel jobs race to do it.

    Several processes creating one SQLite schema at once fail with "table already exists" or "database is
    locked"; once it exists, their short writes wait for each other.

    Raises:
        ConfigError: the store cannot be reached (one line, before any job starts).
    """
    from runner.tracking import open_experiment

    open_experiment(uri, experiment)


class SweepCallback(Callback):
    """Registered in conf/config.yaml under ``hydra.callbacks``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = sweep_id(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))
        try:
            prepare_tracking_store(config.tracking.uri, config.tracking.experiment)
        except RunnerError as err:
            sys.exit(report_error(err))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit 2 when a job stopped on bad input (each job reported its own line as it ended).

        Hydra's job logging is torn down once the sweep ends, so this line goes straight to stderr.
        """
        path = Path(config.hydra.sweep.dir) / FAILED_JOBS_FILE
        failed = [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []
        if failed:
            sys.exit(report_error(RunnerError(f"{len(failed)} job(s) failed: {'; '.join(failed)}")))
