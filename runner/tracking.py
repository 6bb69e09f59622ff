"""MLflow, behind one small class: start a run, log params, per-epoch metrics and artifacts, end it.

It uses ``MlflowClient`` with explicit run ids rather than the fluent API's global active run, so a run can be
re-attached by id when a job resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runner.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARENT_TAG = "runner.sweep_parent"  # on a sweep's own run (runner.sweep): its sweep id; its jobs' runs have sweep_id
# Fault injection for the tests: "1" sends SIGKILL to this process right after it created its MLflow run, before
# runner.json records the run's id (as a kill at that instant would).
FAULT_AFTER_RUN_CREATED_ENV = "RUNNER_FAULT_AFTER_MLFLOW_RUN"
LAUNCH_PID_ENV = "RUNNER_LAUNCH_PID"  # set in MLflow's own process (runner.tracking_process): the launch's pid


def flatten(config: Mapping[str, Any], prefix: str = "", limit: int | None = MAX_PARAM_LENGTH) -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; lists stay whole, as their string, cut at ``limit`` characters (what
    the fingerprints of runs and sweeps were always made of; None: whole, for MLflow's params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}.", limit))
        else:
            flat[name] = str(value)[:limit]
    return flat


def mlflow_params(settings: dict[str, str]) -> dict[str, str]:
    """The settings that decide a run's result as MLflow params a user reads: no unset ones, each ``_target_``
    with its class's own name beside it (``optimizer.class = SGD``), and a value longer than MLflow takes split
    into ``key``, ``key.part2``, ... rather than cut."""
    params: dict[str, str] = {}
    for key, value in settings.items():
        if value == "None":
            continue
        named = key.removesuffix("_target_") + "class"
        is_target = key == "_target_" or key.endswith("._target_")
        if is_target and value and named not in settings:  # a setting of its own called class wins
            params[named] = value.rsplit(".", 1)[-1]
        for part, start in enumerate(range(0, max(len(value), 1), MAX_PARAM_LENGTH), 1):
            params[key if part == 1 else f"{key}.part{part}"] = value[start : start + MAX_PARAM_LENGTH]
    return params


def current_user() -> str | None:
    """Who runs this, for MLflow's ``mlflow.user``; None when the system cannot say."""
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - a container's uid without a name or $USER (ImportError on Windows)
        return None


def git_commit(directory: Path) -> str | None:
    """The commit checked out in ``directory``, or None outside a git repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def check_store_reachable(uri: str | None) -> None:
    """The cheap checks, before anything is built: an http(s) server answers, a SQLite file's folder exists.

    Raises:
        ConfigError: in one line naming the URI.
    """
    if uri is None:
        return
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(
                f"tracking.uri={uri!r}: the folder {folder} does not exist; create it or point tracking.uri elsewhere."
            )


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in one line, at once, when nothing answers at an http(s) tracking URI.

    MLflow's client retries a refused connection with back-off for minutes; users should hear before training.
    Any HTTP answer counts as reachable: a proxy's 404 or an auth server's 401 is for MLflow to report.
    """
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"tracking.uri={uri!r}: no MLflow server answers there ({reason}); start one "
            f"(mlflow server --host 127.0.0.1 --port 5000) or fix tracking.uri."
        ) from None


def bound_http_waits(wait_s: float) -> None:
    """Make MLflow's client give up on a server that does not answer in about ``wait_s`` seconds, not minutes.

    Its defaults retry one request seven times with growing back-off (about four minutes). Here: five attempts of
    at most ``wait_s/10`` each, with back-off sleeps (0, 2f, 4f, 8f) adding up to about ``wait_s``, so a server
    that is down for less than ``wait_s`` (restarted, say) loses nothing. Set before MLflow's first request;
    settings the user gave MLflow in the environment are kept.
    """
    defaults = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(max(1, round(wait_s / 14))),  # MLflow reads an integer
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(wait_s / 10))),  # per attempt
    }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


@contextmanager
def store_errors(uri: str | None):
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:  # MLflow raises many types for a store it cannot use
        message = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raise ConfigError(f"tracking.uri={uri!r}: cannot use the MLflow store ({message}).") from None


@contextmanager
def _creating_store(uri: str | None):
    """One process at a time creates a SQLite store's tables (on its first use): two at once fail with "table
    already exists". A sweep does this once before its jobs (runner.sweep); single launches take turns here."""
    database = Path(uri.removeprefix("sqlite:///")) if (uri or "").startswith("sqlite:///") else None
    if database is None or not database.parent.is_dir():  # None: MLflow's default; no folder: open_client says so
        yield
        return
    from runner.locks import locked

    with locked(database.with_name(f"{database.name}.lock")):
        if not database.exists():
            _create_store_atomically(database)
        yield


def _create_store_atomically(database: Path) -> None:
    """Create a SQLite store under a temporary name and rename it into place, holding the store's lock.

    MLflow creates a store's tables in a series of migrations; a process killed among them (a kill -9 while the
    persist thread opens MLflow, seconds into training) leaves a store no later launch can open ("table
    _alembic_tmp_endpoints already exists"). Renamed into place only once complete, a store is whole or absent.
    """
    from mlflow import MlflowClient

    _quiet_mlflow_loggers()
    for leftover in database.parent.glob(f".{database.name}.creating-*"):  # a creation killed midway
        leftover.unlink(missing_ok=True)
    creating = database.with_name(f".{database.name}.creating-{os.getpid()}")
    with store_errors(f"sqlite:///{database}"):
        MlflowClient(tracking_uri=f"sqlite:///{creating}").search_experiments(max_results=1)  # runs the migrations
        os.replace(creating, database)


def _quiet_mlflow_loggers() -> None:
    """MLflow sets its loggers to INFO on import; its schema-migration chatter is not the user's business."""
    for noisy in ("alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def open_client(uri: str | None):
    """An MlflowClient for ``uri`` (None: MLflow's default), after the cheap checks of ``check_store_reachable``.

    Raises:
        ConfigError: nothing answers at an http(s) URI, or a SQLite file's folder does not exist.
    """
    import mlflow
    from mlflow import MlflowClient

    _quiet_mlflow_loggers()
    uri = uri or mlflow.get_tracking_uri()
    check_store_reachable(uri)
    with store_errors(uri):
        return MlflowClient(tracking_uri=uri)


def open_experiment(uri: str | None, name: str):
    """An MlflowClient for ``uri`` and the id of experiment ``name``, created if it does not exist yet.

    Raises:
        ConfigError: the store cannot be reached or used, in one line naming the URI.
    """
    from mlflow.exceptions import MlflowException

    with _creating_store(uri):
        client = open_client(uri)
        with store_errors(client.tracking_uri):
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                return client, experiment.experiment_id
            try:
                return client, client.create_experiment(name, artifact_location=artifacts_beside(client.tracking_uri))
            except MlflowException:  # another job created it first
                return client, client.get_experiment_by_name(name).experiment_id


def artifacts_beside(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, ``mlruns/`` beside the database file, not
    MLflow's default ``./mlruns`` in whatever folder the command runs from; a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


SOURCE_TAGS = "mlflow.source."  # where a run (and its model) came from: MLflow's source name, type, git commit


class Tracker:
    """One MLflow run of one training job, created on the first launch and re-attached by id on resume.

    Each (metric, step) is logged once: on re-attach the steps MLflow already holds are read back, so epochs
    that are trained again after a restart from an older checkpoint are not logged twice.
    """

    def __init__(self, uri: str | None, experiment: str, wait_s: float = 30.0):
        self.uri, self.experiment = uri, experiment
        bound_http_waits(wait_s)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged: dict[str, set[int]] = {}
        self.resumed = False
        self.system_metrics = None  # MLflow's SystemMetricsMonitor, while it samples
        self.system_metrics_from = -1  # the step it started at

    @property
    def opened(self) -> bool:
        return self.run_id is not None

    @property
    def logged_epochs(self) -> int:
        """How many epochs MLflow holds (each has its ``lr``)."""
        return len(self.logged.get("lr", ()))

    def close(self) -> None:
        """Nothing to let go of here (runner.tracking_process's TrackerProcess has a process)."""

    def open(
        self,
        run_name: str,
        run_id: str | None = None,
        run_dir: str | None = None,
        start_time: int | None = None,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Create the MLflow run, or re-attach ``run_id``; this is when mlflow is imported and its store opened.

        A run is tagged with its ``run_dir`` when created. Without ``run_id``, a RUNNING run of that directory is
        adopted: a launch killed before runner.json recorded its run's id left it, and this launch holds the
        directory, so no process is logging to it.
        """
        self.client, experiment_id = open_experiment(self.uri, self.experiment)
        self.uri, self.experiment_id = self.client.tracking_uri, experiment_id
        with store_errors(self.uri):
            if run_id is None and run_dir is not None and (run_id := self._orphan_of(experiment_id, run_dir)):
                log.info(
                    f"adopting MLflow run {run_id}, left RUNNING for {run_dir} by a launch killed before recording it"
                )
            if run_id is not None and self._reattach(run_id):
                self.run_id, self.resumed = run_id, True
            else:
                # mlflow.user at creation: MLflow takes the run's user from it then, not from a later tag
                tags = {"run_dir": run_dir, "mlflow.user": current_user(), "mlflow.parentRunId": parent_run_id}
                tags = {key: value for key, value in tags.items() if value is not None}
                # start_time: when training began, not when this thread got round to creating the run
                self.run_id = self.client.create_run(
                    experiment_id, run_name=run_name, tags=tags, start_time=start_time
                ).info.run_id
                if os.environ.get(FAULT_AFTER_RUN_CREATED_ENV) == "1":  # the launch, when this is its MLflow process
                    os.kill(int(os.environ.get(LAUNCH_PID_ENV, os.getpid())), signal.SIGKILL)
        return self

    def _orphan_of(self, experiment_id: str, run_dir: str) -> str | None:
        """The newest RUNNING MLflow run tagged with ``run_dir``, if any."""
        if "'" in run_dir:  # not expressible in MLflow's filter language; such a directory adopts nothing
            return None
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.run_dir = '{run_dir}' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _reattach(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning(
                f"MLflow run {run_id} is not in {self.uri}; starting a new MLflow run and logging the history again"
            )
            return False
        for key in run.data.metrics:
            self.logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._log_in_batches(params=[Param(key, value) for key, value in params.items()])

    def set_tags(self, tags: dict[str, str | None]) -> None:
        """Set the tags that have a value (``tracking.uri`` left to MLflow's default is no tag ``None``)."""
        from mlflow.entities import RunTag

        tags = {key: value for key, value in tags.items() if value not in (None, "", "None")}
        self._log_in_batches(tags=[RunTag(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in tags.items()])

    def _log_in_batches(self, **items: list) -> None:
        for kind, values in items.items():
            for start in range(0, len(values), 100):  # MLflow takes at most 100 params or tags per batch
                self._log_batch(**{kind: values[start : start + 100]})

    def _log_batch(self, **items: list) -> None:
        # synchronous: the runner counts what is logged by MLflow's answer (an epoch is logged only once its
        # checkpoint is written, a run ends FINISHED only with every epoch in). MLFLOW_ENABLE_ASYNC_LOGGING=true
        # would have MLflow's client queue the request and return at once, and a refusal never reach the runner.
        self.client.log_batch(self.run_id, **items, synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log the metrics of one step, leaving out any (key, step) MLflow already holds."""
        self.log_epochs([(step, metrics)])

    def log_epochs(self, entries: list[tuple[int, dict[str, float]] | tuple[int, dict[str, float], int]]) -> None:
        """Log (step, metrics) pairs, or (step, metrics, timestamp in ms) for an epoch that ended at that time, in as
        few requests as MLflow allows, leaving out (key, step)s it already holds."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [
            Metric(key, float(value), entry[2] if len(entry) > 2 else now, entry[0])
            for entry in entries
            for key, value in entry[1].items()
            if entry[0] not in self.logged.get(key, ())
        ]
        for start in range(0, len(fresh), 1000):  # MLflow takes at most 1000 metrics per batch
            self._log_batch(metrics=fresh[start : start + 1000])
        for metric in fresh:
            self.logged.setdefault(metric.key, set()).add(metric.step)

    def log_series(self, key: str, values: dict[int, float]) -> None:
        """Log one metric at many steps (the per-step LR), leaving out steps MLflow already holds."""
        self.log_epochs([(step, {key: value}) for step, value in sorted(values.items())])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Upload a file, or a folder's files, into the run's artifacts (under ``folder``)."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_exported_model(self, exported, registered_model_name: str | None = None) -> str:
        """Log ``exported`` (runner.model_logging's ExportedModel: the program the launch traced) as the run's
        MLflow model ``model`` in MLflow's pt2 format, with its signature and input example; the model's URI.

        Through MLflow's own ``Model.log``, as ``mlflow.pytorch.log_model`` does, without importing torch here.
        Its check that the input example serves (loading the program, which imports torch._dynamo: ~3 s) is left
        out: the launch ran the program on that example and compared it with the model's own outputs."""
        from mlflow.models import Model, infer_signature

        from runner.model_logging import SavedProgram

        source = self._run_source()
        with fluent_target(self.uri, self.experiment_id):
            info = Model.log(
                artifact_path=None,
                name="model",
                flavor=SavedProgram,
                flavor_name="mlflow.pytorch",  # what mlflow.pytorch.log_model reports (MLflow's telemetry)
                serialization_format="pt2",
                exported=exported,
                signature=infer_signature(exported.example, exported.output),
                input_example=exported.example,
                validate_serving_input=False,
                registered_model_name=registered_model_name,
                run_id=self.run_id,
                tags=source,
            )
        self._drop_source_tags_but(source, info.model_id)
        return info.model_uri

    def log_pickled_model(self, model, example, registered_model_name: str | None = None) -> str:
        """Log ``model`` pickled, for a model torch.export cannot trace (said by the launch): it loads only where
        its code can be imported. The pip requirements are given, so MLflow does not infer them in a subprocess."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(example)
        source = self._run_source()
        with fluent_target(self.uri, self.experiment_id), warnings_hidden("mlflow.pytorch"):  # said already
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pickle",
                signature=infer_signature(example.numpy(), output.numpy()),
                input_example=example.numpy(),
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                registered_model_name=registered_model_name,
                run_id=self.run_id,
                tags=source,
            )
        self._drop_source_tags_but(source, info.model_id)
        return info.model_uri

    def _run_source(self) -> dict[str, str]:
        """The run's own source tags (``python -m runner``, the commit of the folder it was launched from), for its
        model: MLflow gives a model those of the process logging it, which is MLflow's own process here
        (runner/tracking_process.py, and the runner's git checkout when it has one)."""
        tags = self.client.get_run(self.run_id).data.tags
        return {key: value for key, value in tags.items() if key.startswith(SOURCE_TAGS)}

    def _drop_source_tags_but(self, source: dict[str, str], model_id: str) -> None:
        """Remove the source tags MLflow found for the model beyond the run's ``source`` (the runner's own git
        checkout, where the run's folder is none)."""
        for key in self.client.get_logged_model(model_id).tags:
            if key.startswith(SOURCE_TAGS) and key not in source:
                self.client.delete_logged_model_tag(model_id, key)

    def start_system_metrics(self) -> None:
        """MLflow's sampling of CPU, memory, disk, network (and GPU) into ``system/*`` metrics, every 10 s (its
        ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``), continued from its last step on a resumed run."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.system_metrics = SystemMetricsMonitor(self.run_id, resume_logging=self.resumed, tracking_uri=self.uri)
        self.system_metrics_from = getattr(self.system_metrics, "_logging_step", -1)  # its next step (MLflow 3.x)
        self.system_metrics.start()

    def stop_system_metrics(self) -> None:
        """Stop MLflow's sampling; a run that ended within its first interval gets one sample taken now (MLflow's
        monitor drops a sample it had not logged yet when it is stopped)."""
        monitor, self.system_metrics = self.system_metrics, None
        if monitor is None:
            return
        monitor.finish()
        if getattr(monitor, "_logging_step", None) == self.system_metrics_from:  # its thread logged nothing
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as err:  # noqa: BLE001 - one sample is not worth failing the run's end
                log.warning(f"no system metrics sample at the run's end ({str(err).strip()[:200]})")

    def runs_table_url(self) -> str | None:
        """The address of the experiment's runs table for a tracking server. MLflow 3's UI opens an experiment on
        its GenAI overview unless ``workflowType=machine_learning`` asks for the runs (docs/ and the README)."""
        if not str(self.uri).startswith(("http://", "https://")) or self.experiment_id is None:
            return None
        return runs_table_url(self.uri, self.experiment_id)

    def finish(self, status: str = "FINISHED", end_time: int | None = None) -> None:
        """End the run: ``end_time`` (ms) when training ended, else now."""
        self.stop_system_metrics()
        self.client.set_terminated(self.run_id, status, end_time=end_time)


def prepare_model_logging() -> None:
    """Pay the first-time costs of logging the model ahead of it, in MLflow's own process while the launch imports
    torch and trains: MLflow's model modules, its map of installed packages (its requirement check, ~0.5 s) and
    its notebook probe (its context tags, an IPython import). Torch is not among them: the launch traces the model
    (runner.model_logging)."""
    try:
        from mlflow import pyfunc  # noqa: F401
        from mlflow.models import Model, infer_signature  # noqa: F401
        from mlflow.models.utils import _save_example  # noqa: F401
        from mlflow.utils import databricks_utils, requirements_utils

        databricks_utils.is_running_in_ipython_environment()
        requirements_utils._init_packages_to_modules_map()  # private: if it moves, log_model pays it itself
    except Exception as err:  # noqa: BLE001 - a warm-up: logging the model says what fails, if anything does
        log.debug(f"the model logging's warm-up failed: {err}")


def runs_table_url(server: str, experiment_id: str) -> str:
    """Where MLflow's UI at ``server`` shows experiment ``experiment_id``'s runs table."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


@contextmanager
def fluent_target(uri: str, experiment_id: str | None):
    """MLflow's process-wide tracking URI and experiment, which ``mlflow.pytorch.log_model`` reads (a client's
    are not enough: without them a model lands in experiment 0, "Default", with its artifacts in ./mlruns wherever
    the command was started), set for the block and put back after, with the MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_ID they write into the environment that later processes inherit."""
    import mlflow
    from mlflow.tracking import fluent

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    environment = {name: os.environ.get(name) for name in names}
    uri_before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    experiment_before = getattr(fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
        mlflow.set_experiment(experiment_id=experiment_id)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri_before)
        fluent._active_experiment_id = experiment_before
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def warnings_hidden(logger_name: str):
    """Hide ``logger_name``'s warnings for a moment (MLflow's, repeated in the runner's own words)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
