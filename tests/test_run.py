"""A whole run in-process: the LR logged for each epoch is the LR torch's own loop uses, and MLflow has it all."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CONF, metric_series, mlflow_runs
from omegaconf import OmegaConf

from runner.run import RunContext, run
from runner.session import epoch_metrics
from runner.train import EpochResult

SCHEDULERS = sorted(path.stem for path in (CONF / "scheduler").glob("*.yaml"))
OPTIMIZERS = sorted(path.stem for path in (CONF / "optimizer").glob("*.yaml"))
EPOCHS = 7


def scheduler_overrides(scheduler: str, optimizer: str) -> list[str]:
    """Settings that make each schedule change within a short run."""
    return {
        "constant": ["scheduler.total_iters=4", "scheduler.factor=0.5"],
        "linear": ["scheduler.total_iters=4"],
        "warmup_cosine": ["scheduler.warmup=3"],
        "cosine_restarts": ["scheduler.T_0=3"],
        "onecycle": ["scheduler.cycle_momentum=true"]
        if optimizer != "asgd"
        else [],  # torch's default, where it applies
        "plateau": ["scheduler.patience=1", "scheduler.threshold=0.5"],  # improvements under 50% count as none
    }.get(scheduler, [])


RUNNER_KEYS = ("interval", "monitor", "warmup", "warmup_start_factor", "_recursive_")
# The lambda preset's expression, written as the Python function torch's LambdaLR would be given.
PRESET_LAMBDAS = {"0.5 ** (epoch // 3)": lambda epoch: 0.5 ** (epoch // 3)}


def torch_scheduler(optimizer: torch.optim.Optimizer, node: dict, total_steps: int, steps_per_epoch: int = 1):
    """torch's own classes for a scheduler node, built here directly from its arguments (not through the runner):
    the warm-up as torch's SequentialLR of LinearLR and the scheduler, the run's length where the YAML leaves it.
    A lambda stepped per batch sees the epoch of each step; after a warm-up, its count starts at 0 again."""
    lr_scheduler = torch.optim.lr_scheduler
    args = {k: v for k, v in node.items() if k not in RUNNER_KEYS}
    target = args.pop("_target_").rsplit(".", 1)[1]
    warmup = node.get("warmup", 0)
    remaining = total_steps - warmup
    if target == "ExpressionLambdaLR":
        of_epoch = PRESET_LAMBDAS[args["lr_lambda"]]
        per_batch = node.get("interval") == "step"
        main = lr_scheduler.LambdaLR(
            optimizer, lambda count: of_epoch(count // steps_per_epoch if per_batch else count)
        )
    elif target == "sequential":
        children = [torch_scheduler(optimizer, child, remaining) for child in args["schedulers"]]
        main = lr_scheduler.SequentialLR(optimizer, children, args["milestones"])
    elif target == "chained":
        children = [torch_scheduler(optimizer, child, remaining) for child in args["schedulers"]]
        main = lr_scheduler.ChainedScheduler(children, optimizer)
    else:
        if target == "OneCycleLR":
            args["total_steps"] = remaining
        if target == "CosineAnnealingLR" and args["T_max"] is None:
            args["T_max"] = remaining
        main = getattr(lr_scheduler, target)(optimizer, **args)
    if not warmup:
        return main
    return lr_scheduler.SequentialLR(
        optimizer, [lr_scheduler.LinearLR(optimizer, node["warmup_start_factor"], 1.0, warmup), main], [warmup]
    )


def plain_torch_lrs(cfg, steps_per_epoch: int, metrics: list[float] | None = None) -> list[float]:
    """The textbook loop with torch's own classes and the same arguments: the LR at each epoch's start.

    ReduceLROnPlateau is stepped on ``metrics``, the validation losses the runner logged."""
    model = torch.nn.Linear(2, 1)
    opt_args = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer = getattr(torch.optim, opt_args.pop("_target_").rsplit(".", 1)[1])(model.parameters(), **opt_args)
    node = OmegaConf.to_container(cfg.scheduler, resolve=True)
    per_batch = node.get("interval") == "step"
    scheduler = torch_scheduler(optimizer, node, cfg.trainer.epochs * (steps_per_epoch if per_batch else 1))
    epoch_lrs = []
    for epoch in range(cfg.trainer.epochs):
        epoch_lrs.append(optimizer.param_groups[0]["lr"])
        for _ in range(steps_per_epoch):
            optimizer.zero_grad()
            model(torch.randn(4, 2)).pow(2).mean().backward()
            optimizer.step()
            if per_batch:
                scheduler.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(metrics[epoch])
        elif not per_batch:
            scheduler.step()
    return epoch_lrs


def digits_steps_per_epoch(cfg) -> int:
    from sklearn.datasets import load_digits

    train_size = len(load_digits().target) - round(len(load_digits().target) * cfg.data.val_fraction)
    return math.ceil(train_size / cfg.trainer.batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_logged_lr_per_epoch_equals_a_plain_torch_loop(
    make_config, tracking_uri, experiment, tmp_path, optimizer, scheduler
):
    cfg = make_config(
        f"optimizer={optimizer}",
        f"scheduler={scheduler}",
        f"trainer.epochs={EPOCHS}",
        *scheduler_overrides(scheduler, optimizer),
    )
    final_val_loss = run(cfg, RunContext(tmp_path, [f"optimizer={optimizer}", f"scheduler={scheduler}"]))

    client, runs = mlflow_runs(tracking_uri, experiment)
    (logged,) = runs
    assert logged.info.status == "FINISHED"
    val_loss = metric_series(client, logged.info.run_id, "val_loss")
    expected = plain_torch_lrs(cfg, digits_steps_per_epoch(cfg), val_loss)
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) > 1, "the schedule changes the LR within this test"
    assert len(val_loss) == EPOCHS and val_loss[-1] == pytest.approx(final_val_loss)
    assert len(metric_series(client, logged.info.run_id, "train_loss")) == EPOCHS
    assert all(0 <= a <= 1 for a in metric_series(client, logged.info.run_id, "val_accuracy"))


def test_per_step_lambda_sees_step_and_logs_lr_step(make_config, tracking_uri, experiment, tmp_path):
    expression = "0.99 ** step * (1 if epoch < 2 else 0.5)"
    cfg = make_config(
        "scheduler=lambda",
        f"scheduler.lr_lambda='{expression}'",
        "scheduler.interval=step",
        "trainer.epochs=3",
        "tracking.log_every_n_steps=10",
    )
    run(cfg, RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    steps = digits_steps_per_epoch(cfg)
    expected = [0.1 * 0.99**s * (1 if s // steps < 2 else 0.5) for s in range(3 * steps)]
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(expected[::steps], rel=1e-12)
    history = client.get_metric_history(logged.info.run_id, "lr_step")
    assert sorted(m.step for m in history) == list(range(0, 3 * steps, 10))
    assert {m.step: m.value for m in history} == pytest.approx(
        {s: expected[s] for s in range(0, 3 * steps, 10)}, rel=1e-12
    )


def test_absolute_mode_reproduces_keras_learning_rates(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config(
        "optimizer=adam",
        "optimizer.lr=0.5",
        "scheduler=lambda",
        "scheduler.mode=absolute",
        "scheduler.lr_lambda='(1e-3 - 1e-8) * (10 - epoch) / 10'",
        "trainer.epochs=10",
    )
    run(cfg, RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    lrs = metric_series(client, logged.info.run_id, "lr")
    assert lrs[:2] == pytest.approx(
        [0.00099999, 0.000899991], rel=1e-12
    )  # Keras's LearningRateScheduler, not x optimizer.lr
    assert lrs == pytest.approx([(1e-3 - 1e-8) * (10 - e) / 10 for e in range(10)], rel=1e-12)


def test_a_factor_expression_equal_to_the_base_lr_warns_naming_both_modes(make_config, tmp_path, caplog):
    cfg = make_config(
        "optimizer.lr=0.001", "scheduler=lambda", "scheduler.lr_lambda='0.001 * 0.9 ** epoch'", "trainer.epochs=1"
    )
    with caplog.at_level("WARNING", logger="runner"):
        run(cfg, RunContext(tmp_path))
    (warning,) = [r.getMessage() for r in caplog.records if "scheduler.lr_lambda is 0.001 at epoch 0" in r.getMessage()]
    assert "mode=factor" in warning and "scheduler.mode=absolute" in warning and "0.001 x 0.001 = 1e-06" in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="runner"):
        run(
            make_config(
                "optimizer.lr=0.001",
                "scheduler=lambda",
                "scheduler.lr_lambda='0.9 ** epoch'",
                "trainer.epochs=1",
                "resume=never",
            ),
            RunContext(tmp_path / "second"),
        )
    assert not [r for r in caplog.records if "lr_lambda" in r.getMessage()]


def test_known_case_sgd_with_halving_every_three_epochs(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config(
        "optimizer=sgd",
        "optimizer.lr=0.1",
        "scheduler=lambda",
        "scheduler.lr_lambda='0.5 ** (epoch // 3)'",
        "trainer.epochs=9",
    )
    run(cfg, RunContext(tmp_path))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    expected = [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025]
    assert metric_series(client, logged.info.run_id, "lr") == pytest.approx(expected, rel=1e-12)


def test_known_case_adam_with_linear_decay_to_a_tenth(make_config, tracking_uri, experiment, tmp_path):
    cfg = make_config(
        "optimizer=adam",
        "optimizer.lr=1e-3",
        "scheduler=lambda",
        "scheduler.lr_lambda='(10 - epoch) / 10'",
        "trainer.epochs=10",
    )
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
    assert params["scheduler._target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert params["trainer.epochs"] == "2"
    assert params["optimizer.class"] == "AdamW" and params["scheduler.class"] == "CosineAnnealingLR"
    assert "None" not in params.values() and "trainer.device" not in params  # unset, and runtime-only (a tag)
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
    assert epoch_metrics(EpochResult(0, [0.1], {})) == {"lr": 0.1}


def test_same_seed_same_result(make_config, tmp_path):
    cfg = make_config("trainer.deterministic=true")
    first = run(cfg, RunContext(tmp_path / "a"))
    second = run(cfg, RunContext(tmp_path / "b"))
    assert first == second and math.isfinite(first)


def test_mlflow_params_leave_out_unset_values_name_each_class_and_split_what_mlflow_would_cut():
    from runner.tracking import MAX_PARAM_LENGTH, mlflow_params

    long = "x" * (2 * MAX_PARAM_LENGTH + 5)
    params = mlflow_params(
        {"model._target_": "runner.models.MLP", "trainer.gradient_clip_val": "None", "data.note": long}
        | {"loss._target_": "my.Loss", "loss.class": "3"}  # a setting named class of its own is kept as it is
    )
    assert params["loss.class"] == "3"
    assert params["model.class"] == "MLP" and params["model._target_"] == "runner.models.MLP"
    assert "trainer.gradient_clip_val" not in params
    assert params["data.note"] + params["data.note.part2"] + params["data.note.part3"] == long
    assert max(len(value) for value in params.values()) == MAX_PARAM_LENGTH
