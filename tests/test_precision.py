"""trainer.precision and trainer.compile: they train, checkpoint what they add (the GradScaler), and resume exactly.

bf16 and 16-mixed autocast run on the CPU too, so they are tested here on any machine; the same on CUDA, and
torch.compile on CUDA, run where a GPU is present and are skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_runner
from test_resume import BASE, EXIT_STOPPED, assert_mlflow_history_exact, assert_same_result, final_bundle, run_dirs
from test_resume import launch as launch_on_cpu

from runner.signals import FAULT_AT_STEP_ENV

pytestmark = pytest.mark.slow  # whole runs at reduced precision, stopped and resumed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def launch(cwd, *overrides: str, device: str = "cpu", fault: str | None = None):
    if device == "cpu":
        return launch_on_cpu(cwd, *overrides, fault=fault)
    base = [o for o in BASE if not o.startswith("trainer.device=")]
    return run_runner(
        *base,
        f"trainer.device={device}",
        *overrides,
        f"tracking.uri=sqlite:///{cwd / 'mlflow.db'}",
        cwd=cwd,
        env={FAULT_AT_STEP_ENV: fault} if fault else {},
    )


def stop_and_resume_equals_uninterrupted(tmp_path, *overrides: str, device: str = "cpu") -> dict:
    reference = launch(tmp_path / "reference", *overrides, "hydra.run.dir=reference", device=device)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = final_bundle(tmp_path / "reference" / "reference")

    stopped = launch(tmp_path / "resumed", *overrides, device=device, fault="SIGTERM:70")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    resumed = launch(tmp_path / "resumed", *overrides, device=device)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    (run_dir,) = run_dirs(tmp_path / "resumed")
    got = final_bundle(run_dir)
    assert_same_result(got, expected)
    assert_mlflow_history_exact(tmp_path / "resumed", expected)
    return got


@pytest.fixture
def folders(tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "resumed").mkdir()
    return tmp_path


@pytest.mark.slow
def test_bf16_autocast_trains_and_resumes_exactly(folders):
    bundle = stop_and_resume_equals_uninterrupted(folders, "trainer.precision=bf16")
    assert "grad_scaler" not in bundle  # a part only where there is a GradScaler
    assert all(t.dtype == torch.float32 for t in bundle["model"].values()), "weights stay float32 under autocast"


@pytest.mark.slow
def test_16_mixed_checkpoints_its_grad_scaler_and_resumes_exactly(folders):
    bundle = stop_and_resume_equals_uninterrupted(folders, "trainer.precision=16-mixed")
    assert bundle["grad_scaler"]["scale"] > 0 and "_growth_tracker" in bundle["grad_scaler"]


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_the_plain_module(tmp_path):
    result = launch(tmp_path, "trainer.compile=true", "trainer.epochs=2")
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = run_dirs(tmp_path)
    keys = list(final_bundle(run_dir)["model"])
    assert keys and not any(key.startswith("_orig_mod.") for key in keys), "loads into a model built without compile"


def test_an_unknown_precision_is_one_line(tmp_path):
    result = launch(tmp_path, "trainer.precision=64")
    assert result.returncode == 2
    assert "trainer.precision=64: use one of 32, bf16, 16-mixed." in result.stderr


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "16-mixed"])
def test_cuda_precision_trains_and_resumes(folders, precision):
    stop_and_resume_equals_uninterrupted(folders, f"trainer.precision={precision}", device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_compile_trains_and_resumes(tmp_path):
    stopped = launch(tmp_path, "trainer.compile=true", device="cuda", fault="SIGTERM:70")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    resumed = launch(tmp_path, "trainer.compile=true", device="cuda")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-2000:]
