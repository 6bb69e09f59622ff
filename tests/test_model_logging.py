"""runner.model_logging: the model traced in the launch, logged by MLflow's process without torch, as the very files
``mlflow.pytorch.log_model`` writes for the pt2 format; a model torch.export cannot trace is pickled. A real SQLite
store, read back through MLflow's own loaders."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.models import infer_signature

from runner.model_logging import ExportedModel, export_program, pip_requirements
from runner.tracking import Tracker, fluent_target

# What differs between two loggings of the same model: ids, times, where it lies
VOLATILE = {"artifact_path", "model_id", "model_uuid", "run_id", "utc_time_created", "model_size_bytes"}


def store_in(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def digits_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    return torch.nn.Sequential(*layers).eval()


class ValueDependent(torch.nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def downloaded(uri: str, model_uri: str, folder: Path) -> Path:
    with fluent_target(uri, None):
        return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))


def test_the_launchs_program_is_logged_as_the_same_files_as_mlflow_pytorch_log_model_writes(tmp_path):
    """If MLflow changes its pytorch flavor's files, this says so: the runner writes them without mlflow.pytorch."""
    uri, model, example = store_in(tmp_path), digits_mlp(), torch.rand(2, 1, 8, 8)
    tracker = Tracker(uri, "models").open("a run")
    ours = tracker.log_exported_model(export_program(model, example, tmp_path))
    output = model(example).detach().numpy()
    with fluent_target(uri, tracker.experiment_id):
        theirs = mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            signature=infer_signature(example.numpy(), output),
            input_example=example.numpy(),
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            run_id=tracker.run_id,
        ).model_uri
    ours_dir, theirs_dir = downloaded(uri, ours, tmp_path / "ours"), downloaded(uri, theirs, tmp_path / "theirs")

    def files(folder: Path) -> set[str]:
        return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}

    assert files(ours_dir) == files(theirs_dir)
    assert "data/model.pt2" in files(ours_dir)
    mlmodel = [
        {k: v for k, v in yaml.safe_load((d / "MLmodel").read_text()).items() if k not in VOLATILE}
        for d in (ours_dir, theirs_dir)
    ]
    assert mlmodel[0] == mlmodel[1]
    for name in (
        "requirements.txt",
        "conda.yaml",
        "python_env.yaml",
        "input_example.json",
        "serving_input_example.json",
    ):
        assert (ours_dir / name).read_text() == (theirs_dir / name).read_text(), name
    assert pip_requirements() == mlflow.pytorch.get_default_pip_requirements()

    client = MlflowClient(uri)
    logged = {model_uri: client.get_logged_model(model_uri.removeprefix("models:/")) for model_uri in (ours, theirs)}
    kept = [{k: v for k, v in m.tags.items() if not k.startswith("mlflow.source")} for m in logged.values()]
    assert kept[0] == kept[1]
    assert logged[ours].status == logged[theirs].status

    with fluent_target(uri, None):
        loaded = mlflow.pytorch.load_model(ours)
        served = mlflow.pyfunc.load_model(ours)
    images = torch.rand(5, 1, 8, 8)  # another batch size than the example's
    assert torch.allclose(loaded(images), model(images))
    assert np.allclose(served.predict(images.numpy()), model(images).detach().numpy(), atol=1e-6)


def test_mlflows_side_logs_the_program_without_importing_torch(tmp_path):
    """What MLflow's process does with an ExportedModel, in a process that has not imported torch: it stays so."""
    uri, model, example = store_in(tmp_path), digits_mlp(), torch.rand(2, 1, 8, 8)
    exported = export_program(model, example, tmp_path)
    (tmp_path / "exported.pickle").write_bytes(pickle.dumps(exported))
    script = (
        "import pickle, sys\n"
        "from runner.tracking import Tracker\n"
        f"exported = pickle.loads(open({str(tmp_path / 'exported.pickle')!r}, 'rb').read())\n"
        f"print(Tracker({uri!r}, 'models').open('a run').log_exported_model(exported, 'digits'))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    model_uri, torch_imported = done.stdout.split()
    assert torch_imported == "False"
    with fluent_target(uri, None):
        loaded = mlflow.pytorch.load_model(model_uri)
    images = torch.rand(3, 1, 8, 8)
    assert torch.allclose(loaded(images), model(images))
    assert MlflowClient(uri).get_model_version("digits", "1").source == model_uri  # registered, as asked


def test_an_exported_model_holds_numpy_only_and_its_program_computes_the_models_outputs(tmp_path):
    model, example = digits_mlp(), torch.rand(2, 1, 8, 8)
    exported = export_program(model, example, tmp_path)
    assert isinstance(exported, ExportedModel)
    assert isinstance(exported.example, np.ndarray) and isinstance(exported.output, np.ndarray)
    assert np.array_equal(exported.example, example.numpy())
    assert np.allclose(exported.output, model(example).detach().numpy())
    program = torch.export.load(exported.program)
    assert torch.allclose(program.module()(torch.ones(7, 1, 8, 8)), model(torch.ones(7, 1, 8, 8)))  # any batch
    assert exported.pytorch_version == torch.__version__


def test_a_model_torch_export_cannot_trace_is_said_in_one_line_and_logged_pickled(tmp_path, caplog):
    model, example = ValueDependent().eval(), torch.rand(2, 3)
    assert export_program(model, example, tmp_path) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "runner.model_logging"]
    assert warning.startswith("torch.export cannot trace the model (") and "logging it pickled instead" in warning
    assert "\n" not in warning and not list(tmp_path.iterdir())

    uri = store_in(tmp_path)
    tracker = Tracker(uri, "models").open("a run")
    model_uri = tracker.log_pickled_model(model, example)
    with fluent_target(uri, None):
        loaded = mlflow.pytorch.load_model(model_uri)
    for batch in (torch.rand(4, 3), -torch.rand(4, 3)):  # both branches: the model itself, not a trace of one
        assert torch.allclose(loaded(batch), model(batch))


class FixedBatch(torch.nn.Module):
    """Reshapes by the example's batch size: torch.export keeps that size, which the signature's -1 would deny."""

    def forward(self, x):
        return x.reshape(2, -1).sum(1, keepdim=True)


def test_a_program_that_takes_only_the_examples_batch_size_is_refused_and_the_model_pickled(tmp_path, caplog):
    assert export_program(FixedBatch(), torch.rand(2, 3), tmp_path) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "runner.model_logging"]
    assert warning.startswith("torch.export cannot trace the model (") and not list(tmp_path.iterdir())


def test_a_program_that_cannot_be_saved_is_an_error_of_its_own_not_a_reason_to_pickle(tmp_path, caplog):
    with pytest.raises(Exception) as raised:
        export_program(digits_mlp(), torch.rand(2, 1, 8, 8), tmp_path / "no such folder")
    assert "no such folder" in str(raised.value)
    assert not [r for r in caplog.records if r.name == "runner.model_logging"]


def test_a_model_of_token_ids_is_exported_with_an_integer_signature(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    example = torch.randint(0, 20, (2, 3))
    exported = export_program(model, example, tmp_path)
    assert exported is not None and exported.example.dtype == np.int64
    signature = infer_signature(exported.example, exported.output)
    assert json.loads(signature.to_dict()["inputs"])[0]["tensor-spec"] == {"dtype": "int64", "shape": [-1, 3]}
