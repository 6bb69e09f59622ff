"""Cluster restarts on a real single-node SLURM: time limits, ``scontrol requeue``, ``scancel --signal``, a sweep.

``tests/slurm/cluster.sh`` starts munged, slurmctld and slurmd (the ``slurm_cluster`` fixture); the jobs are
submitted by ``python -m runner -m hydra/launcher=slurm`` as a user would, through sbatch, and requeued by SLURM
or by submitit's own handler. SLURM's shortest time limit is a minute, so the runs sleep a little after every
step (``RUNNER_STEP_DELAY_S``, which leaves the CPU to others and the result unchanged) to outlast it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_logged_once_as, assert_same_result, mlflow_runs, run_runner, sweep_parents

from runner.checkpoint import list_checkpoints
from runner.signals import FAULT_AT_STEP_ENV, STEP_DELAY_ENV

# One cluster for the session: its tests run in one pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

EPOCHS, STEPS = 4, 45  # digits: 45 batches of 32 per epoch
BASE = [
    f"trainer.epochs={EPOCHS}",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "optimizer.lr=0.05",
    "tracking.log_every_n_steps=5",
    "trainer.checkpoint_min_seconds=0",
]
# The preset asks for a GPU, 8 CPUs and 32 GB per job; this node has 2 CPUs and no GPU.
LAUNCHER = [
    "-m",
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.max_num_timeout=20",
]


@pytest.fixture
def launch(slurm_cluster):
    """Start ``python -m runner -m hydra/launcher=slurm …`` in ``cwd``, tracked in ``cwd/mlflow.db``, in the
    background; whatever still runs when the test ends is killed, its SLURM jobs cancelled."""
    started: list[subprocess.Popen] = []

    def start(cwd: Path, *overrides: str, step_delay: float) -> subprocess.Popen:
        env = {
            key: value
            for key, value in slurm_cluster.env.items()
            if key not in ("HYDRA_FULL_ERROR", FAULT_AT_STEP_ENV, "OMP_NUM_THREADS")
        }
        env.update(PYTHONUNBUFFERED="1", **{STEP_DELAY_ENV: str(step_delay)})
        command = [sys.executable, "-m", "runner", *LAUNCHER, *overrides, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}"]
        started.append(
            subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()
    slurm_cluster.run("scancel", "--user=root")


def finish(sweep: subprocess.Popen, timeout: float) -> str:
    """Wait for the launching process; its stderr, after checking it exited 0."""
    try:
        _, stderr = sweep.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sweep.kill()
        _, stderr = sweep.communicate()
        raise AssertionError(f"the sweep did not end within {timeout} s: {stderr[-3000:]}") from None
    assert sweep.returncode == 0, stderr[-3000:]
    return stderr


def job_log(sweep_dir: Path, job: int | None = None) -> str:
    """What a job's first task wrote to stderr, over all its attempts (sbatch appends): the one job of a sweep of
    one (``.submitit/JOBID/JOBID_0_log.err``), or job ``job`` of a job array (``.submitit/JOBID_job/…``)."""
    folders = "*" if job is None else f"*_{job}"
    return "".join(p.read_text() for p in sorted(sweep_dir.glob(f".submitit/{folders}/*_0_log.err")))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def final_bundle(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir)[-1], weights_only=True)


def running_job_id(cluster, array_task: int | None = None) -> str:
    """The SLURM id of the one running job (``JOBID``), or of job ``array_task`` of a job array (``JOBID_N``); ''
    while it is not running."""
    ids = cluster.run("squeue", "-h", "-r", "-t", "RUNNING", "-o", "%i").split()
    if array_task is None:
        return ids[0] if len(ids) == 1 else ""
    return next((i for i in ids if i.endswith(f"_{array_task}")), "")


def assert_stops_were_one_line_each(log: str, stops: int) -> None:
    """Each stop the runner saw is its one line (no traceback), and the next attempt resumed from its checkpoint."""
    assert "Traceback" not in log, log[-4000:]
    assert log.count("Run the same command again to resume.") == stops, log[-4000:]
    assert log.count("] - resuming ") >= stops, log[-4000:]


def submitit_requeues(log: str) -> int:
    """How often submitit's handler caught USR2 and requeued the job (it logs each line twice, once per logger)."""
    caught = log.count("][submitit][WARNING] - Caught signal SIGUSR2")
    assert log.count("][submitit][INFO] - Requeued job") == caught, log[-4000:]
    return caught


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final checkpoint of BASE run once, uninterrupted, without SLURM."""
    cwd = tmp_path_factory.mktemp("reference")
    # With the thread count the SLURM job has: OMP_NUM_THREADS unset (launch() unsets it).
    result = run_runner(*BASE, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", cwd=cwd, env={"OMP_NUM_THREADS": None})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in cwd.glob("outputs/*/*/runner.json")]
    return final_bundle(run_dir)


def test_a_job_past_its_time_limit_twice_is_requeued_and_ends_as_an_uninterrupted_run(
    slurm_cluster, launch, reference, tmp_path
):
    """A one-minute limit and USR2 20 s before it. slurmctld checks time limits every 30 s and signals once the
    limit is less than 20 + 30 s away: 10-40 s into the first attempt, and about 20 s into each requeued one (it
    starts 7-20 s after the check that requeued it, and takes seconds to start training), so 45 s of training
    take at least three attempts."""
    sweep = launch(
        tmp_path,
        *BASE,
        "hydra.sweep.dir=sweep",
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=20",
        step_delay=0.25,
    )
    finish(sweep, timeout=420)
    log = job_log(tmp_path / "sweep")
    requeues = submitit_requeues(log)
    assert requeues >= 2 and log.count("this job is timed-out") == 2 * requeues, log[-4000:]
    # A signal may land before the runner has started training (submitit requeues at once): nothing is lost. One
    # landing in the last attempt's last step finishes the run instead, without a requeue (seen once in CI).
    completed_anyway = log.count("SIGUSR2 came during the last step or after it: the run is complete")
    stops = log.count("SIGUSR2 received: stopping after this step") - completed_anyway
    assert 1 <= stops <= requeues and completed_anyway <= 1, log[-6000:]
    assert_stops_were_one_line_each(log, stops)
    assert_same_result(final_bundle(tmp_path / "sweep" / "0"), reference)
    assert_logged_once_as(f"sqlite:///{tmp_path / 'mlflow.db'}", reference, EPOCHS, STEPS)


def test_scontrol_requeue_and_scancel_usr2_mid_run_both_resume(slurm_cluster, launch, reference, tmp_path):
    """``scontrol requeue`` (SLURM sends SIGTERM and requeues) and ``scancel --signal=USR2`` (submitit requeues)."""
    sweep = launch(tmp_path, *BASE, "hydra.sweep.dir=sweep", "hydra.launcher.timeout_min=10", step_delay=0.25)
    run_dir = tmp_path / "sweep" / "0"

    def checkpoints() -> int:
        return len(list((run_dir / "checkpoints").glob("*.pt"))) if run_dir.exists() else 0

    def resumed(times: int):
        return lambda: (
            job_log(tmp_path / "sweep").count("] - resuming ") >= times and running_job_id(slurm_cluster) != ""
        )

    wait_for(lambda: checkpoints() >= 1, 180, "the first epoch's checkpoint")
    time.sleep(2)  # into epoch 2
    slurm_cluster.run("scontrol", "requeue", running_job_id(slurm_cluster))
    wait_for(resumed(1), 180, "the job to come back after scontrol requeue")
    wait_for(
        lambda: "MLflow run" in job_log(tmp_path / "sweep").rsplit("] - resuming ", 1)[1],
        120,
        "the resumed job's MLflow run",
    )
    time.sleep(3)
    slurm_cluster.run("scancel", "--signal=USR2", running_job_id(slurm_cluster))
    wait_for(resumed(2), 180, "the job to come back after scancel --signal=USR2")
    finish(sweep, timeout=300)

    log = job_log(tmp_path / "sweep")
    assert "SIGTERM received: stopping after this step" in log and "SIGUSR2 received: stopping after this step" in log
    assert submitit_requeues(log) == 1  # on USR2; on SIGTERM SLURM itself had requeued the job
    assert_stops_were_one_line_each(log, 2)
    assert_same_result(final_bundle(run_dir), reference)
    assert_logged_once_as(f"sqlite:///{tmp_path / 'mlflow.db'}", reference, EPOCHS, STEPS)


def test_a_sweep_with_one_job_requeued_finishes_every_job_once_and_a_rerun_adds_nothing(
    slurm_cluster, launch, tmp_path
):
    epochs = 3
    args = ["scheduler=constant,linear,cosine", f"trainer.epochs={epochs}", *BASE[1:], "hydra.launcher.timeout_min=10"]
    sweep = launch(tmp_path, *args, step_delay=0.1)

    def job_dir(num: int) -> Path | None:
        return next(iter(tmp_path.glob(f"multirun/*/*/{num}/checkpoints/*.pt")), None)

    wait_for(lambda: job_dir(1) is not None and running_job_id(slurm_cluster, 1) != "", 240, "job 1's first checkpoint")
    slurm_cluster.run("scontrol", "requeue", running_job_id(slurm_cluster, 1))
    stderr = finish(sweep, timeout=420)
    assert "Traceback" not in stderr
    (first_sweep,) = tmp_path.glob("multirun/*/*")
    logs = {num: job_log(first_sweep, num) for num in range(3)}
    assert logs[1].count("SIGTERM received") == 1 and logs[1].count("] - resuming ") == 1, logs[1][-4000:]
    assert [logs[num].count("] - resuming ") for num in (0, 2)] == [0, 0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, runs = mlflow_runs(uri, "runner")
    assert sorted(r.data.tags["scheduler"] for r in runs) == ["constant", "cosine", "linear"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    _, (parent,) = sweep_parents(uri, "runner")  # made by the launching process, before sbatch
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    histories = {
        r.info.run_id: {
            key: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            for key in ("lr", "train_loss", "val_loss", "val_accuracy")
        }
        for r in runs
    }
    for history in histories.values():
        for key, values in history.items():
            assert sorted(step for step, _ in values) == list(range(epochs)), key

    time.sleep(1.1)  # the rerun's sweep folder is named by the second it starts
    again = launch(tmp_path, *args, step_delay=0)
    finish(again, timeout=300)
    second_sweep = next(p for p in tmp_path.glob("multirun/*/*") if p != first_sweep)
    rerun_logs = "".join(job_log(second_sweep, num) for num in range(3))
    assert rerun_logs.count("already finished") == 3, rerun_logs[-4000:]
    assert not list(second_sweep.glob("*/runner.json")) and not list(second_sweep.glob("*/checkpoints"))
    client, runs_after = mlflow_runs(uri, "runner")
    assert sorted(r.info.run_id for r in runs_after) == sorted(histories)
    for r in runs_after:
        assert {
            key: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            for key in histories[r.info.run_id]
        } == histories[r.info.run_id]


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory) -> dict:
    """The final checkpoint of test_distributed's config trained by the real torchrun's two ranks."""
    from test_distributed import BASE as DDP_BASE
    from test_distributed import torchrun

    cwd = tmp_path_factory.mktemp("torchrun")
    result = torchrun(cwd, *DDP_BASE, "trainer.strategy=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in cwd.glob("outputs/*/*/runner.json")]
    return final_bundle(run_dir)


def test_a_two_task_ddp_job_stopped_by_its_time_limit_resumes_as_torchruns_two_ranks(
    slurm_cluster, launch, torchrun_reference, tmp_path
):
    """Two SLURM tasks become two Gloo ranks; SLURM signals both before the time limit, they stop after the same
    step, rank 0 checkpoints, both leave the process group, then submitit requeues the job. OMP_NUM_THREADS is
    not set, as on a cluster: the runner gives each task one thread, as torchrun does its workers.

    Two processes take 20 s or more to start here, longer than a one-minute limit leaves a requeued job before
    its signal (20 s), so the limit is two minutes with USR2 60 s before it: 30-60 s into each attempt, and 54 s
    of training take at least two."""
    from test_distributed import BASE as DDP_BASE

    sweep = launch(
        tmp_path,
        *DDP_BASE,
        "trainer.strategy=ddp",
        "hydra.sweep.dir=sweep",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60",
        step_delay=0.3,
    )
    finish(sweep, timeout=420)
    log = job_log(tmp_path / "sweep")
    requeues = submitit_requeues(log)
    stops = log.count("SIGUSR2 received: stopping after this step")
    assert requeues >= 1 and 1 <= stops <= requeues, log[-4000:]
    assert_stops_were_one_line_each(log, stops)
    assert "DDP over 2 processes, gloo" in log
    other_rank = "".join(p.read_text() for p in (tmp_path / "sweep").glob(".submitit/*/*_1_log.err"))
    assert other_rank.count("SIGUSR2 received") == stops and "Traceback" not in other_rank, other_rank[-4000:]
    bundle = final_bundle(tmp_path / "sweep" / "0")
    assert len(bundle["ranks"]["ranks"]) == 2
    assert_same_result(bundle, torchrun_reference)
    assert_logged_once_as(f"sqlite:///{tmp_path / 'mlflow.db'}", torchrun_reference, EPOCHS, STEPS)
    _, (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert run.data.tags["world_size"] == "2"


def test_the_preset_asking_for_a_gpu_on_a_partition_without_is_one_line(slurm_cluster, tmp_path):
    """sbatch refuses ``gpus_per_node: 1`` here (no GPUs): sbatch's own line, then ours naming the fix; exit 2."""
    env = {key: value for key, value in slurm_cluster.env.items() if key != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            *BASE,
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert (
        errors[-1].startswith("error: sbatch refused the job (") and "hydra.launcher.gpus_per_node=null" in errors[-1]
    )
    assert len(errors) == 2 and errors[0].startswith("sbatch: error:"), result.stderr
    assert not list(tmp_path.rglob("runner.json"))


def test_a_job_cancelled_outright_without_accounting_ends_the_sweep_in_one_line(slurm_cluster, launch, tmp_path):
    """``scancel JOBID`` (SIGTERM, no requeue) leaves no result file, and this SLURM has no accounting (``sacct``
    fails): the launching process learns from ``squeue`` that the job ended and says so in one line, exit 75."""
    sweep = launch(tmp_path, *BASE, "hydra.sweep.dir=sweep", "hydra.launcher.timeout_min=10", step_delay=0.1)
    wait_for(lambda: any((tmp_path / "sweep" / "0" / "checkpoints").glob("*.pt")), 180, "the first checkpoint")
    slurm_cluster.run("scancel", running_job_id(slurm_cluster))
    _, stderr = sweep.communicate(timeout=180)
    assert sweep.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "ended without a result" in line and "start the same command again to resume it" in line, stderr
    assert "stopped by SIGTERM" in job_log(tmp_path / "sweep")
    _, (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert run.info.status == "KILLED"
