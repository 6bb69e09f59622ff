"""Data-parallel training: two Gloo processes on the CPU through the real torchrun, killed, stopped and resumed.

Each torchrun launch is two real ``python -m runner`` processes in one process group. Faults are real signals
sent by one rank to itself at an exact step (``RUNNER_FAULT_AT_STEP=SIGNAME:STEP:RANK``), or by the test to
torchrun itself, as a cluster scheduler would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_logged_once_as, assert_same_result, fill, mlflow_runs, run_runner, seed_store
from torch.utils.data import DistributedSampler

from runner.checkpoint import list_checkpoints
from runner.data import DeviceBatcher, shard
from runner.signals import FAULT_AT_STEP_ENV, STEP_DELAY_ENV

pytestmark = pytest.mark.slow  # real torchrun launches

EPOCHS = 4  # digits: 1438 training samples, 45 global batches of 32 (16 per rank) per epoch
BASE = [
    f"trainer.epochs={EPOCHS}",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "optimizer=adam",
    "optimizer.lr=0.01",
    "scheduler=cosine",
    "tracking.log_every_n_steps=5",
    "trainer.checkpoint_min_seconds=0",
    "metrics=[accuracy,f1]",
]  # torchmetrics, summed over the ranks


def torchrun(
    cwd: Path,
    *overrides: str,
    nproc: int = 2,
    torchrun_args: tuple[str, ...] = (),
    fault: str | None = None,
    step_delay: float | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m runner overrides…`` in ``cwd``, tracked in its own SQLite store;
    ``step_delay`` seconds of sleep after every batch (the ranks then agree on a stop within ~0.2 s of steps: 10)."""
    env = {key: value for key, value in os.environ.items() if key not in ("HYDRA_FULL_ERROR", FAULT_AT_STEP_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    if fault:
        env[FAULT_AT_STEP_ENV] = fault
    if step_delay:
        env[STEP_DELAY_ENV] = str(step_delay)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *torchrun_args,
        "-m",
        "runner",
        *overrides,
        f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}",
    ]
    seed_store(command)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in cwd.glob("outputs/*/*/runner.json"))


def final_bundle(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir)[-1], weights_only=True)


def runner_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, dict]:
    """One uninterrupted two-process run of BASE: where it ran, what it printed, its final checkpoint."""
    cwd = tmp_path_factory.mktemp("ddp")
    result = torchrun(cwd, *BASE, "trainer.strategy=ddp")
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = run_dirs(cwd)
    return cwd, result, final_bundle(run_dir)


@pytest.mark.slow
def test_two_processes_train_one_run_log_one_mlflow_run_and_checkpoint(uninterrupted):
    cwd, result, bundle = uninterrupted
    (started,) = runner_lines(result.stderr, "training on cpu in")  # rank 0 tells the story, once
    assert "DDP over 2 processes, gloo; 16 samples per process per step, 32 in all" in started
    assert len(runner_lines(result.stderr, f"epoch {EPOCHS}/{EPOCHS} lr")) == 1
    assert len(list(cwd.glob("outputs/*/*"))) == 1, "rank 1's own Hydra directory is removed"
    (run_dir,) = run_dirs(cwd)
    assert [p.name for p in list_checkpoints(run_dir)][-1] == f"epoch-{EPOCHS:04d}-step-{EPOCHS * 45:08d}.pt"
    assert len(bundle["ranks"]["ranks"]) == 2 and bundle["finished"]
    assert_logged_once_as(f"sqlite:///{cwd / 'mlflow.db'}", bundle, EPOCHS, steps_per_epoch=45)
    _, (logged,) = mlflow_runs(f"sqlite:///{cwd / 'mlflow.db'}", "runner")
    assert logged.data.tags["world_size"] == "2" and logged.data.tags["trainer.strategy"] == "ddp"


@pytest.mark.slow
def test_two_processes_end_where_one_process_with_the_same_global_batch_does(tmp_path, uninterrupted):
    single = run_runner(*BASE, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    one, two = final_bundle(run_dir), uninterrupted[2]
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    for mine, theirs in zip(two["history"]["epochs"], one["history"]["epochs"], strict=True):
        assert mine["lr"] == theirs["lr"]
        for key in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_checkpoints_once_and_the_same_command_resumes_bitwise(tmp_path, uninterrupted):
    stopped = torchrun(tmp_path, *BASE, "trainer.strategy=ddp", fault="SIGTERM:70:1")  # rank 1 only, mid-epoch 2
    assert stopped.returncode != 0  # torchrun reports the stopped (exit 75) workers as failed
    assert "exitcode: 75" in stopped.stderr
    (message,) = runner_lines(stopped.stderr, "stopped by SIGTERM at epoch")
    (run_dir,) = run_dirs(tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    assert f"checkpoint {newest}" in message
    # Both ranks stop after the same step: the next time they share their flags, which may be right after step 70
    # itself (the signal arrives during that call), later within the epoch, or at its end.
    assert 70 <= final_bundle(run_dir)["progress"]["global_step"] <= 90

    resumed = torchrun(tmp_path, *BASE, "trainer.strategy=auto")  # auto takes DDP under torchrun; the run is the same
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(runner_lines(resumed.stderr, f"from {newest.name}: epoch ")) == 1
    assert run_dirs(tmp_path) == [run_dir]
    assert_same_result(final_bundle(run_dir), uninterrupted[2])
    assert_logged_once_as(f"sqlite:///{tmp_path / 'mlflow.db'}", uninterrupted[2], EPOCHS, steps_per_epoch=45)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_from_the_newest_checkpoint_after_a_kill_9(tmp_path, uninterrupted):
    result = torchrun(
        tmp_path, *BASE, "trainer.strategy=ddp", torchrun_args=("--max-restarts=1",), fault="SIGKILL:100:1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "exitcode: -9" in result.stderr or "Signal 9" in result.stderr
    )  # torchrun saw rank 1 die, then restarted both
    (resumed,) = runner_lines(result.stderr, "resuming")
    assert f"from epoch-0002-step-00000090.pt: epoch 3/{EPOCHS}, batch 0 of 45" in resumed
    (run_dir,) = run_dirs(tmp_path)
    assert_same_result(final_bundle(run_dir), uninterrupted[2])
    assert_logged_once_as(f"sqlite:///{tmp_path / 'mlflow.db'}", uninterrupted[2], EPOCHS, steps_per_epoch=45)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_checkpoint(tmp_path):
    """What a cluster does at the time limit: signal torchrun, which passes SIGTERM to its workers."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "runner",
        *BASE,
        "trainer.epochs=60",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stderr:
            if "epoch 3/60" in line:
                process.send_signal(signal.SIGTERM)
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) != 0
    assert len(runner_lines(rest, "stopped by SIGTERM")) == 1, rest[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    bundle = final_bundle(run_dir)
    assert bundle["progress"]["epoch"] >= 3 and not bundle["finished"]
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "KILLED"


def test_ddp_without_torchrun_is_one_line(tmp_path):
    result = run_runner("trainer.strategy=ddp", "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert (
        "trainer.strategy=ddp needs the processes torchrun starts; launch with `torchrun --nproc_per_node=N -m runner"
        in error
    )
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.backend=nccl", "trainer.device=auto"], "trainer.backend=nccl needs CUDA"),
        (
            ["trainer.batch_size=33"],
            "trainer.batch_size=33 is the global batch and must split evenly over the 2 processes",
        ),
        (
            ["trainer.eval_batch_size=33"],
            "trainer.eval_batch_size=33 is the global batch of validation and must split evenly over the 2 processes",
        ),
        (["trainer.strategy=single"], "trainer.strategy=single, but torchrun started 2 processes"),
    ],
)
def test_bad_ddp_settings_under_torchrun_are_one_line_from_rank_0(tmp_path, overrides, message):
    if "nccl" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = torchrun(tmp_path, "trainer.device=cpu", "trainer.progress_bar=false", *overrides)
    assert result.returncode != 0
    errors = runner_lines(result.stderr, "[ERROR] - error:")
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert (
        "runner/" not in result.stderr.split("ChildFailedError")[0].split("[ERROR]")[-1]
    )  # no traceback from the runner
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


@pytest.mark.parametrize("size", [1, 7, 8, 45])
@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_are_cut_as_distributed_sampler_cuts_them(size, world_size):
    order = torch.randperm(size)
    for rank in range(world_size):
        sampler = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=False)
        assert shard(order, rank, world_size, pad=True).tolist() == [order[i].item() for i in sampler]


def test_rank_batches_together_are_the_epoch_and_each_validation_sample_counts_once():
    data = torch.utils.data.TensorDataset(torch.arange(101.0).unsqueeze(1), torch.arange(101))
    device = torch.device("cpu")
    single = DeviceBatcher(data, 10, device, seed=3, shuffle=True)
    ranks = [DeviceBatcher(data, 5, device, seed=3, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 11  # every rank takes the same number of steps
    for step, (whole, *parts) in enumerate(zip(single.epoch(4), *(r.epoch(4) for r in ranks), strict=True)):
        together = sorted(label for _, labels in parts for label in labels.tolist())
        if step < 10:  # each global batch is the single process's batch, split over the ranks
            assert together == sorted(whole[1].tolist())
        else:  # the last one: the sample left over, and one repeated so that both ranks step
            assert len(together) == 2 and set(whole[1].tolist()) <= set(together)
    val = [DeviceBatcher(data, 5, device, seed=3, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    seen = [y.item() for batcher in val for _, ys in batcher.epoch(0) for y in ys]
    assert sorted(seen) == list(range(101))


@pytest.mark.slow
def test_a_submitit_job_with_two_tasks_trains_as_two_ranks(tmp_path, uninterrupted):
    """hydra/launcher=slurm with one task per GPU, through submitit's local executor: each task becomes a rank."""
    result = run_runner(
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *BASE,
        "trainer.strategy=ddp",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": None},
    )  # unset: the runner gives each task one thread, as torchrun does
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "sweep" / "0" / "runner.log").read_text()
    assert "DDP over 2 processes, gloo; 16 samples per process per step, 32 in all" in log
    assert log.count(f"epoch {EPOCHS}/{EPOCHS} lr") == 1
    bundle = final_bundle(tmp_path / "sweep" / "0")
    assert len(bundle["ranks"]["ranks"]) == 2
    assert_same_result(bundle, uninterrupted[2])  # bitwise the run torchrun's two ranks train
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "FINISHED" and logged.data.tags["world_size"] == "2"


def _threads_after_adopting_the_tasks() -> tuple[int, str | None]:
    from runner.distributed import adopt_submitit_tasks

    adopt_submitit_tasks()
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")


def test_each_task_of_a_submitit_job_with_two_tasks_gets_one_thread_as_torchrun_workers_do(tmp_path, monkeypatch):
    """A real submitit job (local executor) with two tasks, OMP_NUM_THREADS unset: each task takes one thread, as
    torchrun's workers do; with every core each, SLURM tasks sum in another order than torchrun's ranks."""
    import submitit

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    executor = submitit.LocalExecutor(folder=tmp_path)
    executor.update_parameters(tasks_per_node=2, timeout_min=5)
    job = executor.submit(_threads_after_adopting_the_tasks)
    assert job.results() == [(1, "1"), (1, "1")]


@pytest.mark.slow
def test_a_full_disk_under_ddp_stops_both_ranks_with_rank_zeros_one_line_and_no_crash(tmp_path, small_disk):
    """Only rank 0 writes checkpoints; its failure is shared, so rank 1 does not train on into a collective rank 0
    has left (Gloo's "Connection closed by peer" and a traceback) and both leave their group together."""
    fill(small_disk, leave=48 * 1024)  # room for Hydra's files, the log and runner.json, none for a checkpoint
    result = torchrun(tmp_path, *BASE, "trainer.strategy=ddp", f"hydra.run.dir={small_disk / 'run'}")
    assert result.returncode != 0
    (line,) = runner_lines(result.stderr, "could not write checkpoint")  # rank 0 speaks, once
    assert re.search(r"checkpoints/(epoch-0001-step-00000045|best-epoch-0001)\.pt", line), line
    assert "Free some space and run the same command again" in line
    assert "exitcode  : 75" in result.stderr  # torchrun's report: not a crash
    assert "Connection closed by peer" not in result.stderr and "[rank1]" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_a_divergence_under_ddp_is_one_line_from_rank_zero_and_both_ranks_leave_together(tmp_path):
    result = torchrun(tmp_path, *BASE, "trainer.strategy=ddp", "optimizer.lr=1e30", "optimizer=sgd")
    assert result.returncode != 0
    (line,) = runner_lines(result.stderr, "training diverged")  # the summed loss: every rank stops, rank 0 speaks
    assert "the training loss is nan over epoch 1/4" in line
    assert result.stderr.count("exitcode  : 1") >= 1 and "Connection closed by peer" not in result.stderr
    assert "[rank1]" not in result.stderr, result.stderr[-3000:]


def test_accumulated_steps_under_ddp_keep_the_global_batch_and_resume_bitwise_mid_accumulation(tmp_path):
    """Nine batches of 32 (16 per rank, summed without an all-reduce until the ninth) per step: the same steps as
    one process takes, and a stop between the nine resumes to the uninterrupted run's result bit for bit. Where the
    agreed stop lands is the ranks' choice: 8 times in 9 mid-step, when the checkpoint holds each rank's sums."""
    accumulating = [*BASE, "trainer.epochs=2", "trainer.accumulate_grad_batches=9", "trainer.strategy=ddp"]
    (tmp_path / "whole").mkdir()
    whole = torchrun(tmp_path / "whole", *accumulating)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (reference_dir,) = run_dirs(tmp_path / "whole")
    reference = final_bundle(reference_dir)
    assert reference["progress"]["global_step"] == 10  # 45 batches an epoch, 5 steps

    (started,) = runner_lines(whole.stderr, "training on cpu in")
    assert "16 samples per process per batch, 9 batches of 32 per step, 288 samples)" in started
    (tmp_path / "single").mkdir()
    single = run_runner(*accumulating[:-1], f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    (single_dir,) = run_dirs(tmp_path / "single")
    for name, value in final_bundle(single_dir)["model"].items():
        torch.testing.assert_close(reference["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    (tmp_path / "stopped").mkdir()
    # Rank 1, epoch 2's 2nd step. Without the delay, fast steps let the ranks check for stops only every ~40
    # batches: the stop was agreed at the end of the last epoch, which finished the run instead (seen in CI).
    stopped = torchrun(tmp_path / "stopped", *accumulating, fault="SIGTERM:6+1:1", step_delay=0.02)
    assert "exitcode: 75" in stopped.stderr, stopped.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "stopped")
    held = final_bundle(run_dir)
    ranks = held["ranks"]["ranks"]
    assert all(("gradients" in rank) == (held["progress"]["batch"] % 9 > 0) for rank in ranks)
    resumed = torchrun(tmp_path / "stopped", *accumulating)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_result(final_bundle(run_dir), reference)
