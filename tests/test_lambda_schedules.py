"""The expression LambdaLR with the lambdas users bring: pasted lambdas, scheduler.constants, the run's epochs and
total_steps, saved state, and one-line errors from the runner itself."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from omegaconf import OmegaConf

from runner.errors import ConfigError
from runner.expr import ExpressionError
from runner.schedules import ExpressionLambdaLR, build_scheduler, check_schedule, plan_schedule

WARMUP_COSINE = "lambda step: min(1, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))"


def sgd(lr=0.1):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def lambda_node(**settings):
    return OmegaConf.create(
        {
            "_target_": "runner.schedules.ExpressionLambdaLR",
            "lr_lambda": "1.0",
            "constants": None,
            "mode": "factor",
            "interval": "epoch",
            **settings,
        }
    )


def test_the_runner_gives_epochs_and_total_steps_as_the_whole_runs_optimizer_steps():
    for interval in ("epoch", "step"):
        node = lambda_node(lr_lambda="epochs + total_steps / 1e6", interval=interval)
        scheduler = build_scheduler(plan_schedule(node, epochs=7, steps_per_epoch=45), sgd())
        assert scheduler.lr_lambdas[0](0) == 7 + 315 / 1e6  # 7 epochs of 45 steps, however the scheduler steps


def test_a_warmup_then_cosine_lambda_follows_the_runs_length():
    def lrs(epochs):
        node = lambda_node(lr_lambda=WARMUP_COSINE, interval="step", constants={"warmup": 15})
        step_lrs: list[float] = []
        check_schedule(
            plan_schedule(node, epochs=epochs, steps_per_epoch=10), lambda p: torch.optim.SGD(p, lr=1.0), step_lrs
        )
        return step_lrs

    for epochs in (3, 8):
        total = epochs * 10
        expected = [min(1, s / 15) * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
        assert lrs(epochs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constants_and_the_runs_length_are_saved_state_and_survive_a_weights_only_checkpoint():
    scheduler = ExpressionLambdaLR(
        sgd(), WARMUP_COSINE, constants={"warmup": 20}, steps_per_epoch=10, stepped_per_batch=True, total_steps=100
    )
    for _ in range(30):
        scheduler.optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0]["constants"] == {"warmup": 20} and state["lr_lambdas"][0]["epochs"] == 10
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = ExpressionLambdaLR(sgd(), "1.0", stepped_per_batch=True, steps_per_epoch=10)  # no constants, no length
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for count in (30, 55, 99):
        assert restored.lr_lambdas[0](count) == scheduler.lr_lambdas[0](count)
    copy = pickle.loads(pickle.dumps(restored))
    assert copy.lr_lambdas[0](55) == scheduler.lr_lambdas[0](55)


def test_a_pasted_lambdas_parameter_follows_the_interval():
    per_epoch = ExpressionLambdaLR(sgd(), "lambda step: step", steps_per_epoch=45)
    per_batch = ExpressionLambdaLR(sgd(), "lambda epoch: epoch", steps_per_epoch=45, stepped_per_batch=True)
    assert per_epoch.lr_lambdas[0](3) == 3  # stepped per epoch, its one parameter is the epoch, whatever its name
    assert per_batch.lr_lambdas[0](100) == 100  # stepped per batch, the global step


def test_inside_a_composition_the_runs_length_is_not_known_and_says_so():
    with pytest.raises(ExpressionError, match="epochs is given only to a schedule the runner builds itself"):
        ExpressionLambdaLR(sgd(), "1 - epoch / epochs")


@pytest.mark.parametrize(
    ("constants", "message"),
    [
        ({"total_steps": 5}, "scheduler.constants.total_steps: total_steps is already a name"),
        ({"warmup": "5"}, "scheduler.constants.warmup='5': a constant must be a number"),
    ],
)
def test_bad_constants_are_one_line_naming_the_key(constants, message):
    with pytest.raises(ConfigError, match=message):
        ExpressionLambdaLR(sgd(), "1.0", constants=constants)


def test_a_failure_mid_run_names_the_epoch_step_and_value():
    node = lambda_node(lr_lambda="lambda s: 1 / abs(s - 23)", interval="step")
    plan = plan_schedule(node, epochs=5, steps_per_epoch=10)
    with pytest.raises(
        ConfigError, match=r"fails at epoch=2, step=23: division by zero\. In `1 / abs\(s - 23\)`: 1 / 0\."
    ):
        check_schedule(plan, lambda p: torch.optim.SGD(p, lr=1.0))
