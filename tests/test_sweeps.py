"""Multiruns as users start them: interrupted and re-run, parallel on SQLite, against a real ``mlflow server``,
requeued by submitit, searched by Optuna, and compared with ``runner.compare``. Real subprocesses throughout."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import metric_series, mlflow_runs, run_runner, sweep_parents

pytestmark = pytest.mark.slow  # real multirun sweeps, servers and launchers

QUIET = ["trainer.device=cpu", "trainer.progress_bar=false"]
SCHEDULES = ["constant", "linear", "cosine", "step"]


def store(tmp_path: Path, experiment: str = "sweep") -> tuple[str, list[str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, [f"tracking.uri={uri}", f"tracking.experiment={experiment}"]


def job_dirs(tmp_path: Path) -> dict[int, Path]:
    """Run directories of every sweep under tmp_path/multirun, by job number."""
    return {int(p.name): p for p in tmp_path.glob("multirun/*/*/*") if p.name.isdigit()}


def assert_each_epoch_logged_once(client, run, epochs: int) -> None:
    for key in ("lr", "train_loss", "val_loss", "val_accuracy"):
        assert len(metric_series(client, run.info.run_id, key)) == epochs, key


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def resumed_dir(log: str, cwd: Path | None = None) -> Path:
    """The run directory of the log's "resuming DIR from CHECKPOINT" line."""
    (line,) = [line for line in log.splitlines() if "] - resuming " in line]
    path = Path(line.split("] - resuming ", 1)[1].split(" from ", 1)[0])
    return path if path.is_absolute() else (cwd / path).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_interrupted_sweep_resumes_unfinished_jobs_and_skips_finished_ones(tmp_path):
    uri, tracking = store(tmp_path)
    epochs = 100
    args = [
        "-m",
        "scheduler=constant,linear,cosine",
        f"trainer.epochs={epochs}",
        "trainer.checkpoint_min_seconds=0",
        *QUIET,
        *tracking,
    ]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Part way through: job 0 done, job 1 has written its first checkpoint, job 2 not started.
    wait_for(
        lambda: 1 in job_dirs(tmp_path) and any((job_dirs(tmp_path)[1] / "checkpoints").glob("*.pt")),
        120,
        "job 1's first checkpoint",
    )
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 75, stderr
    dirs = job_dirs(tmp_path)
    assert json.loads((dirs[0] / "runner.json").read_text())["finished"] is True
    assert json.loads((dirs[1] / "runner.json").read_text())["finished"] is False
    assert 2 not in dirs
    _, (stopped_parent,) = sweep_parents(uri, "sweep")
    assert stopped_parent.info.status == "KILLED"  # as its stopped job's run, not left RUNNING

    again = run_runner(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr and "nothing to do" in again.stderr  # job 0
    assert resumed_dir(again.stderr, tmp_path) == dirs[1].resolve()  # job 1, in its own directory of the first sweep
    client, runs = mlflow_runs(uri, "sweep")
    assert sorted(r.data.tags["scheduler"] for r in runs) == ["constant", "cosine", "linear"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1, "a re-run sweep keeps its id"
    for run in runs:
        assert_each_epoch_logged_once(client, run, epochs)
    by_name = {r.data.tags["scheduler"]: r for r in runs}
    assert by_name["linear"].data.tags["run_dir"] == str(dirs[1].resolve())
    _, (parent,) = sweep_parents(uri, "sweep")  # the sweep started again keeps its one parent run
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
    """Four jobs at once through the joblib launcher, all creating their MLflow runs in one fresh SQLite file."""
    tmp_path = tmp_path_factory.mktemp("parallel")
    uri, tracking = store(tmp_path)
    result = run_runner(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=4",
        f"scheduler={','.join(SCHEDULES)}",
        "trainer.epochs=30",
        *QUIET,
        *tracking,
        cwd=tmp_path,
        fresh_store=True,  # what this sweep tests: its jobs and the sweep callback create the store together
    )
    return tmp_path, uri, result


@pytest.mark.slow
def test_parallel_joblib_jobs_share_a_fresh_sqlite_store_without_losing_anything(parallel_sweep):
    tmp_path, uri, result = parallel_sweep
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower() and "locked" not in result.stderr
    client, runs = mlflow_runs(uri, "sweep")
    assert sorted(r.data.tags["scheduler"] for r in runs) == sorted(SCHEDULES)
    assert sorted(r.data.tags["job_num"] for r in runs) == ["0", "1", "2", "3"]
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert {r.data.tags["sweep_dir"] for r in runs} == {str(job_dirs(tmp_path)[0].parent.resolve())}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"scheduler={run.data.tags['scheduler']}"  # the override that sets it apart
        assert_each_epoch_logged_once(client, run, 30)


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_parent_run_holding_its_jobs_and_their_comparison(parallel_sweep):
    tmp_path, uri, result = parallel_sweep
    client, runs = mlflow_runs(uri, "sweep")
    _, (parent,) = sweep_parents(uri, "sweep")
    assert parent.info.run_name == f"sweep scheduler={','.join(SCHEDULES)}"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["runner.sweep_parent"] == runs[0].data.tags["sweep_id"]
    assert [r.data.tags.get("mlflow.parentRunId") for r in runs] == [parent.info.run_id] * len(SCHEDULES)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        f"comparison/comparison.{suffix}" for suffix in ("png", "csv", "md")
    }
    table = Path(client.download_artifacts(parent.info.run_id, "comparison/comparison.csv", str(tmp_path / "down")))
    assert sorted(row["scheduler"] for row in csv.DictReader(table.open())) == sorted(
        r.data.tags["scheduler"] for r in runs
    )
    assert "ranked by final val_loss" in result.stderr  # the ranking is printed when the sweep ends

    def compare(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "runner.compare", *args, "--tracking-uri", uri, "--out", str(tmp_path / "c")]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    whole = compare("sweep")  # the experiment: its training runs, not the run that stands for the sweep
    assert whole.returncode == 0, whole.stderr
    assert sorted(line.split()[1] for line in whole.stdout.splitlines()[1 : len(runs) + 1]) == sorted(
        r.info.run_name for r in runs
    )
    assert parent.info.run_id not in whole.stdout
    refused = compare("--runs", parent.info.run_id)
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        f"compare its jobs with --sweep {parent.data.tags['runner.sweep_parent']}."
    )


@pytest.mark.slow
def test_compare_draws_and_ranks_a_real_sweep(parallel_sweep, tmp_path):
    sweep_dir, uri, _ = parallel_sweep
    client, runs = mlflow_runs(uri, "sweep")
    out = tmp_path / "report" / "cmp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.compare",
            "--sweep",
            runs[0].data.tags["sweep_id"],
            "--tracking-uri",
            uri,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    final = {r.data.tags["scheduler"]: metric_series(client, r.info.run_id, "val_loss")[-1] for r in runs}
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["scheduler"] for row in table] == sorted(final, key=final.get), "ranked by final val_loss"
    for row in table:
        assert float(row["final_val_loss"]) == pytest.approx(final[row["scheduler"]], rel=1e-12)
        assert float(row["best_val_loss"]) <= float(row["final_val_loss"])
        assert row["run"] == f"scheduler={row['scheduler']}", "labels keep only the overrides that differ"
    printed = result.stdout.splitlines()
    assert printed[0].split()[:4] == ["rank", "run", "scheduler", "optimizer"]
    assert [line.split()[2] for line in printed[1:5]] == [row["scheduler"] for row in table]
    markdown = out.with_suffix(".md").read_text().splitlines()
    assert markdown[0].startswith("| rank | run |") and len(markdown) == 2 + len(runs)

    import matplotlib.image

    image = matplotlib.image.imread(out.with_suffix(".png"))
    height, width = image.shape[:2]
    assert width > 2 * height > 600, "three panels side by side"
    colours = {tuple(px) for px in (image[:, :, :3] * 255).astype(int).reshape(-1, 3)[::7]}
    assert len(colours) > 50, "the plot has lines in it, not a blank canvas"


def test_compare_says_in_one_line_when_there_is_nothing_to_compare(tmp_path):
    uri, _ = store(tmp_path)
    from runner.tracking import open_experiment

    open_experiment(uri, "empty")

    def compare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "runner.compare", "--tracking-uri", uri, "--out", str(tmp_path / "c"), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    for args, message in [
        (["empty"], "has no runs"),
        (["nope"], "no MLflow experiment 'nope'"),
        (["--sweep", "abc"], "no runs tagged sweep_id=abc"),
        (["--runs", "0" * 32], "no MLflow run"),
    ]:
        result = compare(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr, (
            result.stderr
        )
        assert not (tmp_path / "c.png").exists()


def test_compare_labels_runs_by_what_sets_them_apart():
    from runner.compare import RunCurves, label_runs

    runs = [
        RunCurves(str(i), f"name{i}", overrides, "s", "o", "FINISHED")
        for i, overrides in enumerate(
            [["scheduler=linear", "trainer.epochs=5"], ["scheduler=cosine", "trainer.epochs=5"], ["trainer.epochs=5"]]
        )
    ]
    label_runs(runs)
    assert [r.label for r in runs] == ["scheduler=linear", "scheduler=cosine", "name2"]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact folder."""
    port = free_port()
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
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    uri = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert server.poll() is None, f"mlflow server exited: {server.stderr.read()}"
        try:
            import urllib.request

            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(answers, 120, "mlflow server")
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_parallel_jobs_log_to_a_real_tracking_server(mlflow_server, tmp_path):
    result = run_runner(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=3",
        "scheduler=constant,linear,cosine",
        "trainer.epochs=10",
        *QUIET,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=server",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    client, runs = mlflow_runs(mlflow_server, "server")
    assert sorted(r.data.tags["scheduler"] for r in runs) == ["constant", "cosine", "linear"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert_each_epoch_logged_once(client, run, 10)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == [
            "hydra",
            "resolved_config.yaml",
            "runner.log",
        ]
    experiment_id = runs[0].info.experiment_id
    assert f"MLflow runs table: {mlflow_server}/#/experiments/{experiment_id}?workflowType=machine_learning" in (
        result.stderr
    )


def test_unreachable_tracking_server_is_one_line_before_anything_runs(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for sweep in ([], ["-m", "scheduler=constant,linear"]):
        started = time.monotonic()
        result = run_runner(*sweep, *QUIET, f"tracking.uri={uri}", cwd=tmp_path, timeout=120)
        assert result.returncode == 2
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and f"tracking.uri={uri!r}: no MLflow server answers there" in lines[0], result.stderr
        assert time.monotonic() - started < 60, "no minutes of MLflow retries"
        assert not list(tmp_path.rglob("*.pt"))


def test_unknown_launcher_or_sweeper_is_hydras_own_error(tmp_path):
    for override, message in [
        ("hydra/launcher=nope", "hydra/launcher/nope"),
        ("hydra/sweeper=nope", "hydra/sweeper/nope"),
    ]:
        result = run_runner("-m", override, *QUIET, cwd=tmp_path, timeout=120)
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_optuna_sweep_minimises_the_final_val_loss_jobs_return(tmp_path):
    uri, tracking = store(tmp_path, "optuna")
    result = run_runner(
        "-m", "hydra/sweeper=optuna_lr", "hydra.sweeper.n_trials=3", "trainer.epochs=3", *QUIET, *tracking, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    client, runs = mlflow_runs(uri, "optuna")
    assert len(runs) == 3
    finals = [metric_series(client, r.info.run_id, "val_loss")[-1] for r in runs]
    (results_file,) = tmp_path.glob("multirun/*/*/optimization_results.yaml")
    found = yaml.safe_load(results_file.read_text())
    assert found["best_value"] == pytest.approx(min(finals), rel=1e-12)
    best = runs[finals.index(min(finals))]
    assert found["best_params"]["scheduler"] == best.data.tags["scheduler"]
    assert float(best.data.params["optimizer.lr"]) == pytest.approx(found["best_params"]["optimizer.lr"])


@pytest.mark.slow
def test_submitit_requeues_a_signalled_job_which_resumes_from_its_checkpoint(tmp_path):
    """submitit's own local executor runs the job as it would on SLURM: USR2 -> checkpoint -> requeue -> resume.

    The signal is the one SLURM sends before the time limit; here the test sends it to the task process.
    """
    uri, tracking = store(tmp_path, "submitit")
    epochs = 200
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            f"trainer.epochs={epochs}",
            "trainer.checkpoint_min_seconds=0",
            *QUIET,
            *tracking,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: 0 in job_dirs(tmp_path) and any((job_dirs(tmp_path)[0] / "checkpoints").glob("*.pt")),
        180,
        "the first checkpoint",
    )
    (task,) = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_submitit_task(int(pid), tmp_path)]
    os.kill(int(task), signal.SIGUSR2)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, stdout + stderr

    (log,) = tmp_path.glob("multirun/*/*/.submitit/*/*_0_log.err")
    text = log.read_text()
    assert "SIGUSR2 received: stopping after this step" in text
    assert "handing SIGUSR2 on to SignalHandler.checkpoint_and_try_requeue" in text
    assert "Requeued job" in text
    assert resumed_dir(text, tmp_path) == job_dirs(tmp_path)[0].resolve()
    assert "Job completed successfully" in text
    client, runs = mlflow_runs(uri, "submitit")
    (run,) = runs
    assert run.info.status == "FINISHED"
    _, (parent,) = sweep_parents(uri, "submitit")  # made in the launching process, the child's in the task
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert_each_epoch_logged_once(client, run, epochs)


def _is_submitit_task(pid: int, folder: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"submitit.core._submit" in cmdline and any(str(folder).encode() in part for part in cmdline)
