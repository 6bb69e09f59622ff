"""MLflow in a process of its own (runner.tracking_process): the launch never imports MLflow, a Ctrl-C to the
whole terminal's process group is handled once (by the launch, which has the MLflow process mark the run), and
neither process outlives the other's death: real ``python -m runner`` processes, real signals, a real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, metric_series, mlflow_runs, run_runner, seed_store

EXIT_STOPPED = 75


def tracking_processes_of(launch_pid: int) -> list[int]:
    """The pids of the MLflow processes started by ``launch_pid`` (their environment names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        if b"runner.tracking_process" in command and f"RUNNER_LAUNCH_PID={launch_pid}".encode() in environ:
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def assert_finished_with_every_epoch(uri: str, epochs: int) -> None:
    """The store's one run is FINISHED and holds each of ``epochs`` epochs once."""
    client, (run,) = mlflow_runs(uri, "runner")
    assert run.info.status == "FINISHED"
    assert len(metric_series(client, run.info.run_id, "val_loss")) == epochs


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    """``python -m runner`` in a session of its own, so that a signal to its process group reaches only it and its
    MLflow process, as a Ctrl-C reaches a command in a terminal."""
    seed_store(args)
    command = [sys.executable, "-m", "runner", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_the_launch_imports_no_mlflow_and_its_run_is_logged_whole_with_the_model(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # -X importtime lists every module this process imports; the MLflow process is started without it
    seed_store([f"tracking.uri={uri}"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runner", *TINY, f"tracking.uri={uri}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported  # the listing works
    assert not [name for name in imported if name.split(".")[0] in ("mlflow", "sqlalchemy", "alembic")]
    client, (run,) = mlflow_runs(uri, "runner")
    assert run.info.status == "FINISHED"
    assert len(metric_series(client, run.info.run_id, "val_loss")) == 2
    assert "MLflow model models:/" in done.stderr  # traced here, logged by the MLflow process


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_stops_once_and_the_run_is_marked_killed_then_resumed(
    tmp_path, signal_name
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["trainer.epochs=60", "trainer.device=cpu", "trainer.progress_bar=false", f"tracking.uri={uri}"]
    args += ["tracking.log_model=false", "hydra.run.dir=run"]
    with start(tmp_path, *args) as process:
        for line in process.stderr:
            if "epoch 3/60" in line:
                os.killpg(process.pid, getattr(signal, signal_name))  # the launch and its MLflow process
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) == EXIT_STOPPED, rest
    assert f"stopped by {signal_name}" in rest
    client, (run,) = mlflow_runs(uri, "runner")
    assert run.info.status == "KILLED"  # the MLflow process ignored the signal and did what the launch asked
    logged = len(metric_series(client, run.info.run_id, "val_loss"))
    assert logged >= 3
    resumed = run_runner(*args, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-2000:]
    assert_finished_with_every_epoch(uri, 60)


@pytest.mark.slow
def test_the_mlflow_process_leaves_when_its_launch_is_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["trainer.epochs=500", "trainer.device=cpu", "trainer.progress_bar=false", f"tracking.uri={uri}"]
    with start(tmp_path, *args, "tracking.log_model=false") as process:
        for line in process.stderr:
            if "epoch 2/500" in line:
                break
        children = tracking_processes_of(process.pid)
        assert len(children) == 1
        process.kill()
        process.wait(timeout=30)
    assert wait_until(lambda: not tracking_processes_of(process.pid)), "the MLflow process outlived its launch"


@pytest.mark.slow
def test_an_mlflow_process_that_dies_ends_the_launch_in_one_line_and_the_same_command_logs_the_rest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["trainer.epochs=40", "trainer.device=cpu", "trainer.progress_bar=false", f"tracking.uri={uri}"]
    args += ["tracking.log_model=false", "hydra.run.dir=run"]
    with start(tmp_path, *args) as process:
        for line in process.stderr:
            if "MLflow run " in line:  # open, and logging the epochs as their checkpoints are written
                (child,) = tracking_processes_of(process.pid)
                os.kill(child, signal.SIGKILL)
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) == EXIT_STOPPED, rest
    assert "Traceback" not in rest
    (said,) = [line for line in rest.splitlines() if "WARNING" in line or "ERROR" in line]
    assert "the MLflow process ended (signal 9) during log_epochs" in said and "Run the same command again" in said
    again = run_runner(*args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "trained; logging what MLflow lacks" in again.stderr
    assert_finished_with_every_epoch(uri, 40)


@pytest.mark.slow
def test_a_launch_refused_after_the_mlflow_process_started_leaves_none_behind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # trainer.epochs=0 passes Hydra's schema and is refused by the runner's checks, after MLflow's process started
    with start(tmp_path, "trainer.epochs=0", f"tracking.uri={uri}") as process:
        said = process.stderr.read()
        assert process.wait(timeout=120) == 2, said
    assert "trainer.epochs must be at least 1" in said and "Traceback" not in said
    assert not tracking_processes_of(process.pid), "the unused MLflow process outlived its launch"


def test_a_prestarted_mlflow_process_that_died_is_replaced_by_one_warmed_up_as_asked():
    """The warm-up for the model's logging is asked for at the prestart; a process that died before the run took it
    (killed, out of memory) is replaced by one that still does it."""
    from runner import tracking_process

    tracking_process.prestart(warm_model_logging=True)
    first = tracking_process._prestarted
    assert first is not None and tracking_process.WARM_MODEL_LOGGING in first.process.args
    first.process.kill()
    first.process.wait()
    replacement = tracking_process._take_prestarted()
    try:
        assert replacement is not first and replacement.process.poll() is None
        assert tracking_process.WARM_MODEL_LOGGING in replacement.process.args
    finally:
        replacement.kill()
        first.connection.close()
