"""A whole run in-process: the LR logged for each epoch is the LR torch's own loop uses, and MLflow has it all."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, metric_series, mlflow_runs
from runner.run import RunContext, epoch_metrics, run
from runner.train import EpochResult

SCHEDULERS = sorted(path.stem for path in (CONF / "scheduler").glob("*.yaml"))
OPTIMIZERS = sorted(path.stem for path in (CONF / "optimizer").glob("*.yaml"))
EPOCHS = 7


def plain_torch_lrs(cfg) -> list[float]:
    """The textbook loop with torch's own classes and the same arguments; LambdaLR gets a Python lambda."""
    model = torch.nn.Linear(2, 1)
    opt_args = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer = getattr(torch.optim, opt_args.pop("_target_").rsplit(".", 1)[1])(model.parameters(), **opt_args)
    sched_args = OmegaConf.to_container(cfg.scheduler, resolve=True)
    target = sched_args.pop("_target_")
    if target.endswith("ExpressionLambdaLR"):
        source = sched_args.pop("lr_lambda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: eval(source, {"epoch": epoch}))
    else:
        scheduler = getattr(torch.optim.lr_scheduler, target.rsplit(".", 1)[1])(optimizer, **sched_args)
    lrs = []
    for _ in range(cfg.trainer.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(4, 2)).pow(2).mean().backward()
            optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_logged_lr_per_epoch_equals_a_plain_torch_loop(make_config, tracking_uri, experiment, tmp_path, optimizer, scheduler):
    cfg = make_config(f"optimizer={optimizer}", f"scheduler={scheduler}", f"trainer.epochs={EPOCHS}", "scheduler.total_iters=4" if scheduler in ("constant", "linear") else "trainer.seed=0")
    if scheduler == "constant":
        cfg.scheduler.factor = 0.5  # make the constant phase visible
    final_val_loss = run(cfg, RunContext(tmp_path, [f"optimizer={optimizer}", f"scheduler={scheduler}"]))

    client, runs = mlflow_runs(tracking_uri, experiment)
    (logged,) = runs
    assert logged.info.status == "FINISHED"
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(plain_torch_lrs(cfg), rel=1e-12)
    val_loss = metric_series(client, logged.info.run_id, "val_loss")
    assert len(val_loss) == EPOCHS and val_loss[-1] == pytest.approx(final_val_loss)
    assert len(metric_series(client, logged.info.run_id, "train_loss")) == EPOCHS
    assert all(0 <= a <= 1 for a in metric_series(client, logged.info.run_id, "val_accuracy"))


def test_known_case_sgd_with_halving_every_three_epochs(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config("optimizer=sgd", "optimizer.lr=0.1", "scheduler=lambda", "scheduler.lr_lambda='0.5 ** (epoch // 3)'", "trainer.epochs=9")
    run(cfg, RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025]
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(expected, rel=1e-12)


def test_known_case_adam_with_linear_decay_to_a_tenth(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config("optimizer=adam", "optimizer.lr=1e-3", "scheduler=lambda", "scheduler.lr_lambda='(10 - epoch) / 10'", "trainer.epochs=10")
    run(cfg, RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    expected = [1e-3 * (10 - e) / 10 for e in range(10)]
    assert expected[1] == pytest.approx(0.0009) and expected[-1] == pytest.approx(0.0001)
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(expected, rel=1e-12)


def test_mlflow_run_has_params_tags_and_the_resolved_config(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config("scheduler=cosine", "optimizer=adamw")
    run(cfg, RunContext(tmp_path / "run", ["scheduler=cosine", "optimizer=adamw"]))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert logged.info.run_name == "scheduler=cosine,optimizer=adamw"
    params = logged.data.params
    assert params["optimizer._target_"] == "torch.optim.AdamW"
    assert params["scheduler.T_max"] == "2"  # resolved from ${trainer.epochs}
    assert params["trainer.epochs"] == "2"
    tags = logged.data.tags
    assert tags["run_dir"] == str((tmp_path / "run").resolve())
    assert tags["overrides"] == "scheduler=cosine optimizer=adamw"
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id)]
    assert "resolved_config.yaml" in artifacts
    assert (tmp_path / "run" / "resolved_config.yaml").exists()


def test_regression_logs_losses_without_accuracy(make_config, tracking_uri, experiment, tmp_path):
    run(make_config("data=regression", "model=linear", "trainer.epochs=3"), RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert "val_accuracy" not in logged.data.metrics
    losses = metric_series(client, logged.info.run_id, "val_loss")
    assert losses[-1] < losses[0]
    assert losses[-1] < 0.3  # noise variance is 0.09: the line is being fitted


def test_training_learns_digits(make_config, tracking_uri, experiment, tmp_path):
    run(make_config("trainer.epochs=5"), RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert metric_series(client, logged.info.run_id, "val_accuracy")[-1] > 0.85


def test_every_param_group_gets_its_own_lr_metric():
    metrics = epoch_metrics(EpochResult(0, [0.1, 0.01], {"train_loss": 1.0}))
    assert metrics == {"lr": 0.1, "lr/group0": 0.1, "lr/group1": 0.01, "train_loss": 1.0}
    assert epoch_metrics(EpochResult(0, [0.1], {}))  == {"lr": 0.1}


def test_same_seed_same_result(make_config, tmp_path):
    cfg = make_config("trainer.deterministic=true")
    first = run(cfg, RunContext(tmp_path / "a"))
    second = run(cfg, RunContext(tmp_path / "b"))
    assert first == second and math.isfinite(first)
