"""Schedules: the expression LambdaLR keeps its state, and every configured scheduler gives torch's own LRs."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from runner.errors import ConfigError
from runner.expr import ExpressionError
from runner.schedules import ExpressionLambdaLR, simulate_schedule


def sgd(lr=0.1):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def lrs_over(scheduler, epochs):
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_expression_lambda_matches_torch_lambdalr_with_the_same_function():
    ours = ExpressionLambdaLR(sgd(), "0.5 ** (epoch // 3)")
    theirs = LambdaLR(sgd(), lambda epoch: 0.5 ** (epoch // 3))
    assert lrs_over(ours, 9) == lrs_over(theirs, 9)


def test_state_dict_holds_the_expression_and_restores_the_position():
    scheduler = ExpressionLambdaLR(sgd(), "0.5 ** (epoch // 3)")
    lrs_over(scheduler, 4)
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [{"expression": "0.5 ** (epoch // 3)"}]

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no pickled code needed

    optimizer = sgd()
    restored = ExpressionLambdaLR(optimizer, "1.0")  # a different expression is replaced by the saved one
    restored.load_state_dict(loaded)
    optimizer.param_groups[0]["lr"] = scheduler.optimizer.param_groups[0]["lr"]
    assert lrs_over(restored, 5) == lrs_over(scheduler, 5)


def test_pickles():
    scheduler = ExpressionLambdaLR(sgd(), "0.9 ** epoch")
    copy = pickle.loads(pickle.dumps(scheduler))
    assert copy.lr_lambdas[0](3) == pytest.approx(0.729)


def test_a_bad_expression_fails_at_construction():
    with pytest.raises(ExpressionError, match="scheduler.lr_lambda: the unknown name `x`"):
        ExpressionLambdaLR(sgd(), "x ** epoch")


def test_simulation_names_the_epoch_where_the_schedule_breaks():
    with pytest.raises(ConfigError, match="fails at epoch=4"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1 / (4 - epoch)"), 10)
    with pytest.raises(ConfigError, match="lr=-0.1 at epoch 2"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1 - epoch"), 10)
    with pytest.raises(ConfigError, match="lr=inf at epoch 0"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1e308 * 10"), 3)
