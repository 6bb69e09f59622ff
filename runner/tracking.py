"""MLflow, behind one small class: start a run, log params, per-epoch metrics and artifacts, end it.

It uses ``MlflowClient`` with explicit run ids rather than the fluent API's global active run, so a run can be
re-attached by id when a job resumes.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole, as their string."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit(directory: Path) -> str | None:
    """The commit checked out in ``directory``, or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Tracker:
    """One MLflow run of one training job."""

    def __init__(self, uri: str | None, experiment: str, run_name: str, tags: dict[str, str]):
        from mlflow import MlflowClient

        # MLflow sets its loggers to INFO on import; its schema-migration chatter is not the user's business.
        for noisy in ("alembic", "mlflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = self.client.tracking_uri
        try:
            experiment_id = self._experiment_id(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        except Exception as err:  # MLflow raises many types for a store it cannot reach
            raise ConfigError(f"tracking.uri={self.uri!r}: cannot use the MLflow store ({type(err).__name__}: {err}).".splitlines()[0]) from None

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another job created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
