"""Pruning and the newest-readable fallback against entries that are not this run's checkpoints: real launches,
real files in the run directory (a folder, a FIFO, an empty file with a checkpoint's name)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import fill, mlflow_runs, run_runner

from runner.checkpoint import CHECKPOINT_DIR, list_checkpoints, prune_checkpoints, save_checkpoint
from runner.resume import RUN_RECORD, RunRecord
from runner.signals import EXIT_STOPPED, FAULT_AT_STEP_ENV

BASE = ["trainer.epochs=3", "trainer.device=cpu", "trainer.progress_bar=false", "trainer.checkpoint_min_seconds=0"]


def launch(cwd: Path, *overrides: str, stop_at: int | None = None, run_dir: Path | str = "run"):
    env = {FAULT_AT_STEP_ENV: f"SIGTERM:{stop_at}"} if stop_at else {}
    return run_runner(
        *BASE,
        *overrides,
        f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}",
        f"hydra.run.dir={run_dir}",
        cwd=cwd,
        env=env,
        timeout=180,
    )


@pytest.mark.slow
def test_pruning_with_keep_1_never_deletes_the_checkpoint_just_written_for_a_folder_or_fifo_named_newer(tmp_path):
    assert launch(tmp_path, "trainer.keep_checkpoints=1", stop_at=50).returncode == EXIT_STOPPED
    folder = tmp_path / "run" / CHECKPOINT_DIR
    (folder / "epoch-0099-step-00009900.pt").mkdir()  # sorts after every real checkpoint
    os.mkfifo(folder / "epoch-0098-step-00009800.pt")  # opening it would wait for a writer forever

    stopped = launch(tmp_path, "trainer.keep_checkpoints=1", stop_at=100)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    assert "from epoch-0001-step-00000050.pt" in stopped.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["epoch-0002-step-00000100.pt"]

    resumed = launch(tmp_path, "trainer.keep_checkpoints=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from epoch-0002-step-00000100.pt: epoch 3/3, batch 10 of 45" in resumed.stderr
    assert (folder / "epoch-0099-step-00009900.pt").is_dir()  # someone else's entry: left alone


@pytest.mark.slow
def test_an_empty_file_named_as_the_newest_checkpoint_gets_one_warning_and_the_previous_is_used(tmp_path):
    assert launch(tmp_path, stop_at=50).returncode == EXIT_STOPPED
    empty = tmp_path / "run" / CHECKPOINT_DIR / "epoch-0099-step-00009900.pt"
    empty.touch()

    resumed = launch(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    (warning,) = [line for line in resumed.stderr.splitlines() if "is unreadable" in line]
    assert f"checkpoint {empty} is unreadable (EOFError); trying the previous one" in warning
    assert "from epoch-0001-step-00000050.pt: epoch 2/3, batch 5 of 45" in resumed.stderr


def _bundle(epoch: int, fingerprint: str = "f") -> dict:
    return {"progress": {"epoch": epoch, "global_step": epoch * 10}, "fingerprint": fingerprint, "x": torch.ones(2)}


def test_pruning_keeps_the_newest_k_of_this_run_and_counts_no_unreadable_or_foreign_file(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, _bundle(epoch), keep=10)
    folder = tmp_path / CHECKPOINT_DIR
    (folder / "epoch-0003-step-00000031.pt").write_bytes(b"")  # unreadable, between ours
    save_checkpoint(tmp_path, _bundle(4, fingerprint="other"), keep=10)  # another config's, copied in
    (folder / "epoch-0009-step-00000090.pt").write_bytes(b"")  # unreadable, sorting after what is written next

    written = save_checkpoint(tmp_path, _bundle(5), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [
        "epoch-0003-step-00000030.pt",
        "epoch-0003-step-00000031.pt",
        "epoch-0004-step-00000040.pt",
        written.name,
        "epoch-0009-step-00000090.pt",
    ]
    prune_checkpoints(tmp_path, written, keep=1, fingerprint="f")
    assert written.exists() and not (folder / "epoch-0003-step-00000030.pt").exists()


def test_the_mlflow_run_id_met_by_a_full_disk_is_one_warning_and_stays_in_the_state_checkpoints_carry(
    small_disk, caplog
):
    # Saved on the persist thread while tracking opens; raised there, it stopped every later log of the run and
    # left the MLflow run RUNNING once the checkpoint failed on the same full disk (seen under load in CI).
    record = RunRecord.new(small_disk, fingerprint="f")
    record.save()
    before = (small_disk / RUN_RECORD).read_text()
    fill(small_disk, leave=0)

    record.save_run_id("0123abcd")

    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{small_disk / RUN_RECORD} was not updated with MLflow run 0123abcd (" in warning
    assert "No space left on device" in warning
    assert record.state_dict() == {"mlflow_run_id": "0123abcd"}  # what the next checkpoint writes
    assert (small_disk / RUN_RECORD).read_text() == before and not list(small_disk.glob(".*tmp*"))


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_exit_75_and_running_again_resumes(tmp_path, small_disk):
    run_dir = small_disk / "run"
    assert launch(tmp_path, stop_at=50, run_dir=run_dir).returncode == EXIT_STOPPED
    before = list_checkpoints(run_dir)
    filler = fill(small_disk, leave=before[-1].stat().st_size // 2)  # room for the logs, not for a checkpoint

    full = launch(tmp_path, run_dir=run_dir)
    assert full.returncode == EXIT_STOPPED, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    (line,) = [line for line in full.stderr.splitlines() if "could not write checkpoint" in line]
    # the best file of epoch 2, written just before its checkpoint, or the checkpoint itself: whichever ran out
    assert re.search(rf"{run_dir}/checkpoints/(epoch-0002-step-00000090|best-epoch-0002)\.pt", line), line
    assert "MiB free on that disk" in line
    assert "run the same command again: it resumes from the previous checkpoint" in line
    assert list_checkpoints(run_dir) == before and not list((run_dir / "checkpoints").glob(".*tmp*"))
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "KILLED", full.stderr[-3000:]  # stopped, to be resumed: not FAILED

    filler.unlink()
    resumed = launch(tmp_path, run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from epoch-0001-step-00000050.pt: epoch 2/3" in resumed.stderr
