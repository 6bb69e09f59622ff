"""The trained model as an MLflow model in MLflow's ``pt2`` format, traced where torch already is and logged where
MLflow already is.

``mlflow.pytorch.log_model(serialization_format="pt2")`` traces the model with torch.export and saves the program
(it loads without the model's code), which needs torch and torch._dynamo imported where MLflow runs: ~3 s of CPU
in MLflow's own process (runner.tracking_process), on the second core a short run's end waited for. The launch has
both imported already (the optimizer's first step imports torch._dynamo), so it traces and saves the program itself
(``export_program``, ~0.5 s the first time), and MLflow's process writes MLflow's pytorch model around that file
(``SavedProgram``) without importing torch: the same files, flavors and requirements as
``mlflow.pytorch.log_model`` writes for it (tests/test_model_logging.py compares the two).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import first_line

log = logging.getLogger(__name__)

PROGRAM_FILE = "model.pt2"  # where mlflow.pytorch's loader looks for a pt2 program, in the model's data folder
DATA_FOLDER = "data"
PICKLE_MODULE = "mlflow.pytorch.pickle_module"  # mlflow.pytorch's default, recorded by its pyfunc flavor


@dataclass(frozen=True)
class ExportedModel:
    """A model traced by torch.export and saved, with what MLflow records beside it (numpy only: MLflow's process
    reads it without torch)."""

    program: str  # the saved program's path
    example: Any  # np.ndarray: the input example, a batch
    output: Any  # np.ndarray: the model's output on it
    pytorch_version: str


def export_program(model, example, folder: Path) -> ExportedModel | None:
    """``model`` traced by torch.export on ``example`` (a batch of inputs) with its batch size free, as MLflow's pt2
    format traces it, checked to compute the model's outputs, and saved into ``folder``; None, said in one line,
    when torch.export cannot trace it (Python control flow on values, unsupported operators)."""
    import torch
    from torch.export import Dim

    with torch.no_grad():
        output = model(example)
    try:
        # The batch dimension is dynamic, as MLflow makes it from the signature's -1 (AUTO, as MLflow's own export:
        # torch keeps it static where the model needs it so, which the check refuses, the signature promising any)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim.AUTO},))
        _check_same_outputs(model, program.module(), example, output)
    except Exception as err:  # noqa: BLE001 - torch.export refuses many kinds of Python code in forward()
        log.warning(f"torch.export cannot trace the model ({first_line(err)}); logging it pickled instead")
        return None
    path = folder / PROGRAM_FILE
    torch.export.save(program, path)  # a failure here (a full disk) is not the model's: said as itself
    return ExportedModel(str(path), example.numpy(), output.numpy(), str(torch.__version__))


def _check_same_outputs(model, traced, example, output) -> None:
    """The traced program computes the model's outputs: ``output`` on the example, and on a batch of another size
    (the signature promises any batch size: a program torch specialized to the example's would refuse it)."""
    import torch

    other = torch.cat([example, example[:1]])
    with torch.no_grad():
        for batch, expected in ((example, output), (other, model(other))):
            if not torch.allclose(traced(batch), expected, rtol=1e-5, atol=1e-6, equal_nan=True):
                raise ValueError(f"its program computes other outputs than the model on a batch of {len(batch)}")


def pip_requirements() -> list[str]:
    """``mlflow.pytorch.get_default_pip_requirements()`` (torch and cloudpickle, pinned to what is installed),
    without importing ``mlflow.pytorch``, which imports torch for its Lightning autologging."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement("torch"), _get_pinned_requirement("cloudpickle")]


class SavedProgram:
    """A flavor module for ``mlflow.models.Model.log``: MLflow's pytorch model (pytorch and python_function
    flavors, as ``mlflow.pytorch.save_model`` writes them for the pt2 format) around an ``ExportedModel``'s file."""

    @staticmethod
    def save_model(path: str, mlflow_model, exported: ExportedModel, signature, input_example, **_: Any) -> None:
        import yaml
        from mlflow import pyfunc
        from mlflow.models.utils import _save_example
        from mlflow.utils.environment import (
            _CONDA_ENV_FILE_NAME,
            _PYTHON_ENV_FILE_NAME,
            _REQUIREMENTS_FILE_NAME,
            _process_pip_requirements,
            _PythonEnv,
        )
        from mlflow.utils.file_utils import get_total_file_size, write_to

        os.makedirs(os.path.join(path, DATA_FOLDER))
        _save_example(mlflow_model, input_example, path)
        mlflow_model.signature = signature
        shutil.copyfile(exported.program, os.path.join(path, DATA_FOLDER, PROGRAM_FILE))
        mlflow_model.add_flavor("pytorch", model_data=DATA_FOLDER, pytorch_version=exported.pytorch_version, code=None)
        pyfunc.add_to_model(
            mlflow_model,
            loader_module="mlflow.pytorch",
            data=DATA_FOLDER,
            pickle_module_name=PICKLE_MODULE,
            code=None,
            conda_env=_CONDA_ENV_FILE_NAME,
            python_env=_PYTHON_ENV_FILE_NAME,
            model_config={"device": None},
        )
        mlflow_model.model_size_bytes = get_total_file_size(path)
        mlflow_model.save(os.path.join(path, "MLmodel"))
        conda_env, requirements, _ = _process_pip_requirements(None, pip_requirements(), None)
        with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as file:
            yaml.safe_dump(conda_env, stream=file, default_flow_style=False)
        write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(requirements))
        _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
