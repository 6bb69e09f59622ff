"""``python -m runner.preview``: the schedule's LR per epoch as a table and a PNG, without data or training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch


def preview(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", "runner.preview", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def table(stdout: str) -> tuple[list[str], list[list[str]]]:
    lines = [line.split() for line in stdout.splitlines() if line.strip() and not line.startswith("wrote")]
    return lines[0], lines[1:]


def test_preview_prints_and_draws_torchs_own_cosine(tmp_path):
    result = preview("scheduler=cosine", "optimizer.lr=0.1", "trainer.epochs=8", "--out", "cos.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header == ["epoch", "lr"] and [int(r[0]) for r in rows] == list(range(1, 9))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
    expected = []
    for _ in range(8):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [float(r[1]) for r in rows] == pytest.approx(expected, rel=1e-5)
    image = matplotlib.image.imread(tmp_path / "cos.png")
    assert image.shape[0] > 300 and len(set(map(tuple, image[:, :, :3].reshape(-1, 3)[::5].round(2).tolist()))) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cos.png"], "no run directory, no MLflow store"


def test_preview_sweeps_schedules_onto_one_plot_labelled_by_overrides(tmp_path):
    result = preview("-m", "scheduler=constant,warmup_cosine,onecycle", "trainer.epochs=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, rows = table(result.stdout)
    assert header == ["epoch", "scheduler=constant", "scheduler=warmup_cosine", "scheduler=onecycle"]
    assert len(rows) == 10
    warmup = [float(r[2]) for r in rows]
    assert warmup[:6] == pytest.approx([0.01, 0.028, 0.046, 0.064, 0.082, 0.1], rel=1e-5)  # 5 epochs up from a tenth
    onecycle = [float(r[3]) for r in rows]
    assert onecycle[0] == pytest.approx(0.1 / 25, rel=1e-5) and max(onecycle) < 0.1  # starts at max_lr/div_factor
    assert "45 steps per epoch, counted from the data" in result.stderr  # onecycle steps per batch
    assert (tmp_path / "schedule.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scheduler=lambda", "scheduler.lr_lambda='1 / (3 - epoch)'"], "fails at epoch=3"),
        (
            ["scheduler=lambda", "scheduler.lr_lambda='1 - epoch / 2'", "trainer.epochs=5"],
            "the schedule gives lr=-0.05 at epoch 3",
        ),
        (["scheduler=linear,cosine"], "add -m to preview every combination"),
        (["scheduler=nope"], "Could not find 'scheduler/nope'"),
        (["scheduler=plateau", "scheduler.mode=max"], "set scheduler.mode=min"),
    ],
)
def test_preview_refuses_bad_schedules_in_one_line(tmp_path, args, message):
    result = preview(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and message in result.stderr, (
        result.stderr
    )
    assert not list(tmp_path.iterdir())
