"""Scheduler pieces torch lacks: a LambdaLR driven by a safe expression string, and start-up checks.

torch's LambdaLR cannot save a plain Python lambda in its ``state_dict``; here the expression string is the
lambda's whole state, so the scheduler survives ``state_dict()``/``load_state_dict()``, pickling and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LambdaLR, LRScheduler, ReduceLROnPlateau, SequentialLR

from runner.errors import ConfigError
from runner.expr import RUN_NAMES, Expression, check_constants, compile_expression

log = logging.getLogger(__name__)


class ExpressionFactor:
    """The value of an expression string at one scheduler step, in terms of ``epoch`` and global ``step``.

    LambdaLR calls it with its step count: the epoch for a scheduler stepped per epoch, the global step for one
    stepped per batch (a pasted ``lambda x: ...`` gets that count as ``x``). The expression may also use the
    user's ``constants`` by name and, when the runner gives the run's length, ``epochs`` and ``total_steps`` (the
    run's optimizer steps, ``epochs * steps_per_epoch``). Only plain values live in ``__dict__``: that is what
    LambdaLR's ``state_dict`` stores; the checked, compiled form sits in a slot, which is neither saved nor
    pickled, and ExpressionLambdaLR drops it when a state is loaded.
    """

    __slots__ = ("__dict__", "_expression")

    def __init__(self, expression: str, steps_per_epoch: int = 1, stepped_per_batch: bool = False,
                 constants: dict[str, Any] | None = None, epochs: int | None = None):  # fmt: skip
        self.expression = expression
        self.steps_per_epoch = steps_per_epoch
        self.stepped_per_batch = stepped_per_batch
        self.constants = check_constants(constants or {}, (*EXPRESSION_VARIABLES, *RUN_NAMES), "scheduler.constants")
        self.epochs = epochs
        self._compiled()  # refuse a bad expression now, at start-up

    def _compiled(self) -> Expression:
        names = dict(self.constants)
        if self.epochs is not None:
            names.update(epochs=self.epochs, total_steps=self.epochs * self.steps_per_epoch)
        self._expression = compile_expression(
            self.expression, EXPRESSION_VARIABLES, "scheduler.lr_lambda", tuple(names.items()),
            "step" if self.stepped_per_batch else "epoch", "scheduler.constants",
        )  # fmt: skip
        return self._expression

    def forget_compiled(self) -> None:
        """Drop the compiled form, after ``__dict__`` changed behind our back (LambdaLR.load_state_dict)."""
        self._expression = None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._expression = None

    def __call__(self, count: int) -> float:
        expression = self._expression or self._compiled()
        if self.stepped_per_batch:
            return expression.evaluate({"epoch": count // self.steps_per_epoch, "step": count})
        return expression.evaluate({"epoch": count, "step": count * self.steps_per_epoch})


EXPRESSION_VARIABLES = ("epoch", "step")
LAMBDA_MODES = ("factor", "absolute")


class ExpressionLambdaLR(LambdaLR):
    """LambdaLR whose ``lr_lambda`` is an expression string in ``epoch`` and ``step``, e.g. ``"0.5 ** (epoch // 3)"``,
    or a pasted one-parameter lambda, e.g. ``"lambda epoch: 0.95 ** epoch"``.

    ``mode="factor"`` (default, torch's LambdaLR): the value multiplies the optimizer's base LR.
    ``mode="absolute"`` (Keras's LearningRateScheduler): the value is the LR itself, for every param group.
    ``constants``: more names for the expression, e.g. ``{"warmup": 500}``; saved with the expression.
    ``epochs`` (or ``total_steps``, the scheduler steps of the run, as the runner passes it) gives the expression
    the run's ``epochs`` and ``total_steps`` (its optimizer steps).
    """

    def __init__(self, optimizer: Optimizer, lr_lambda: str, mode: str = "factor",
                 constants: dict[str, Any] | None = None, steps_per_epoch: int = 1, stepped_per_batch: bool = False,
                 total_steps: int | None = None, epochs: int | None = None, last_epoch: int = -1):  # fmt: skip
        if mode not in LAMBDA_MODES:
            raise ConfigError(f"scheduler.mode={mode!r}: use factor (the value multiplies optimizer.lr, as torch's "
                              f"LambdaLR does) or absolute (the value is the lr, as Keras's LearningRateScheduler).")
        if epochs is None and total_steps is not None:  # the runner's total_steps counts scheduler steps
            epochs = total_steps // steps_per_epoch if stepped_per_batch else total_steps
        self.mode = mode
        factor = ExpressionFactor(lr_lambda, steps_per_epoch, stepped_per_batch, constants, epochs)
        super().__init__(optimizer, factor, last_epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for factor in self.lr_lambdas:
            if isinstance(factor, ExpressionFactor):
                factor.forget_compiled()
                factor(max(self.last_epoch, 0))  # refuse a bad saved expression now, not at the next step

    def get_lr(self) -> list[float]:
        if self.mode == "absolute":
            return [float(self.lr_lambdas[0](self.last_epoch)) for _ in self.base_lrs]
        return super().get_lr()


def warmup_cosine(optimizer: Optimizer, warmup: int, total_steps: int, start_factor: float = 0.1, eta_min: float = 0.0,
                  last_epoch: int = -1) -> SequentialLR:
    """Linear warm-up from ``start_factor`` x lr over ``warmup`` steps, then cosine decay to ``eta_min`` by the end.

    Steps are epochs, or batches with ``interval: step``; ``total_steps`` is filled in by the runner.
    """
    if not 0 < warmup < total_steps:
        raise ConfigError(f"scheduler.warmup={warmup}: the warm-up must be at least 1 step and shorter than the run "
                          f"({total_steps} scheduler steps).")
    return sequential(optimizer, [
        {"_target_": "torch.optim.lr_scheduler.LinearLR", "start_factor": start_factor, "end_factor": 1.0, "total_iters": warmup},
        {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": total_steps - warmup, "eta_min": eta_min},
    ], milestones=[warmup], last_epoch=last_epoch)


def sequential(optimizer: Optimizer, schedulers: list[Any], milestones: list[int], last_epoch: int = -1) -> SequentialLR:
    """torch's SequentialLR over configured schedulers: the first until milestones[0], the next until milestones[1]…"""
    if len(schedulers) != len(milestones) + 1:
        raise ConfigError(f"scheduler: {len(schedulers)} schedulers need {len(schedulers) - 1} milestones, not {len(milestones)}.")
    if list(milestones) != sorted(set(milestones)) or milestones[0] < 1:
        raise ConfigError(f"scheduler.milestones={list(milestones)}: milestones must be increasing and at least 1.")
    children = _build_children(optimizer, schedulers)
    return SequentialLR(optimizer, children, list(milestones), last_epoch=last_epoch)


def chained(optimizer: Optimizer, schedulers: list[Any]) -> ChainedScheduler:
    """torch's ChainedScheduler: every configured scheduler steps at once, their factors multiply."""
    return ChainedScheduler(_build_children(optimizer, schedulers), optimizer=optimizer)


def _build_children(optimizer: Optimizer, schedulers: list[Any]) -> list[LRScheduler]:
    from runner.build import build_node  # build imports this module

    if len(schedulers) < 1:
        raise ConfigError("scheduler.schedulers is empty; list the schedulers to compose, each with its _target_.")
    nodes = [OmegaConf.create(node) if not OmegaConf.is_config(node) else node for node in schedulers]
    return [build_node(f"scheduler.schedulers[{i}]", node, optimizer=optimizer) for i, node in enumerate(nodes)]


def check_lambda_mode(scheduler: LRScheduler, optimizer: Optimizer) -> None:
    """Warn when a factor expression starts at the optimizer's LR: the Keras-for-LambdaLR mistake, lr squared."""
    if not isinstance(scheduler, ExpressionLambdaLR) or scheduler.mode != "factor":
        return
    start = scheduler.lr_lambdas[0](0)
    base = scheduler.base_lrs[0]
    if base != 1 and math.isclose(start, base, rel_tol=1e-9):
        log.warning(
            f"scheduler.lr_lambda is {start:g} at epoch 0, the same as optimizer.lr: with mode=factor (torch's LambdaLR) "
            f"it MULTIPLIES the lr, so training starts at {base:g} x {start:g} = {base * start:g}. If the expression is "
            f"the learning rate itself (Keras's LearningRateScheduler), set scheduler.mode=absolute; if it is meant as "
            f"a factor, keep mode=factor."
        )


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
    "CosineAnnealingWarmRestarts": {"T_0": _at_least_one("T_0"), "T_mult": _at_least_one("T_mult")},
    "ReduceLROnPlateau": {"factor": lambda v: None if 0 < v < 1 else "factor must be between 0 and 1",
                          "patience": lambda v: None if v >= 0 else "patience must be at least 0"},
    "OneCycleLR": {"max_lr": _positive("max_lr"), "div_factor": _positive("div_factor"),
                   "final_div_factor": _positive("final_div_factor")},
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
    steps_per_epoch: int = 1,
    stepped_per_batch: bool = False,
    step_lrs: list[float] | None = None,
) -> list[list[float]]:
    """Drive a copy of the schedule on a throw-away parameter through the whole run; return each epoch's LRs
    (as at the start of the epoch).

    Stepped per batch, it steps ``epochs * steps_per_epoch`` times. ReduceLROnPlateau sees a metric that never
    improves, so the simulation covers its lowest LRs.

    Raises:
        ConfigError: when the schedule raises or gives a NaN, infinite or negative LR, naming the epoch and value.
    """
    optimizer = build_optimizer([torch.zeros(1, requires_grad=True)])
    scheduler = build_scheduler(optimizer)
    plateau = isinstance(scheduler, ReduceLROnPlateau)
    per_epoch_steps = steps_per_epoch if stepped_per_batch else 1
    trajectory = []
    for epoch in range(epochs):
        for substep in range(per_epoch_steps):
            where = f"epoch {epoch}" + (f" (step {epoch * steps_per_epoch + substep})" if stepped_per_batch else "")
            lrs = [float(group["lr"]) for group in optimizer.param_groups]
            for lr in lrs:
                if math.isnan(lr) or math.isinf(lr) or lr < 0:
                    raise ConfigError(f"the schedule gives lr={lr:.6g} at {where}; check the scheduler settings.")
            if substep == 0:
                trajectory.append(lrs)
            if step_lrs is not None:
                step_lrs.append(lrs[0])
            optimizer.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
            try:
                scheduler.step(0.0) if plateau else scheduler.step()
            except ConfigError:
                raise
            except (ArithmeticError, ValueError) as err:
                raise ConfigError(f"the schedule fails after {where}: {err}.") from None
    return trajectory
