"""``python -m runner`` as users start it: real subprocesses, a real SQLite MLflow store, output read back."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import CONF, metric_series, mlflow_runs, run_runner

from runner.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow  # real `python -m runner` subprocesses

OPTIMIZERS = sorted(path.stem for path in (CONF / "optimizer").glob("*.yaml"))
SCHEDULERS = sorted(path.stem for path in (CONF / "scheduler").glob("*.yaml"))
QUIET = ["trainer.progress_bar=false"]


def tracked(tmp_path, experiment="e2e"):
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.experiment={experiment}"]


def test_readme_quick_start_trains_the_defaults_with_mlflow_in_the_working_directory(tmp_path):
    before = time.time() * 1000
    result = run_runner("scheduler=linear", "trainer.epochs=3", *QUIET, cwd=tmp_path, log_model=True)
    after = time.time() * 1000
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlflow.db").exists()  # MLflow's own default store, where `mlflow ui` looks
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.run_name == "scheduler=linear,trainer.epochs=3,trainer.progress_bar=false"
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx([0.1 / 3, 0.1 * 7 / 15, 0.1 * 9 / 15])
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert (run_dir / ".hydra" / "config.yaml").exists()
    log = (run_dir / "runner.log").read_text()
    assert "epoch 3/3 lr 0.06" in log and "val_accuracy" in log
    assert logged.data.tags["run_dir"] == str(run_dir.resolve())
    # Nothing lost on the way out, which skips the final garbage collection (runner.__main__.end_quickly): the log
    # holds its last lines, MLflow the finished run with every epoch, the last checkpoint says it is the end.
    assert f"MLflow run {logged.info.run_id}" in log
    assert "MLflow model models:/m-" in log and "best.pt's (epoch 3) weights" in log  # logged by default
    assert logged.info.status == "FINISHED" and len(metric_series(client, logged.info.run_id, "val_accuracy")) == 3
    assert torch.load(list_checkpoints(run_dir)[-1], weights_only=True)["finished"]
    # MLflow's own tags, the versions, and no tag without a value (tracking.uri was left to MLflow's default)
    tags = logged.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "python -m runner"
    assert tags["mlflow.user"] and tags["torch.version"] == torch.__version__ and "runner.version" in tags
    assert "tracking.uri" not in tags and not [key for key, value in tags.items() if value in ("", "None")]
    # Its model's source is the run's, not MLflow's process that logged it (runner/tracking_process.py, and the
    # runner's own git checkout: this folder is none)
    (model,) = client.search_logged_models(experiment_ids=[logged.info.experiment_id])
    source = {key: value for key, value in model.tags.items() if key.startswith("mlflow.source.")}
    assert source == {"mlflow.source.name": "python -m runner", "mlflow.source.type": "LOCAL"}
    # The run spans training (not the moment the background thread created it); each epoch its own end time
    ended = [
        m.timestamp for m in sorted(client.get_metric_history(logged.info.run_id, "val_loss"), key=lambda m: m.step)
    ]
    assert before <= logged.info.start_time < ended[0] < ended[1] < ended[2] <= logged.info.end_time <= after


@pytest.mark.slow
def test_every_optimizer_with_every_scheduler_trains_in_one_sweep(tmp_path):
    """Every preset as shipped (warmup_cosine's 5-epoch warm-up needs a run longer than 5 epochs)."""
    result = run_runner(
        "-m",
        f"optimizer={','.join(OPTIMIZERS)}",
        f"scheduler={','.join(SCHEDULERS)}",
        "trainer.epochs=6",
        "trainer.device=cpu",
        *QUIET,
        *tracked(tmp_path),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "e2e")
    by_name = {run.info.run_name: run for run in runs}
    for optimizer in OPTIMIZERS:
        for scheduler in SCHEDULERS:
            logged = by_name[f"optimizer={optimizer} scheduler={scheduler}"]  # what sets it apart, nothing shared
            name = logged.info.run_name
            assert logged.info.status == "FINISHED", name
            assert len(metric_series(client, logged.info.run_id, "lr")) == 6, name
            assert len(metric_series(client, logged.info.run_id, "val_loss")) == 6, name
    assert len(runs) == len(OPTIMIZERS) * len(SCHEDULERS)
    assert len(list((tmp_path / "sweep").glob("*/runner.log"))) == len(runs)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["optimizer=asgd", "+optimizer.mu=0.9"],
            "optimizer (torch.optim.asgd.ASGD): unknown argument mu. Valid arguments: lr, lambd, alpha, t0, weight_decay",
        ),
        (
            ["scheduler=constant", "+scheduler.lr=0.01"],
            "scheduler (torch.optim.lr_scheduler.ConstantLR): unknown argument lr. Valid arguments: factor, total_iters.",
        ),
        (["optimizer.lr=0"], "optimizer.lr must be a number above 0, got 0."),
        (["optimizer.lr=-0.1"], "optimizer.lr must be a number above 0"),
        (["trainer.epochs=0"], "trainer.epochs must be at least 1, got 0."),
        (["trainer.batch_size=0"], "trainer.batch_size must be at least 1, got 0."),
        (
            ["trainer.eval_batch_size=0"],
            "trainer.eval_batch_size must be at least 1 (or null: 4 x trainer.batch_size), got 0.",
        ),
        (["trainer.device=gpu"], "trainer.device='gpu' is not a device; use auto, cpu, cuda, cuda:N or mps."),
        (["scheduler=constant", "scheduler.factor=0"], "scheduler.factor=0: ConstantLR factor must be above 0."),
        (
            ["scheduler=linear", "scheduler.start_factor=0"],
            "scheduler.start_factor=0: LinearLR start_factor must be above 0.",
        ),
        (
            ["scheduler=linear", "scheduler.total_iters=0"],
            "scheduler.total_iters=0: LinearLR total_iters must be at least 1.",
        ),
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size=0: StepLR step_size must be at least 1."),
        (
            ["scheduler=lambda", "scheduler.lr_lambda='epoch.real'"],
            "scheduler.lr_lambda: attribute access `epoch.real` is not allowed in 'epoch.real'; allowed:",
        ),
        (
            ["scheduler=lambda", "scheduler.lr_lambda='1 / (1 - epoch)'"],
            "scheduler.lr_lambda: '1 / (1 - epoch)' fails at epoch=1, step=45: division by zero.",
        ),
        (
            ["scheduler=lambda", "scheduler.lr_lambda='1 / (57 - epoch)'", "trainer.epochs=100"],
            "fails at epoch=57, step=2565: division by zero.",
        ),
        (
            ["scheduler=lambda", "scheduler.interval=step", "scheduler.lr_lambda='0.5 - step / 100'"],
            "the schedule gives lr=-0.001 at epoch 1 (step 51)",
        ),
        (["scheduler=plateau", "scheduler.monitor=val_accuracy"], "set scheduler.mode=max."),
        (
            ["data=mnist", "data.root=nowhere"],
            "nowhere; put them there, point data.root at them, or add data.download=true to download them.",
        ),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, overrides, expected):
    result = run_runner(*overrides, *QUIET, *tracked(tmp_path), cwd=tmp_path, fresh_store=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "epoch 1/" not in result.stderr  # nothing trained
    assert not (tmp_path / "mlflow.db").exists()  # and no MLflow run was opened for it


def test_cuda_asked_for_where_there_is_none(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_runner("trainer.device=cuda", *QUIET, cwd=tmp_path)
    assert result.returncode == 2
    assert "trainer.device=cuda but CUDA is not available here; use trainer.device=auto or cpu." in result.stderr


def test_full_traceback_only_with_hydra_full_error(tmp_path):
    result = run_runner("optimizer.lr=0", *QUIET, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError: optimizer.lr must be a number above 0" in result.stderr


def test_misspelled_trainer_key_fails_at_compose_time_with_the_key_path(tmp_path):
    result = run_runner("trainer.epoch=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "Key 'epoch' not in 'TrainerConfig'" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_config_without_importing_torch_or_mlflow(tmp_path):
    result = run_runner("--cfg", "job", "scheduler=linear", cwd=tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0, result.stderr
    assert "_target_: torch.optim.lr_scheduler.LinearLR" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "hydra" in imported  # the import-time listing really was read
    assert not {"torch", "mlflow", "torchvision", "sklearn"} & imported


def test_help_lists_the_config_groups(tmp_path):
    result = run_runner("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group, options in {
        "optimizer": "adam, adamw, asgd, sgd",
        "scheduler": "chained, constant, cosine, cosine_restarts, exponential, lambda, linear, multistep, onecycle, plateau, sequential, step, warmup_cosine",
        "model": "cnn, linear, mlp, resnet18",
        "data": "cifar10, csv, custom, digits, fake, fashion_mnist, image_folder, mnist, regression",
        "loss": "auto, bce_with_logits, cross_entropy, huber, l1, mse",
    }.items():
        assert f"{group}: {options}" in result.stdout, result.stdout


def test_users_own_config_dir_adds_an_option(tmp_path):
    own = tmp_path / "my_conf" / "scheduler"
    own.mkdir(parents=True)
    (own / "halving.yaml").write_text("_target_: torch.optim.lr_scheduler.StepLR\nstep_size: 1\ngamma: 0.5\n")
    result = run_runner(
        "--config-dir",
        str(tmp_path / "my_conf"),
        "scheduler=halving",
        "trainer.epochs=3",
        *QUIET,
        *tracked(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "e2e")
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx([0.1, 0.05, 0.025])


def test_users_own_model_class(tmp_path):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "class Tiny(torch.nn.Sequential):\n"
        "    def __init__(self, width: int = 8):\n"  # takes neither input_shape nor num_outputs
        "        super().__init__(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))\n"
    )
    result = run_runner(
        "model._target_=my_models.Tiny",
        "~model.hidden_sizes",
        "~model.dropout",
        "+model.width=16",
        *QUIET,
        *tracked(tmp_path),
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("launcher", ["basic", "joblib"])  # joblib: the bad job fails in another process
def test_a_sweep_reports_a_bad_job_in_one_line_runs_the_others_and_exits_2(tmp_path, launcher):
    result = run_runner(
        "-m",
        f"hydra/launcher={launcher}",
        "scheduler=step",
        "scheduler.step_size=0,2",
        "trainer.epochs=2",
        *QUIET,
        *tracked(tmp_path),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "scheduler.step_size=0: StepLR step_size must be at least 1." in result.stderr
    assert "1 job(s) failed: scheduler.step_size=0" in result.stderr  # a job by what sets it apart in the sweep
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "e2e")
    assert logged.info.run_name == "scheduler.step_size=2"


def test_a_sqlite_store_in_a_missing_folder_is_one_line_before_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    result = run_runner(f"tracking.uri={uri}", *QUIET, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"the folder {tmp_path / 'nowhere'} does not exist" in errors[0], result.stderr
    assert "epoch 1/" not in result.stderr
