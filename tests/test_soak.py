"""Soak: repeated kill -9 at random moments (mid-epoch, while a checkpoint is half written, right after a write and
its pruning) with keep_checkpoints=1, then a clean launch: it ends bitwise where an uninterrupted run does, and no
kill ever loses the newest checkpoint. Real processes, real signals; the moments are drawn from a fixed seed."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_same_result, run_runner

from runner.checkpoint import FAULT_DURING_WRITE_ENV, list_checkpoints
from runner.signals import FAULT_AT_STEP_ENV

EPOCHS, STEPS_PER_EPOCH = 3, 45
BASE = [
    f"trainer.epochs={EPOCHS}",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "trainer.checkpoint_min_seconds=0",
    "trainer.keep_checkpoints=1",
    "optimizer=adam",
    "scheduler=cosine",
]


def launch(cwd: Path, run_dir: str, env: dict[str, str] | None = None):
    return run_runner(
        *BASE, f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}", f"hydra.run.dir={run_dir}", cwd=cwd, env=env, timeout=300
    )


def newest_step(run_dir: Path) -> int:
    """The global step of the newest checkpoint (each must load), -1 before the first."""
    found = list_checkpoints(run_dir)
    return torch.load(found[-1], weights_only=True)["progress"]["global_step"] if found else -1


@pytest.mark.slow
def test_random_kill_9_during_training_writes_and_pruning_loses_nothing_and_ends_bitwise_equal(tmp_path):
    rng = random.Random(17)
    total = EPOCHS * STEPS_PER_EPOCH
    run_dir, step, kills = tmp_path / "run", -1, 0
    for _ in range(5):
        if rng.random() < 0.4:
            env = {FAULT_DURING_WRITE_ENV: str(rng.randint(1, 2))}  # the launch's first or second checkpoint
        else:
            at = min(total - 1, max(step, 0) + rng.choice([1, rng.randint(2, 60)]))  # 1: right after a write
            env = {FAULT_AT_STEP_ENV: f"SIGKILL:{at}"}
        result = launch(tmp_path, "run", env)
        if result.returncode == 0:
            break  # trained to the end before its kill came
        assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
        kills += 1
        now = newest_step(run_dir)
        assert now >= step, f"kill {kills} ({env}) lost the checkpoint at step {step}: newest is {now}"
        step = now
    assert kills >= 3
    final = launch(tmp_path, "run")
    assert final.returncode == 0, final.stderr[-2000:]
    reference = launch(tmp_path, "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    (last,) = list_checkpoints(run_dir)  # keep_checkpoints=1
    (expected,) = list_checkpoints(tmp_path / "reference")
    assert_same_result(torch.load(last, weights_only=True), torch.load(expected, weights_only=True))
