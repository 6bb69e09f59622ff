"""A tracking server that goes away for good: training goes on, the runner waits once and briefly, says what MLflow
lacks, and the same command logs it. A real ``mlflow server`` on 127.0.0.1, killed with SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY, metric_series, mlflow_runs, run_runner
from mlflow import MlflowClient

from runner.signals import EXIT_STOPPED
from runner.tracking import FAULT_AFTER_RUN_CREATED_ENV

EPOCHS = 30  # the server goes away after the first epochs are logged; training goes on for the rest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, store: Path, cwd: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store}",
            "--artifacts-destination",
            str(cwd / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow server exited"
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not answer within 120 s")


def logged_epochs(store: Path) -> int:
    """How many epochs' val_loss the server's own store holds, read directly."""
    if not store.exists():
        return 0
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("runner")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return len(client.get_metric_history(runs[0].info.run_id, "val_loss")) if runs else 0


def kill_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker, with no goodbye
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_tracking_server_lost_for_good_costs_one_bounded_wait_and_the_same_command_logs_the_rest(tmp_path):
    port, store = free_port(), tmp_path / "server.db"
    command = [
        sys.executable,
        "-m",
        "runner",
        *TINY,
        f"trainer.epochs={EPOCHS}",
        "trainer.checkpoint_min_seconds=0",
        f"tracking.uri=http://127.0.0.1:{port}",
        "tracking.wait_s=5",
        "hydra.run.dir=run",
    ]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
    server = start_server(port, store, tmp_path)
    try:
        with open(tmp_path / "first.err", "w+") as err:
            runner = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=err)
            deadline = time.monotonic() + 300
            # Two epochs in the store: the first one's request has been answered (the persist thread sends the
            # second only then), so the runner knows at least one epoch is logged whatever the kill interrupts.
            while time.monotonic() < deadline and logged_epochs(store) < 2:
                assert runner.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
                time.sleep(0.2)
            kill_server(server)
            killed_at = time.monotonic()
            assert runner.wait(timeout=300) == EXIT_STOPPED, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() - killed_at < 90, "one bounded wait, not minutes of retries per request"
        first = (tmp_path / "first.err").read_text()
        assert "Traceback" not in first and f"epoch {EPOCHS}/{EPOCHS}" in first  # training went on to the end
        (line,) = [line for line in first.splitlines() if "stopped answering" in line]
        assert f"MLflow at http://127.0.0.1:{port} stopped answering" in line and "epoch(s) of" in line
        assert "Run the same command again, with the tracking server up, to log them." in line
        missing = int(re.search(r"; (\d+) epoch\(s\) of ", line).group(1))
        assert 1 <= missing <= EPOCHS - 1  # some epochs were logged before the server went away

        server = start_server(port, store, tmp_path)
        again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "trained; logging what MLflow lacks" in again.stderr and "epoch 1/" not in again.stderr
    finally:
        if server.poll() is None:
            kill_server(server)
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    assert run.info.status == "FINISHED"
    assert len(metric_series(client, run.info.run_id, "val_loss")) == EPOCHS  # every epoch, each once


@pytest.mark.slow
def test_a_launch_killed_before_recording_its_mlflow_run_leaves_it_to_the_next_launch_to_adopt(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*TINY, f"tracking.uri={uri}", "hydra.run.dir=run"]
    killed = run_runner(*args, cwd=tmp_path, env={FAULT_AFTER_RUN_CREATED_ENV: "1"}, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _, (orphan,) = mlflow_runs(uri, "runner")
    assert orphan.info.status == "RUNNING"

    again = run_runner(*args, cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"adopting MLflow run {orphan.info.run_id}, left RUNNING for {tmp_path / 'run'}" in again.stderr
    client, (run,) = mlflow_runs(uri, "runner")  # the same run, continued and closed: none left RUNNING
    assert run.info.run_id == orphan.info.run_id and run.info.status == "FINISHED"
    assert len(metric_series(client, run.info.run_id, "val_loss")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])
def test_a_launch_killed_while_mlflow_creates_a_sqlite_store_leaves_no_store_a_later_launch_cannot_open(
    tmp_path, delay
):
    """MLflow creates a store's tables in a series of migrations, about two seconds long here, some outside any
    transaction; torchrun restarting after a kill -9 once found a store cut off among them ("table
    _alembic_tmp_endpoints already exists"). Without the atomic creation two or three of these four delays broke it."""
    database = tmp_path / "mlflow.db"
    create = f"from runner.tracking import open_experiment; open_experiment('sqlite:///{database}', 'runner')"
    creator = subprocess.Popen([sys.executable, "-c", create], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (database.exists() or list(tmp_path.glob(".mlflow.db.creating-*"))):  # the migrations have begun
        assert creator.poll() is None and time.monotonic() < deadline, "the store was never created"
        time.sleep(0.01)
    time.sleep(delay)
    creator.kill()
    creator.wait(timeout=30)

    again = subprocess.run([sys.executable, "-c", create], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    assert client.get_experiment_by_name("runner") is not None
    assert not list(tmp_path.glob(".mlflow.db.creating-*")), "what the killed creation left is removed"


def test_a_sqlite_stores_artifacts_go_beside_the_database_not_into_the_current_folder(tmp_path, monkeypatch):
    from runner.tracking import Tracker

    (tmp_path / "store").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # where a user (or the test suite) happens to run from
    config = tmp_path / "resolved_config.yaml"
    config.write_text("trainer: {}\n")
    tracker = Tracker(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", "artifacts").open("a run")
    tracker.log_artifact(config)
    tracker.finish()
    (stored,) = (tmp_path / "store" / "mlruns").rglob("resolved_config.yaml")
    assert stored.read_text() == "trainer: {}\n"
    assert not (tmp_path / "work" / "mlruns").exists()
    artifact_uri = MlflowClient(tracker.uri).get_run(tracker.run_id).info.artifact_uri
    assert artifact_uri.startswith((tmp_path / "store" / "mlruns").as_uri())


def test_logging_waits_for_mlflows_answer_even_with_async_logging_asked_for_in_the_environment(tmp_path, monkeypatch):
    """The runner marks an epoch logged, and a run FINISHED, only on MLflow's answer: with
    MLFLOW_ENABLE_ASYNC_LOGGING=true MLflow's client would queue the request and return at once, and a refusal (here:
    the run was deleted meanwhile) would never reach the runner."""
    from mlflow.exceptions import MlflowException

    from runner.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "true")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "async").open("a run")
    tracker.log_epochs([(0, {"val_loss": 1.0})])
    assert [m.value for m in MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "val_loss")] == [1.0]
    MlflowClient(tracker.uri).delete_run(tracker.run_id)
    for log in (
        lambda: tracker.log_epochs([(1, {"val_loss": 0.5})]),
        lambda: tracker.log_params({"optimizer.lr": 0.1}),
        lambda: tracker.set_tags({"stopped_early": "by a callback"}),
    ):
        with pytest.raises(MlflowException, match="must be in the 'active' state"):
            log()
    assert tracker.logged["val_loss"] == {0}
