"""What a multirun shares across its jobs: one sweep id, one ready MLflow store, one MLflow parent run that holds
the jobs' runs as its children (and, at the end, their comparison), one list of failed jobs.

Hydra calls ``SweepCallback`` in the launching process, before and after the jobs, whatever the launcher (basic,
joblib, submitit) and sweeper (basic, Optuna). Jobs may run in other processes or on other nodes, so what they
share goes through the environment (inherited by joblib workers and by SLURM jobs) and the sweep directory.
Nothing here imports torch; mlflow only when a multirun starts.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.errors import RunnerError, report_error
from runner.tracking import PARENT_TAG, store_errors

SWEEP_ID_ENV = "RUNNER_SWEEP_ID"
SWEPT_KEYS_ENV = "RUNNER_SWEPT_KEYS"  # the keys a multirun varies, comma-separated: its jobs are named by them
SWEEP_PARENT_ENV = "RUNNER_SWEEP_PARENT_RUN"  # the sweep's MLflow run: each job's run is its child
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


def sweep_overrides(config: DictConfig) -> list[str]:
    """The overrides as typed that make the sweep (``scheduler=constant,cosine``), and a sweeper's search space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(task)
    swept = [text for text, override in zip(task, parsed, strict=True) if override.is_sweep_override()]
    searched = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return swept + [f"{key}={value}" for key, value in searched.items()]


def open_parent_run(uri: str | None, experiment: str, sweep: str, name: str, sweep_dir: str) -> str:
    """The sweep's MLflow run, whose children its jobs' runs are: the one made by an earlier launch of the same
    sweep (an interrupted sweep started again keeps its parent), else a new one."""
    from mlflow.entities import ViewType

    from runner.tracking import current_user, open_experiment

    client, experiment_id = open_experiment(uri, experiment)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{sweep}'",
        run_view_type=ViewType.ALL,
        order_by=["attributes.start_time ASC"],  # the first, should two launches at once have made one each
        max_results=1,
    )
    if found:
        run_id = found[0].info.run_id
        if found[0].info.lifecycle_stage == "deleted":  # deleted in the UI, then the sweep started again
            client.restore_run(run_id)  # first: MLflow updates no deleted run
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {PARENT_TAG: sweep, "sweep_dir": sweep_dir, "mlflow.user": current_user()}
    tags = {key: value for key, value in tags.items() if value}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def close_parent_run(uri: str | None, run_id: str, sweep: str, sweep_dir: Path, failed: bool) -> None:
    """Put the comparison of the sweep's runs (runner.compare's PNG, CSV and Markdown) into its parent run, print
    the ranking, and end the parent run. A comparison that cannot be made is a warning: the runs are logged."""
    from runner.compare import compare
    from runner.tracking import open_client, runs_table_url

    client = open_client(uri)
    out = sweep_dir / "comparison"
    try:
        ranking = compare(client.tracking_uri, None, sweep, None, out, "final_val_loss")
        for suffix in (".png", ".csv", ".md"):
            client.log_artifact(run_id, str(out.with_suffix(suffix)), "comparison")
    except Exception as err:  # noqa: BLE001 - the jobs' runs are logged; their comparison is a convenience
        print(f"[runner] no comparison of sweep {sweep} in MLflow: {str(err).strip()[:300]}", file=sys.stderr)
    else:
        print(f"sweep {sweep}, ranked by final val_loss:\n{ranking}\n(also {out}.png, .csv, .md)", file=sys.stderr)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
    if str(client.tracking_uri).startswith(("http://", "https://")):
        experiment_id = client.get_run(run_id).info.experiment_id
        print(f"MLflow runs table: {runs_table_url(client.tracking_uri, experiment_id)}", file=sys.stderr)


def _end_parent_if_left(uri: str | None, run_id: str) -> None:
    """At the launching process's exit: a sweep that did not reach its end (stopped, a job raised) leaves its parent
    run KILLED, as its jobs' runs are, not RUNNING; the same sweep run again picks it up."""
    if os.environ.get(SWEEP_PARENT_ENV) != run_id:  # ended by on_multirun_end
        return
    try:
        from runner.tracking import open_client

        client = open_client(uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the process is exiting; the next launch of the sweep sets it again
        pass


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
        sweep = os.environ[SWEEP_ID_ENV] = sweep_id(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(config))
        name = "sweep " + " ".join(sweep_overrides(config))
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        # Its jobs' runs in several experiments or stores: no one parent can hold them
        one_place = not {"tracking.uri", "tracking.experiment"} & set(swept_keys(config))
        os.environ.pop(SWEEP_PARENT_ENV, None)
        try:
            prepare_tracking_store(config.tracking.uri, config.tracking.experiment)
            if one_place:
                with store_errors(config.tracking.uri):
                    parent = open_parent_run(config.tracking.uri, config.tracking.experiment, sweep, name, sweep_dir)
                os.environ[SWEEP_PARENT_ENV] = parent
                atexit.register(_end_parent_if_left, config.tracking.uri, parent)
        except RunnerError as err:
            sys.exit(report_error(err))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit 2 when a job stopped on bad input (each job reported its own line as it ended).

        Hydra's job logging is torn down once the sweep ends, so this line goes straight to stderr.
        """
        path = Path(config.hydra.sweep.dir) / FAILED_JOBS_FILE
        failed = [line for line in path.read_text(encoding="utf-8").splitlines() if line] if path.exists() else []
        parent = os.environ.pop(SWEEP_PARENT_ENV, None)
        if parent:
            try:
                close_parent_run(
                    config.tracking.uri, parent, os.environ[SWEEP_ID_ENV], Path(config.hydra.sweep.dir), failed
                )
            except Exception as err:  # noqa: BLE001 - the failed jobs' exit status below matters more
                reason = str(err).strip()[:300]
                print(f"[runner] the sweep's MLflow run {parent} was not ended: {reason}", file=sys.stderr)
        if failed:
            sys.exit(report_error(RunnerError(f"{len(failed)} job(s) failed: {'; '.join(failed)}")))
