"""What a run leaves in MLflow besides its metrics: its files, its trained model (loading back and predicting),
system metrics when asked, and where to look at it. Real ``python -m runner`` subprocesses and real signals into a
real SQLite store, read back through ``MlflowClient``."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY, run_runner
from mlflow import MlflowClient

from runner.model_logging import export_program
from runner.signals import EXIT_STOPPED, FAULT_AT_STEP_ENV
from runner.tracking import Tracker, fluent_target


def store_in(tmp_path: Path) -> str:
    (tmp_path / "store").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def the_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("runner").experiment_id])
    return client, run


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, folder):
        found |= artifact_paths(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def logged_models(uri: str, run) -> list:
    found = MlflowClient(uri).search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    return list(found)


@pytest.mark.slow
def test_a_finished_run_holds_its_files_and_its_best_model_which_loads_back_and_predicts(tmp_path):
    uri, work = store_in(tmp_path), tmp_path / "work"
    work.mkdir()
    result = run_runner(
        *TINY,
        "trainer.epochs=3",
        "optimizer.lr=2.0",  # unstable: the last epoch is unlikely to be the best, so best.pt's weights are checked
        f"tracking.uri={uri}",
        "tracking.registered_model_name=digits-mlp",
        "hydra.run.dir=run",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = the_run(uri)
    run_id = run.info.run_id

    files = artifact_paths(client, run_id)
    assert {"resolved_config.yaml", "runner.log", "hydra/overrides.yaml", "hydra/config.yaml"} <= files
    downloaded = Path(client.download_artifacts(run_id, "runner.log", str(tmp_path / "down")))
    assert "epoch 3/3" in downloaded.read_text()  # uploaded at the end, not when the run began
    overrides = Path(client.download_artifacts(run_id, "hydra/overrides.yaml", str(tmp_path / "down")))
    assert "optimizer.lr=2.0" in overrides.read_text()

    (model,) = logged_models(uri, run)
    assert model.artifact_location.startswith((tmp_path / "store" / "mlruns").as_uri())  # beside the database
    assert not (work / "mlruns").exists(), "nothing lands in the folder the command ran from"
    with fluent_target(uri, None):  # load_model reads MLflow's process-wide URI; put back after
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        signature = mlflow.models.get_model_info(f"models:/{model.model_id}").signature
    best = torch.load(work / "run" / "checkpoints" / "best.pt", weights_only=True)
    weights = loaded.state_dict()
    assert best["model"].keys() == weights.keys()
    assert all(torch.equal(weights[key], value) for key, value in best["model"].items())  # best.pt's, not the last
    images = torch.rand(5, 1, 8, 8)
    assert loaded(images).shape == (5, 10)  # any batch size, though the input example had two
    assert signature.inputs.inputs[0].shape == (-1, 1, 8, 8) and signature.outputs.inputs[0].shape == (-1, 10)

    version = client.get_model_version("digits-mlp", "1")
    assert version.run_id == run_id
    assert f"MLflow model models:/{model.model_id}: best.pt's (epoch {best['epoch']}) weights, registered as" in (
        result.stderr
    )
    assert f"see the runs: mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/#/experiments/" in (
        result.stderr
    )


@pytest.mark.slow
def test_log_model_false_logs_no_model_and_a_stopped_run_still_uploads_its_log(tmp_path):
    uri = store_in(tmp_path)
    stopped = run_runner(
        *TINY,
        "tracking.log_model=false",
        f"tracking.uri={uri}",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={FAULT_AT_STEP_ENV: "SIGTERM:60"},  # in epoch 2 of 2 (45 steps an epoch)
    )
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    client, run = the_run(uri)
    assert run.info.status == "KILLED"
    log_text = Path(client.download_artifacts(run.info.run_id, "runner.log", str(tmp_path / "down"))).read_text()
    assert "epoch 1/2" in log_text and "epoch 2/2" not in log_text  # the log as it stood at the stop

    resumed = run_runner(*TINY, "tracking.log_model=false", f"tracking.uri={uri}", "hydra.run.dir=run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, run = the_run(uri)
    assert run.info.status == "FINISHED"
    log_text = Path(client.download_artifacts(run.info.run_id, "runner.log", str(tmp_path / "again"))).read_text()
    assert "epoch 2/2" in log_text  # replaced by the log of the whole run at its end
    assert logged_models(uri, run) == [] and "MLflow model" not in resumed.stderr


def test_a_registered_model_name_without_logging_the_model_is_refused_before_training(tmp_path):
    result = run_runner(
        *TINY,
        "tracking.log_model=false",
        "tracking.registered_model_name=digits-mlp",
        f"tracking.uri={store_in(tmp_path)}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    refusal = "tracking.registered_model_name needs the model logged: drop tracking.log_model=false, or the name."
    assert result.stderr.strip().splitlines()[-1].endswith(refusal)
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


@pytest.mark.slow
def test_system_metrics_are_mlflows_own_and_only_when_asked(tmp_path):
    uri = store_in(tmp_path)
    result = run_runner(
        *TINY,
        "trainer.epochs=6",
        "tracking.system_metrics=true",
        "tracking.log_model=false",
        f"tracking.uri={uri}",
        cwd=tmp_path,
        env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"},  # MLflow's own setting: 10 s by default
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, run = the_run(uri)
    system = {key for key in run.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 1

    plain = run_runner(*TINY, "tracking.log_model=false", f"tracking.uri={uri}", "resume=never", cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    runs = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])
    assert not [key for key in runs[0].data.metrics if key.startswith("system/")]


@pytest.mark.parametrize("format", ["pt2", "pickle"])
def test_logging_a_model_leaves_mlflows_process_wide_uri_and_experiment_as_they_were(tmp_path, monkeypatch, format):
    """MLflow's model logging needs MLflow's global URI and experiment, which also go into os.environ for every
    later subprocess; the runner sets them for the call only."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    before = mlflow.get_tracking_uri()
    tracker = Tracker(store_in(tmp_path), "models").open("a run")
    model, example = torch.nn.Linear(3, 2).eval(), torch.rand(2, 3)
    if format == "pt2":
        uri = tracker.log_exported_model(export_program(model, example, tmp_path))
    else:
        uri = tracker.log_pickled_model(model, example)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert mlflow.get_tracking_uri() == before
    (model,) = logged_models(tracker.uri, MlflowClient(tracker.uri).get_run(tracker.run_id))
    assert uri == f"models:/{model.model_id}" and model.experiment_id == tracker.experiment_id  # not "Default"


def test_a_sweeps_parent_run_deleted_in_the_ui_is_restored_when_the_sweep_runs_again(tmp_path):
    from runner.sweep import open_parent_run

    uri = store_in(tmp_path)
    first = open_parent_run(uri, "sweeps", "abc123", "sweep scheduler=a,b", str(tmp_path))
    client = MlflowClient(uri)
    client.set_terminated(first, "KILLED")
    client.delete_run(first)
    again = open_parent_run(uri, "sweeps", "abc123", "sweep scheduler=a,b", str(tmp_path))
    assert again == first
    run = client.get_run(first)
    assert run.info.lifecycle_stage == "active" and run.info.status == "RUNNING"
    other = open_parent_run(uri, "sweeps", "def456", "sweep scheduler=c,d", str(tmp_path))
    assert other != first and client.get_run(other).info.run_name == "sweep scheduler=c,d"
