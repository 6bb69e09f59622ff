"""Shared fixtures: the real conf/ composed with tiny CPU settings, a real SQLite MLflow store, subprocess runs."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from runner.config import register_schemas

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["trainer.epochs=2", "trainer.device=cpu", "trainer.progress_bar=false"]

register_schemas()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still runs in CI")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line(
        "markers",
        "slurm: runs jobs on a real single-node SLURM (tests/slurm/cluster.sh); skipped when not root "
        "or without the slurmctld, slurmd, slurm-client and munge packages",
    )


CLUSTER_SCRIPT = ROOT / "tests" / "slurm" / "cluster.sh"


@dataclass
class SlurmCluster:
    """A running single-node SLURM: ``env`` has ``SLURM_CONF`` for its clients (and, through sbatch, its jobs)."""

    folder: Path
    env: dict[str, str]

    def run(self, *command: str) -> str:
        """A SLURM client command (``squeue``, ``scontrol``, ``scancel``…); its stdout."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
        return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real SLURM (munged, slurmctld, slurmd) started once for the session under /tmp/rslurm-XXXX, stopped at its end.

    Skipped, saying why, when not root, when the packages are missing (``tests/slurm/cluster.sh install``
    installs them), or when a daemon does not start (the reason holds the end of its log).
    The folder's path is short because munge's socket path must fit in 108 bytes.
    """
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (slurmd runs jobs as their users)")
    folder = Path(tempfile.mkdtemp(prefix="rslurm-", dir="/tmp"))
    env = {**os.environ, "SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    script = ["bash", str(CLUSTER_SCRIPT)]
    started = subprocess.run([*script, "start", str(folder)], env=env, capture_output=True, text=True, timeout=120)
    try:
        if started.returncode != 0:  # 3: not root or no packages; else a daemon did not start (its log says why)
            logs = "".join(f"\n{log}: {log.read_text()[-800:]}" for log in sorted(folder.glob("**/*.log")))
            pytest.skip(f"no local SLURM: {started.stderr.strip()}{logs if started.returncode != 3 else ''}")
        yield SlurmCluster(folder, {**env, "SLURM_CONF": str(folder / "slurm.conf")})
    finally:
        subprocess.run([*script, "stop", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One real SQLite MLflow store for the session: creating its schema costs seconds, so it is shared."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def experiment(request) -> str:
    """An experiment name of this test's own, so tests sharing the store never see each other's runs."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.nodeid)[-200:]


@pytest.fixture
def make_config(tracking_uri, experiment):
    """Compose the real conf/ with overrides, shrunk to a tiny CPU run tracked in the session store."""

    def make(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config",
                overrides=[*TINY, f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", *overrides],
            )

    return make


_store_template_folder: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _store_template_place(tmp_path_factory):
    """Where the migrated SQLite store that ``seed_store`` copies is made, once, on first use."""
    global _store_template_folder
    _store_template_folder = tmp_path_factory.mktemp("store-template")


def seed_store(args) -> None:
    """Give a ``tracking.uri=sqlite:///PATH`` among ``args`` that does not exist yet a copy of a store MLflow has
    made once for the session: creating one runs MLflow's schema migrations, about two seconds of CPU per test on
    this machine. Tests of creating a store itself pass ``fresh_store=True`` (tests/test_tracking.py and
    tests/test_launch.py create theirs with their own processes)."""
    template = _store_template_folder / "mlflow.db"
    for arg in args:
        if not arg.startswith("tracking.uri=sqlite:///"):
            continue
        path = Path(arg.removeprefix("tracking.uri=sqlite:///"))
        if not path.is_absolute() or path.exists() or not path.parent.is_dir():  # relative: to the runner's cwd
            continue
        if not template.exists():
            from mlflow import MlflowClient

            MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments(max_results=1)
        shutil.copyfile(template, path)


def run_runner(
    *args: str,
    cwd: Path,
    env: dict[str, str | None] | None = None,
    timeout: float = 600,
    fresh_store: bool = False,
    log_model: bool = False,
) -> subprocess.CompletedProcess:
    """``python -m runner args…`` as a user would start it, in ``cwd`` (a new SQLite store seeded: ``seed_store``).

    Without the model logged to MLflow (``tracking.log_model=false`` added) unless ``log_model`` or the args say
    otherwise: torch.export's tracing costs seconds of CPU at the end of each run, and only the tests of the model
    (tests/test_mlflow_outputs.py, the quick start, the README's commands run as written) are about it."""
    if not fresh_store:
        seed_store(args)
    if not log_model and not any(
        arg.startswith(("tracking.log_model=", "tracking.registered_model_name=")) for arg in args
    ):
        args = (*args, "tracking.log_model=false")
    full_env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    full_env = {key: value for key, value in full_env.items() if value is not None}  # env={"X": None} unsets X
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def mlflow_runs(uri: str, experiment: str):
    """Every training run of ``experiment``, read back through the real MLflow client: not the runs that stand for
    whole sweeps (``sweep_parents``)."""
    client, runs = _all_runs(uri, experiment)
    return client, [run for run in runs if "runner.sweep_parent" not in run.data.tags]


def sweep_parents(uri: str, experiment: str):
    """The runs that stand for sweeps (runner.sweep's parent runs), whose children the jobs' runs are."""
    client, runs = _all_runs(uri, experiment)
    return client, [run for run in runs if "runner.sweep_parent" in run.data.tags]


def _all_runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id], max_results=1000)


def metric_series(client, run_id: str, key: str) -> list[float]:
    """A metric's values ordered by step, after checking each step appears exactly once."""
    history = client.get_metric_history(run_id, key)
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(len(steps))), f"{key} steps {sorted(steps)} are not 0..n-1 exactly once"
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def assert_bitwise_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_result(resumed: dict, reference: dict):
    """Model, optimizer and scheduler bitwise equal, and every epoch's lr, train_loss, val_loss, val_accuracy."""
    assert resumed["finished"] and reference["finished"]
    assert_bitwise_equal(resumed["model"], reference["model"], "model")
    assert_bitwise_equal(resumed["optimizer"], reference["optimizer"], "optimizer")
    assert_bitwise_equal(resumed["scheduler"], reference["scheduler"], "scheduler")
    assert resumed["history"] == reference["history"]  # every epoch's metrics and the recorded per-step LRs


def assert_logged_once_as(uri: str, reference: dict, epochs: int, steps_per_epoch: int, experiment: str = "runner"):
    """One finished MLflow run; each epoch's metrics (and each recorded lr_step) exactly once, with the reference's values."""
    client, runs = mlflow_runs(uri, experiment)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert runs[0].info.status == "FINISHED"
    for key in ("lr", "train_loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(epochs)), key
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [
            h[key] for h in reference["history"]["epochs"]
        ], key
    lr_steps = {m.step: m.value for m in client.get_metric_history(run_id, "lr_step")}
    assert len(client.get_metric_history(run_id, "lr_step")) == len(lr_steps), "each lr_step once"
    assert lr_steps == reference["history"]["lr_steps"] and sorted(lr_steps) == list(
        range(0, epochs * steps_per_epoch, 5)
    )


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 4 MiB filesystem (tmpfs), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small_disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file, then give back ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\1" * 4096)
        except OSError:  # ENOSPC: full
            pass
    os.truncate(filler, filler.stat().st_size - leave)
    return filler
