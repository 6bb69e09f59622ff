"""Scheduler pieces torch lacks: a LambdaLR driven by a safe expression string, and start-up checks.

torch's LambdaLR cannot save a plain Python lambda in its ``state_dict``; here the expression string is the
lambda's whole state, so the scheduler survives ``state_dict()``/``load_state_dict()``, pickling and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from runner.errors import ConfigError
from runner.expr import compile_expression


class ExpressionFactor:
    """The multiplicative factor of epoch ``epoch``, computed from an expression string.

    Only ``expression`` lives in ``__dict__``: that is what LambdaLR's ``state_dict`` stores, and the checked,
    compiled form is looked up from a cache instead of being pickled.
    """

    def __init__(self, expression: str):
        self.expression = expression
        self._compiled()  # refuse a bad expression now, at start-up

    def _compiled(self):
        return compile_expression(self.expression, ("epoch",), "scheduler.lr_lambda")

    def __call__(self, epoch: int) -> float:
        return self._compiled()(epoch=epoch)


class ExpressionLambdaLR(LambdaLR):
    """LambdaLR whose ``lr_lambda`` is an expression string in ``epoch``, e.g. ``"0.5 ** (epoch // 3)"``.

    As with torch's LambdaLR, the value is a factor of the optimizer's base LR (not the LR itself).
    """

    def __init__(self, optimizer: Optimizer, lr_lambda: str, last_epoch: int = -1):
        super().__init__(optimizer, ExpressionFactor(lr_lambda), last_epoch)


def _positive(name: str) -> Callable[[Any], str | None]:
    return lambda value: None if value > 0 else f"{name} must be above 0"


def _at_least_one(name: str) -> Callable[[Any], str | None]:
    return lambda value: None if value >= 1 else f"{name} must be at least 1"


# Values torch accepts at construction but that fail or freeze the run later (ConstantLR divides by
# `factor` at `total_iters`; a zero step or period divides by zero), keyed by class and argument.
LATE_FAILURES: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "ConstantLR": {"factor": _positive("factor"), "total_iters": _at_least_one("total_iters")},
    "LinearLR": {"start_factor": _positive("start_factor"), "total_iters": _at_least_one("total_iters")},
    "StepLR": {"step_size": _at_least_one("step_size"), "gamma": _positive("gamma")},
    "MultiStepLR": {"gamma": _positive("gamma")},
    "ExponentialLR": {"gamma": _positive("gamma")},
    "CosineAnnealingLR": {"T_max": _at_least_one("T_max")},
}


def check_scheduler_arguments(target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Refuse scheduler arguments that torch takes but that would fail or freeze the run later."""
    name = getattr(target, "__name__", "")
    for key, check in LATE_FAILURES.get(name, {}).items():
        if key in kwargs:
            problem = check(kwargs[key])
            if problem:
                raise ConfigError(f"scheduler.{key}={kwargs[key]!r}: {name} {problem}.")


def simulate_schedule(
    build_optimizer: Callable[[list[torch.Tensor]], Optimizer],
    build_scheduler: Callable[[Optimizer], LRScheduler],
    epochs: int,
) -> list[list[float]]:
    """Drive a copy of the schedule on a throw-away parameter through every epoch; return each epoch's LRs.

    Raises:
        ConfigError: when the schedule raises or produces a NaN, infinite or negative LR at some epoch.
    """
    optimizer = build_optimizer([torch.zeros(1, requires_grad=True)])
    scheduler = build_scheduler(optimizer)
    trajectory = []
    for epoch in range(epochs):
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for lr in lrs:
            if math.isnan(lr) or math.isinf(lr) or lr < 0:
                raise ConfigError(
                    f"the schedule gives lr={lr} at epoch {epoch}; check the scheduler settings."
                )
        trajectory.append(lrs)
        optimizer.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
        try:
            scheduler.step()
        except ConfigError:
            raise
        except (ArithmeticError, ValueError) as err:
            raise ConfigError(f"the schedule fails at epoch {epoch + 1}: {err}.") from None
    return trajectory
