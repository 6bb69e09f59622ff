"""What a launch continues when the run directories hold something they should not: another config's checkpoint or
runner.json copied in, a runner.json that is not JSON, has a field of the wrong type, or is a FIFO. Real launches,
real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, mlflow_runs, run_runner

from runner.checkpoint import list_checkpoints
from runner.launch import RunSettings
from runner.signals import EXIT_STOPPED, FAULT_AT_STEP_ENV

BASE = [*TINY, "trainer.checkpoint_min_seconds=0"]


def launch(cwd: Path, *overrides: str, stop_at: int | None = None):
    env = {FAULT_AT_STEP_ENV: f"SIGTERM:{stop_at}"} if stop_at else {}
    return run_runner(*BASE, *overrides, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", cwd=cwd, env=env, timeout=180)


@pytest.fixture(scope="module")
def two_stopped_runs(tmp_path_factory) -> Path:
    """outputs/a (optimizer.lr=0.05) and outputs/b (optimizer.lr=0.01), each stopped at step 50."""
    cwd = tmp_path_factory.mktemp("two_runs")
    for name, lr in (("a", 0.05), ("b", 0.01)):
        result = launch(cwd, f"optimizer.lr={lr}", f"hydra.run.dir=outputs/{name}", stop_at=50)
        assert result.returncode == EXIT_STOPPED, result.stderr[-2000:]
    return cwd


def copy_of(runs: Path, tmp_path: Path) -> Path:
    shutil.copytree(runs, tmp_path, dirs_exist_ok=True)
    return tmp_path


def warnings_about(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WARNING" in line and text in line]


@pytest.mark.slow
def test_a_checkpoint_of_another_config_copied_into_a_run_is_skipped_with_one_warning(two_stopped_runs, tmp_path):
    cwd = copy_of(two_stopped_runs, tmp_path)
    foreign = cwd / "outputs/b/checkpoints/epoch-0001-step-00000060.pt"  # newer than b's own newest
    shutil.copy(list_checkpoints(cwd / "outputs/a")[-1], foreign)

    resumed = launch(cwd, "optimizer.lr=0.01")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (warning,) = warnings_about(resumed.stderr, "written by another config")
    assert str(foreign.relative_to(cwd)) in warning and "skipping it, trying the previous one" in warning
    assert "resuming outputs/b from epoch-0001-step-00000050.pt: epoch 2/2, batch 5 of 45" in resumed.stderr


@pytest.mark.slow
def test_a_runner_json_of_another_config_copied_into_a_run_is_skipped_with_one_warning(two_stopped_runs, tmp_path):
    cwd = copy_of(two_stopped_runs, tmp_path)
    claimed = json.loads((cwd / "outputs/b/runner.json").read_text())
    claimed["created"] = time.time()  # the newest run of optimizer.lr=0.01, by its record
    (cwd / "outputs/a/runner.json").write_text(json.dumps(claimed))

    resumed = launch(cwd, "optimizer.lr=0.01")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (warning,) = warnings_about(resumed.stderr, "but the checkpoints beside it are another config's")
    assert "outputs/a/runner.json" in warning and "skipping that run directory" in warning
    assert "resuming outputs/b from epoch-0001-step-00000050.pt" in resumed.stderr  # not a's, trained with lr 0.05


@pytest.mark.slow
def test_run_records_that_cannot_be_read_are_skipped_with_one_warning_each_and_nothing_hangs(tmp_path, make_config):
    fingerprint = RunSettings.of(make_config()).fingerprint
    record = {"fingerprint": fingerprint, "mlflow_run_id": None, "finished": False, "final_val_loss": None}
    for name in ("not_json", "created_x", "fifo", "good"):
        (tmp_path / "outputs" / name).mkdir(parents=True)
    (tmp_path / "outputs/not_json/runner.json").write_text('{"fingerprint": ')
    (tmp_path / "outputs/created_x/runner.json").write_text(json.dumps({**record, "created": "x"}))
    os.mkfifo(tmp_path / "outputs/fifo/runner.json")
    (tmp_path / "outputs/good/runner.json").write_text(json.dumps({**record, "created": 1.0}))

    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for name in ("not_json", "created_x", "fifo"):
        (warning,) = warnings_about(result.stderr, f"outputs/{name}/runner.json cannot be read")
        assert warning.endswith("; skipping that run directory")
    assert "training on cpu in outputs/good" in result.stderr  # the one readable record of this config
    assert json.loads((tmp_path / "outputs/good/runner.json").read_text())["finished"] is True


@pytest.mark.slow
def test_eight_launches_of_one_command_at_once_train_one_run_and_the_others_exit_75_naming_it(tmp_path):
    """And a ninth, of another config, creates the fresh SQLite store at the same time as the one that trains."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "runner", *BASE, f"tracking.uri={uri}"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"} | {"PYTHONUNBUFFERED": "1"}
    logs = [open(tmp_path / f"launch-{i}.err", "w+") for i in range(9)]  # noqa: SIM115 - closed below
    try:
        same = [
            subprocess.Popen([*command, "trainer.epochs=300"], cwd=tmp_path, env=env, stderr=log) for log in logs[:8]
        ]
        other = subprocess.Popen([*command, "optimizer.lr=0.01"], cwd=tmp_path, env=env, stderr=logs[8])
        deadline = time.monotonic() + 400
        while sum(p.poll() is not None for p in same) < 7 and time.monotonic() < deadline:
            time.sleep(0.5)
        (trainer,) = [p for p in same if p.poll() is None]
        trainer_log = tmp_path / f"launch-{same.index(trainer)}.err"
        while "epoch 1/300" not in trainer_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        trainer.send_signal(signal.SIGTERM)  # enough: the other seven have decided and ended
        assert trainer.wait(timeout=120) == EXIT_STOPPED
        assert other.wait(timeout=300) == 0, (tmp_path / "launch-8.err").read_text()[-2000:]
        stderr = [(tmp_path / f"launch-{i}.err").read_text() for i in range(9)]
    finally:
        for process in [*same, other]:
            if process.poll() is None:
                process.kill()
        for log in logs:
            log.close()

    records = {p.parent: json.loads(p.read_text()) for p in tmp_path.glob("outputs/*/*/runner.json")}
    assert len(records) == 2 and sorted(r["finished"] for r in records.values()) == [False, True]
    (run_dir,) = [path.relative_to(tmp_path) for path, record in records.items() if not record["finished"]]
    assert "stopped by SIGTERM" in stderr[same.index(trainer)]
    for process, text in zip(same, stderr[:8], strict=True):
        assert "Traceback" not in text
        if process is trainer:
            continue
        assert process.returncode == EXIT_STOPPED, text[-2000:]
        (line,) = [line for line in text.splitlines() if "is being trained by process" in line]
        assert f"{run_dir} is being trained by process {trainer.pid} " in line and "epoch 1/" not in text
    _, runs = mlflow_runs(uri, "runner")
    assert len(runs) == 2 and {run.data.params["optimizer.lr"] for run in runs} == {"0.1", "0.01"}


def test_resume_of_a_run_directory_continues_its_own_config_with_this_commands_values_and_resume_keys(
    tmp_path, make_config
):
    """continued_config: the saved run's config, this command's key=value overrides on top (even a key the saved
    node predates), and the resume keys always this command's: a run once forced does not force the next."""
    from omegaconf import OmegaConf

    from runner.launch import RunContext, continued_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = OmegaConf.to_container(make_config("scheduler=cosine", "optimizer.lr=0.3", "resume_force=true"))
    del saved["scheduler"]["warmup"]  # written before scheduler.warmup existed
    OmegaConf.save(saved, run_dir / "resolved_config.yaml")
    command = ["resume=" + str(run_dir), "trainer.epochs=7", "scheduler.warmup=2"]
    cfg = make_config(*command)
    continued = continued_config(cfg, RunContext(tmp_path / "new", command, choices={"scheduler": "constant"}))
    assert continued.scheduler._target_ == saved["scheduler"]["_target_"] and continued.optimizer.lr == 0.3
    assert continued.trainer.epochs == 7 and continued.scheduler.warmup == 2
    assert continued.resume == str(run_dir) and continued.resume_force is False
    grouped = RunContext(tmp_path / "new", [*command, "scheduler=step"], choices={"scheduler": "step"})
    assert continued_config(cfg, grouped) is cfg  # a config group chosen: the command's own config


def test_a_sweeps_jobs_are_named_by_the_keys_it_varies_and_a_single_run_by_all_its_overrides():
    from omegaconf import OmegaConf

    from runner.launch import RunContext
    from runner.sweep import swept_keys

    command = ["scheduler=constant,cosine", "optimizer.lr=0.1,0.01", "trainer.epochs=3", "tracking.uri=sqlite:///x"]
    config = OmegaConf.create({"hydra": {"overrides": {"task": command}, "sweeper": {}}})
    assert swept_keys(config) == ["scheduler", "optimizer.lr"]
    searched = {"overrides": {"task": ["trainer.epochs=3"]}, "sweeper": {"params": {"optimizer.lr": "interval(0, 1)"}}}
    assert swept_keys(OmegaConf.create({"hydra": searched})) == ["optimizer.lr"]  # Optuna's search space
    job = ["scheduler=cosine", "optimizer.lr=0.01", "trainer.epochs=3", "tracking.uri=sqlite:///x"]
    assert RunContext(Path("."), job, swept=swept_keys(config)).run_name == "scheduler=cosine optimizer.lr=0.01"
    assert RunContext(Path("."), job).run_name == ",".join(job)
    packaged = OmegaConf.create({"hydra": {"overrides": {"task": ["+db@pkg=a,b", "trainer.epochs=3"]}, "sweeper": {}}})
    assert RunContext(Path("."), ["+db@pkg=b", "trainer.epochs=3"], swept=swept_keys(packaged)).run_name == "+db@pkg=b"
