"""Callbacks from config: hooks called in order, state checkpointed, an early stop that finishes the run."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import assert_same_result, mlflow_runs
from test_resume import final_bundle, launch, run_dirs

pytestmark = pytest.mark.slow  # real subprocesses killed and resumed

RECORDER = textwrap.dedent('''
    from runner.callbacks import Callback


    class Recorder(Callback):
        """Remembers every epoch it saw and a running sum of the validation loss."""

        def __init__(self, scale: float = 1.0):
            self.scale, self.seen, self.total = scale, [], 0.0

        def on_epoch_end(self, epoch, metrics):
            self.seen.append(epoch)
            self.total += self.scale * metrics["val_loss"]

        def on_train_end(self, metrics):
            print(f"RECORDER saw {self.seen} total {self.total!r}", flush=True)

        def state_dict(self):
            return {"seen": list(self.seen), "total": self.total}

        def load_state_dict(self, state):
            self.seen, self.total = list(state["seen"]), state["total"]


    class Boom(Callback):
        def on_epoch_end(self, epoch, metrics):
            if epoch == 1:
                1 / 0
''')
CALLBACK = "+callbacks.recorder={_target_: my_callbacks.Recorder, scale: 2.0}"


@pytest.fixture
def folders(tmp_path):
    for name in ("reference", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "my_callbacks.py").write_text(RECORDER)
    return tmp_path


@pytest.mark.slow
def test_a_callbacks_state_survives_a_kill_and_resume_bitwise(folders):
    reference = launch(folders / "reference", CALLBACK)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = final_bundle(run_dirs(folders / "reference")[0])
    assert expected["callbacks"]["recorder"]["seen"] == [0, 1, 2, 3]
    assert "RECORDER saw [0, 1, 2, 3]" in reference.stdout

    killed = launch(folders / "resumed", CALLBACK, fault="SIGKILL:100")  # mid-epoch 3, after epoch 2's checkpoint
    assert killed.returncode == -9
    resumed = launch(folders / "resumed", CALLBACK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = final_bundle(run_dirs(folders / "resumed")[0])
    assert got["callbacks"] == expected["callbacks"]  # epochs 0, 1 restored from the checkpoint, 2, 3 seen again
    assert_same_result(got, expected)
    assert f"RECORDER saw [0, 1, 2, 3] total {expected['callbacks']['recorder']['total']!r}" in resumed.stdout


@pytest.mark.slow
def test_a_callback_that_stops_ends_the_run_finished_and_a_rerun_says_so(tmp_path):
    stop = "+callbacks.stop={_target_: runner.callbacks.StopAtValue, monitor: val_accuracy, value: 0.5}"
    result = launch(tmp_path, stop, "trainer.epochs=20")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    bundle = final_bundle(run_dir)
    epochs = bundle["progress"]["epoch"]
    assert 1 <= epochs < 20 and bundle["finished"]
    accuracies = [h["val_accuracy"] for h in bundle["history"]["epochs"]]
    assert accuracies[-1] >= 0.5 and all(a < 0.5 for a in accuracies[:-1])  # stopped at the first epoch reaching it
    assert f"stopped early by callbacks.stop after epoch {epochs}/20" in result.stderr
    assert json.loads((run_dir / "runner.json").read_text())["finished"]
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "FINISHED"
    again = launch(tmp_path, stop, "trainer.epochs=20")
    assert again.returncode == 0 and "already finished" in again.stderr


def test_a_callback_that_raises_shows_its_own_frames_and_names_the_hook(tmp_path):
    (tmp_path / "my_callbacks.py").write_text(RECORDER)
    result = launch(tmp_path, "+callbacks.boom={_target_: my_callbacks.Boom}")
    assert result.returncode == 1
    assert "error: callbacks.boom (Boom).on_epoch_end raised ZeroDivisionError: division by zero" in result.stderr
    assert "my_callbacks.py" in result.stderr and "1 / 0" in result.stderr  # the user's frame, with its line
    assert "runner/session.py" not in result.stderr  # not the runner's own frames
    _, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "FAILED"


def test_a_users_loss_that_raises_during_training_shows_its_frames(tmp_path):
    (tmp_path / "bad_loss.py").write_text(
        textwrap.dedent("""
        import torch

        calls = 0

        def loss(outputs, targets):
            global calls
            calls += 1
            if calls > 3:  # after the start-up check
                raise ValueError("my loss broke")
            return torch.nn.functional.cross_entropy(outputs, targets)
    """)
    )
    result = launch(tmp_path, "loss._target_=bad_loss.loss")
    assert result.returncode == 1
    assert "error: the loss (function) raised ValueError: my loss broke" in result.stderr
    assert "bad_loss.py" in result.stderr and 'raise ValueError("my loss broke")' in result.stderr


def test_a_callback_switched_off_in_a_sweep_is_left_out(make_config):
    from runner.build import build_callbacks
    from runner.metrics import build_run_metrics

    metrics = build_run_metrics(None, "classification", 10)
    cfg = make_config("+callbacks.stop={_target_: runner.callbacks.StopAtValue, monitor: val_loss, value: 0.1}")
    assert list(build_callbacks(cfg, metrics).callbacks) == ["stop"]
    assert build_callbacks(make_config("+callbacks.stop=null"), metrics).callbacks == {}
    assert build_callbacks(cfg, metrics).callbacks["stop"].higher_is_better is False  # val_loss: lower is better


def test_early_stopping_is_a_callback_of_its_own_name_with_the_monitors_direction(make_config):
    from runner.build import build_callbacks
    from runner.errors import ConfigError
    from runner.metrics import build_run_metrics

    metrics = build_run_metrics(None, "classification", 10)
    cfg = make_config("trainer.early_stopping.patience=2", "trainer.monitor=val_accuracy")
    stopping = build_callbacks(cfg, metrics).callbacks["early_stopping"]
    assert stopping.higher_is_better and stopping.patience == 2
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.59]):
        stopping.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert stopping.stop_training and stopping.best_epoch == 1  # a tie is no improvement
    taken = make_config(
        "trainer.early_stopping.patience=2", "+callbacks.early_stopping={_target_: runner.callbacks.Callback}"
    )
    with pytest.raises(ConfigError, match="callbacks.early_stopping: the name is taken by trainer.early_stopping"):
        build_callbacks(taken, metrics)
    with pytest.raises(ConfigError, match="trainer.monitor='val_f1' is not logged by this run"):
        build_callbacks(make_config("trainer.early_stopping.patience=2", "trainer.monitor=val_f1"), metrics)


def test_a_users_torchmetrics_metric_that_raises_shows_its_frames_and_names_the_metric(tmp_path):
    (tmp_path / "my_metrics.py").write_text(
        textwrap.dedent("""
        import torch
        import torchmetrics

        class Broken(torchmetrics.Metric):
            higher_is_better = True

            def __init__(self, num_classes=None):
                super().__init__()
                self.add_state("total", default=torch.zeros(()), dist_reduce_fx="sum")

            def update(self, outputs, targets):
                raise KeyError("my metric broke")

            def compute(self):
                return self.total
    """)
    )
    result = launch(tmp_path, "metrics=[accuracy,{_target_: my_metrics.Broken, name: broken}]")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: the metric broken (Broken) raised KeyError: 'my metric broke'" in result.stderr
    assert "my_metrics.py" in result.stderr and 'raise KeyError("my metric broke")' in result.stderr
    assert "runner/train.py" not in result.stderr
