"""Interrupted and resumed runs end exactly where uninterrupted ones do: real subprocesses, real signals.

Faults land at exact points through the runner's fault-injection variables, which make the process send itself
a real signal (SIGTERM or SIGKILL) after a given optimizer step or while a checkpoint is half written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, assert_logged_once_as, assert_same_result, mlflow_runs, run_runner

from runner.checkpoint import CHECKPOINT_FORMAT, FAULT_DURING_WRITE_ENV, LATEST_MARKER, list_checkpoints
from runner.signals import EXIT_STOPPED, FAULT_AT_STEP_ENV

pytestmark = pytest.mark.slow  # real subprocesses stopped, killed and resumed

SCHEDULERS = sorted(path.stem for path in (CONF / "scheduler").glob("*.yaml"))
OPTIMIZERS = ["sgd", "adam", "asgd"]
EPOCHS = 4  # digits: 45 batches of 32 per epoch, so step 70 is mid-epoch 2 and step 100 mid-epoch 3
BASE = [
    f"trainer.epochs={EPOCHS}",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "optimizer.lr=0.05",
    "tracking.log_every_n_steps=5",
    "trainer.checkpoint_min_seconds=0",
]  # a checkpoint every epoch


# Settings that make each schedule change within EPOCHS epochs (ReduceLROnPlateau: only >50% improvements count).
SCHEDULE_SETTINGS = {
    "warmup_cosine": ["scheduler.warmup=2"],
    "cosine_restarts": ["scheduler.T_0=2"],
    "plateau": ["scheduler.patience=0", "scheduler.threshold=0.5"],
}


def pair_overrides(optimizer: str, scheduler: str) -> list[str]:
    extra = ["optimizer.t0=50"] if optimizer == "asgd" else []  # start ASGD's averaging (ax, eta, mu) mid-run
    return [f"optimizer={optimizer}", f"scheduler={scheduler}", *extra, *SCHEDULE_SETTINGS.get(scheduler, [])]


def launch(
    cwd: Path, *overrides: str, fault: str | None = None, kill_in_write: int | None = None
) -> subprocess.CompletedProcess:
    env = {}
    if fault:
        env[FAULT_AT_STEP_ENV] = fault
    if kill_in_write:
        env[FAULT_DURING_WRITE_ENV] = str(kill_in_write)
    return run_runner(*BASE, *overrides, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", cwd=cwd, env=env)


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in cwd.glob("outputs/*/*/runner.json"))


def final_bundle(run_dir: Path) -> dict:
    return torch.load(list_checkpoints(run_dir)[-1], weights_only=True)


def assert_mlflow_history_exact(cwd: Path, reference: dict):
    assert_logged_once_as(f"sqlite:///{cwd / 'mlflow.db'}", reference, EPOCHS, steps_per_epoch=45)


def covering_pairs() -> list[tuple[str, str]]:
    """Each scheduler once, the optimizers taken in turn, and the expression lambda with every optimizer.

    A resume restores the optimizer's and the scheduler's state independently (each has its own state_dict),
    so every scheduler and every optimizer resumed once covers what the full cross product would, in a third
    of the suite's time.
    """
    pairs = [(OPTIMIZERS[i % len(OPTIMIZERS)], scheduler) for i, scheduler in enumerate(SCHEDULERS)]
    return pairs + [(optimizer, "lambda") for optimizer in OPTIMIZERS if (optimizer, "lambda") not in pairs]


PAIRS = covering_pairs()
REFERENCE_PAIRS = sorted({*PAIRS, ("sgd", "step"), ("sgd", "constant")})  # the latter two for the tests below


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Uninterrupted runs of the pairs: one sweep per optimizer over its schedulers that need no settings of
    their own, one launch for each of the others."""
    cwd = tmp_path_factory.mktemp("reference")
    tracking = f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}"
    found = {}
    for optimizer in OPTIMIZERS:
        common = pair_overrides(optimizer, "x")[2:]
        schedulers = [s for o, s in REFERENCE_PAIRS if o == optimizer]
        plain = [s for s in schedulers if pair_overrides(optimizer, s)[2:] == common]
        result = run_runner(
            "-m",
            f"optimizer={optimizer}",
            f"scheduler={','.join(plain)}",
            *BASE,
            *common,
            tracking,
            f"hydra.sweep.dir={cwd / optimizer}",
            cwd=cwd,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        found.update({(optimizer, s): final_bundle(cwd / optimizer / str(job)) for job, s in enumerate(plain)})
        for scheduler in sorted(set(schedulers) - set(plain)):
            run_dir = cwd / optimizer / scheduler
            result = run_runner(
                *BASE, *pair_overrides(optimizer, scheduler), tracking, f"hydra.run.dir={run_dir}", cwd=cwd
            )
            assert result.returncode == 0, result.stderr[-3000:]
            found[optimizer, scheduler] = final_bundle(run_dir)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "scheduler"), PAIRS)
def test_sigterm_mid_epoch_then_resume_is_bitwise_equal_to_uninterrupted(tmp_path, references, optimizer, scheduler):
    overrides = pair_overrides(optimizer, scheduler)
    stopped = launch(tmp_path, *overrides, fault="SIGTERM:70")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    assert "stopped by SIGTERM at epoch 2, batch 25" in stopped.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert final_bundle(run_dir)["progress"]["global_step"] == 70  # the checkpoint is mid-epoch

    resumed = launch(tmp_path, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"resuming {run_dir.relative_to(tmp_path)} from epoch-0001-step-00000070.pt: epoch 2/4, batch 25 of 45"
        in resumed.stderr
    )
    assert run_dirs(tmp_path) == [run_dir]
    assert_same_result(final_bundle(run_dir), references[optimizer, scheduler])
    assert_mlflow_history_exact(tmp_path, references[optimizer, scheduler])


@pytest.mark.slow
def test_many_restarts_with_kill_9_and_a_kill_during_a_checkpoint_write(tmp_path, references):
    overrides = pair_overrides("asgd", "lambda")
    reference = references["asgd", "lambda"]
    first = launch(tmp_path, *overrides, fault="SIGTERM:30")
    assert first.returncode == EXIT_STOPPED
    _, (stopped_run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert stopped_run.info.status == "KILLED"  # not FAILED: a scheduler stopped it and it will resume
    killed = launch(tmp_path, *overrides, fault="SIGKILL:100")  # kill -9 mid-epoch 3: no chance to checkpoint
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = run_dirs(tmp_path)
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0001-step-00000045.pt", "epoch-0002-step-00000090.pt"]

    # kill -9 while the epoch-3 checkpoint is half written: the old newest must stay the newest.
    in_write = launch(tmp_path, *overrides, kill_in_write=1)
    assert in_write.returncode == -signal.SIGKILL
    assert list_checkpoints(run_dir)[-1].name == "epoch-0002-step-00000090.pt"
    assert (run_dir / "checkpoints" / LATEST_MARKER).read_text().strip() == "epoch-0002-step-00000090.pt"

    last = launch(tmp_path, *overrides)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "resuming" in last.stderr and "from epoch-0002-step-00000090.pt: epoch 3/4, batch 0 of 45" in last.stderr
    assert run_dirs(tmp_path) == [run_dir]
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # the half-written file was cleaned up
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0003-step-00000135.pt", "epoch-0004-step-00000180.pt"]
    assert_same_result(final_bundle(run_dir), reference)
    assert_mlflow_history_exact(tmp_path, reference)


def test_a_corrupt_newest_checkpoint_gets_one_warning_and_the_previous_is_used(tmp_path, references):
    overrides = pair_overrides("sgd", "step")
    assert launch(tmp_path, *overrides, fault="SIGTERM:100").returncode == EXIT_STOPPED
    (run_dir,) = run_dirs(tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk

    resumed = launch(tmp_path, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stderr.splitlines() if "is unreadable" in line]
    assert len(warnings) == 1 and newest.name in warnings[0] and "trying the previous one" in warnings[0]
    assert "from epoch-0002-step-00000090.pt: epoch 3/4, batch 0 of 45" in resumed.stderr
    assert_same_result(final_bundle(run_dir), references["sgd", "step"])
    assert_mlflow_history_exact(tmp_path, references["sgd", "step"])


def test_an_external_sigint_during_training_stops_and_the_same_command_resumes(tmp_path):
    overrides = ["trainer.epochs=60", "optimizer=adam"]
    args = [sys.executable, "-m", "runner", *BASE, *overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(args, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) as process:
        for line in process.stderr:
            if "epoch 3/60" in line:
                process.send_signal(signal.SIGINT)  # Ctrl-C
                break
        rest = process.stderr.read()
        assert process.wait(timeout=120) == EXIT_STOPPED, rest
    assert "SIGINT received" in rest and "stopped by SIGINT" in rest
    resumed = launch(tmp_path, *overrides)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr
    reference = run_runner(
        *BASE,
        *overrides,
        "resume=never",
        f"tracking.uri=sqlite:///{tmp_path / 'ref.db'}",
        f"hydra.run.dir={tmp_path / 'reference'}",
        cwd=tmp_path,
    )
    assert reference.returncode == 0
    (run_dir,) = run_dirs(tmp_path)
    assert_same_result(final_bundle(run_dir), final_bundle(tmp_path / "reference"))


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from runner.signals import StopFlag\n"
        "flag = StopFlag().install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.1)\n"
        "assert flag(0)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('still running')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 130 and "still running" not in result.stdout


def test_a_stop_signal_in_the_last_step_finishes_the_run_and_says_so_instead_of_stopping_it(tmp_path):
    # On SLURM the time-limit signal can land while the last attempt's last step runs: nothing is left to resume.
    done = launch(tmp_path, fault=f"SIGTERM:{EPOCHS * 45}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM received" in done.stderr and "stopped by" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "the run is complete" in line]
    assert line.endswith("SIGTERM came during the last step or after it: the run is complete, so it finished")
    (run_dir,) = run_dirs(tmp_path)
    assert json.loads((run_dir / "runner.json").read_text())["finished"] is True
    _, (run,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert run.info.status == "FINISHED"


def test_a_finished_run_is_not_trained_again_and_never_starts_a_new_one(tmp_path):
    assert launch(tmp_path).returncode == 0
    (run_dir,) = run_dirs(tmp_path)
    again = launch(tmp_path)
    assert again.returncode == 0
    assert f"already finished: {run_dir.relative_to(tmp_path)} ran this config to the end" in again.stderr
    assert "epoch 1/" not in again.stderr
    assert run_dirs(tmp_path) == [run_dir] and len(list(tmp_path.glob("outputs/*/*"))) == 1  # no leftover launch dir
    fresh = launch(tmp_path, "resume=never")
    assert fresh.returncode == 0 and "epoch 4/4" in fresh.stderr
    assert len(run_dirs(tmp_path)) == 2
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert len(runs) == 2


def test_a_different_config_never_resumes_someone_elses_checkpoint(tmp_path):
    assert launch(tmp_path, fault="SIGTERM:70").returncode == EXIT_STOPPED
    other = launch(tmp_path, "optimizer.lr=0.01")
    assert other.returncode == 0 and "resuming" not in other.stderr
    assert len(run_dirs(tmp_path)) == 2


def test_operational_settings_do_not_block_resume_and_are_recorded_as_tags(tmp_path):
    assert launch(tmp_path, fault="SIGTERM:70").returncode == EXIT_STOPPED
    resumed = launch(
        tmp_path,
        "trainer.device=auto",
        "trainer.num_workers=1",
        "trainer.keep_checkpoints=3",
        "trainer.eval_batch_size=64",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.data.tags["trainer.device"] == "auto" and logged.data.tags["trainer.num_workers"] == "1"
    assert logged.data.tags["trainer.eval_batch_size"] == "64"
    assert "trainer.device" not in logged.data.params and logged.data.params["optimizer.lr"] == "0.05"


def test_resume_from_a_path_refuses_a_different_config_unless_forced(tmp_path):
    assert launch(tmp_path, fault="SIGTERM:70").returncode == EXIT_STOPPED
    (run_dir,) = run_dirs(tmp_path)
    refused = launch(tmp_path, f"resume={run_dir}", "optimizer.lr=0.01")
    assert refused.returncode == 2
    (error,) = [line for line in refused.stderr.splitlines() if "ERROR" in line]
    assert "that run's config differs (optimizer.lr: 0.05 -> 0.01); add resume_force=true" in error

    forced = launch(tmp_path, f"resume={list_checkpoints(run_dir)[-1]}", "optimizer.lr=0.01", "resume_force=true")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "epoch 2/4" in forced.stderr and "epoch 1/4" not in forced.stderr  # started from the checkpoint
    assert len(run_dirs(tmp_path)) == 2 and final_bundle(run_dir)["progress"]["global_step"] == 70  # old run untouched

    same = launch(tmp_path, f"resume={run_dir}")
    assert same.returncode == 0 and f"resuming {run_dir}" in same.stderr


def test_a_forced_resume_into_a_model_it_does_not_fit_is_one_line(tmp_path):
    assert launch(tmp_path, fault="SIGTERM:70").returncode == EXIT_STOPPED
    (run_dir,) = run_dirs(tmp_path)
    result = launch(tmp_path, f"resume={run_dir}", "resume_force=true", "model.hidden_sizes=[16]")
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert (
        "does not fit this config's model: Error(s) in loading state_dict" in error and "Traceback" not in result.stderr
    )


def test_resume_from_a_path_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "empty_run").mkdir()
    result = launch(tmp_path, f"resume={tmp_path / 'empty_run'}")
    assert result.returncode == 2
    assert "that run directory has no checkpoint to resume from" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("other", [CHECKPOINT_FORMAT - 1, CHECKPOINT_FORMAT + 1])
def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path, other):
    assert launch(tmp_path, fault="SIGTERM:70").returncode == EXIT_STOPPED
    (run_dir,) = run_dirs(tmp_path)
    newest = list_checkpoints(run_dir)[-1]
    bundle = torch.load(newest, weights_only=True)
    torch.save({**bundle, "format": other}, newest)
    result = launch(tmp_path)
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert f"is in checkpoint format {other}, this runner reads format {CHECKPOINT_FORMAT}" in error


def test_checkpoint_holds_all_state_and_only_the_newest_are_kept(tmp_path):
    assert launch(tmp_path, "trainer.keep_checkpoints=3", "trainer.checkpoint_every=1").returncode == 0
    (run_dir,) = run_dirs(tmp_path)
    assert [p.name for p in list_checkpoints(run_dir)] == [f"epoch-000{e}-step-{45 * e:08d}.pt" for e in (2, 3, 4)]
    assert (run_dir / "checkpoints" / LATEST_MARKER).read_text().strip() == "epoch-0004-step-00000180.pt"
    bundle = final_bundle(run_dir)
    parts = {"model", "optimizer", "scheduler", "progress", "ranks", "history", "callbacks", "data", "tracking", "best"}
    assert set(bundle) == parts | {"config", "fingerprint", "torch_version", "runner_version", "finished", "format"}
    assert bundle["callbacks"] == {}  # none configured (and 32-bit: no grad_scaler part, as the set above says)
    assert bundle["data"] == {"classes": None, "fitted": {}}  # digits: integer labels, nothing fitted
    (only_rank,) = bundle["ranks"]["ranks"]  # one process: one rank's RNG streams and running loss
    assert set(only_rank) == {"rng", "loss_sum", "samples"}
    assert set(only_rank["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert len(bundle["history"]["epochs"]) == EPOCHS and bundle["progress"]["epoch"] == EPOCHS
    # The MLflow run opens on the persist thread while training starts: a checkpoint written first holds no id yet.
    assert bundle["tracking"]["mlflow_run_id"] in (
        None,
        json.loads((run_dir / "runner.json").read_text())["mlflow_run_id"],
    )
    assert bundle["config"]["trainer"]["epochs"] == EPOCHS


def test_a_fixed_run_directory_resumes_its_own_run_and_refuses_another_config(tmp_path):
    """A requeued cluster job or a fixed hydra.run.dir lands in its old directory: continue that run, never overwrite it."""
    fixed = ["hydra.run.dir=fixed"]
    stopped = launch(tmp_path, *fixed, fault="SIGTERM:70")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    record = (tmp_path / "fixed" / "runner.json").read_text()

    other = launch(tmp_path, *fixed, "optimizer.lr=0.01")
    assert other.returncode == 2
    assert "fixed already holds a run and this config differs from that run's" in other.stderr
    assert (tmp_path / "fixed" / "runner.json").read_text() == record, "the old run is untouched"

    resumed = launch(tmp_path, *fixed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "epoch 2/4, batch 25 of 45" in resumed.stderr
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_throttled_checkpoints_still_log_every_epoch_once_and_resume_exactly(tmp_path, references):
    """With checkpoints at most once a minute, a stop mid-epoch 3 writes the only checkpoint, and only then are
    epochs 1 and 2 logged; the resumed run still ends where the uninterrupted one does."""
    slow = ["trainer.checkpoint_min_seconds=60", *pair_overrides("sgd", "constant")]
    stopped = launch(tmp_path, *slow, fault="SIGTERM:100")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0002-step-00000100.pt"]
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert sorted(m.step for m in client.get_metric_history(logged.info.run_id, "val_loss")) == [0, 1]

    resumed = launch(tmp_path, *slow)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(run_dir)][-1] == f"epoch-{EPOCHS:04d}-step-{EPOCHS * 45:08d}.pt"
    assert_same_result(final_bundle(run_dir), references["sgd", "constant"])
    assert_mlflow_history_exact(tmp_path, references["sgd", "constant"])


@pytest.mark.slow
def test_checkpoint_every_steps_loses_at_most_that_many_steps_to_a_kill_9_and_resumes_bitwise(tmp_path):
    """A node that dies without a signal: with trainer.checkpoint_every_steps=20 a kill -9 at step 70 (mid-epoch 2)
    resumes from step 60's mid-epoch checkpoint, not from the end of epoch 1, and ends as an uninterrupted run."""
    (tmp_path / "reference").mkdir()
    assert launch(tmp_path / "reference").returncode == 0
    reference = final_bundle(run_dirs(tmp_path / "reference")[0])

    killed = launch(tmp_path, "trainer.checkpoint_every_steps=20", fault="SIGKILL:70")
    assert killed.returncode == -signal.SIGKILL
    (run_dir,) = run_dirs(tmp_path)
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch-0001-step-00000045.pt", "epoch-0001-step-00000060.pt"]
    resumed = launch(tmp_path, "trainer.checkpoint_every_steps=20")
    assert resumed.returncode == 0, resumed.stderr
    assert "from epoch-0001-step-00000060.pt: epoch 2/4, batch 15 of 45" in resumed.stderr
    assert_same_result(final_bundle(run_dir), reference)
    assert_mlflow_history_exact(tmp_path, reference)
