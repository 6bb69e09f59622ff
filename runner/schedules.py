"""Learning-rate schedules, built in one direction: config, then a plan checked over the whole run, then torch's class.

``plan_schedule`` reads a ``scheduler`` node (interval, monitor, warm-up) and refuses what torch would only fail
on later; ``check_schedule`` drives the planned schedule through every epoch and step on a throw-away
parameter; ``build_scheduler`` builds torch's own scheduler for the optimizer that trains, behind a linear
warm-up when ``scheduler.warmup`` asks for one (as timm offers for every schedule).

Also here, what torch lacks: a LambdaLR driven by a safe expression string. torch's LambdaLR cannot save a
plain Python lambda in its ``state_dict``; here the expression string is the lambda's whole state, so the
scheduler survives ``state_dict()``/``load_state_dict()``, pickling and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from runner.errors import ConfigError
from runner.expr import RUN_NAMES, Expression, check_constants, compile_expression
from runner.metrics import METRICS, RunMetrics, split_and_metric
from runner.targets import build_node, node_arguments, resolve_target

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

    def __init__(
        self,
        expression: str,
        steps_per_epoch: int = 1,
        stepped_per_batch: bool = False,
        constants: dict[str, Any] | None = None,
        epochs: int | None = None,
    ):
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
            self.expression,
            EXPRESSION_VARIABLES,
            "scheduler.lr_lambda",
            tuple(names.items()),
            "step" if self.stepped_per_batch else "epoch",
            "scheduler.constants",
        )
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

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: str,
        mode: str = "factor",
        constants: dict[str, Any] | None = None,
        steps_per_epoch: int = 1,
        stepped_per_batch: bool = False,
        total_steps: int | None = None,
        epochs: int | None = None,
        last_epoch: int = -1,
    ):
        if mode not in LAMBDA_MODES:
            raise ConfigError(
                f"scheduler.mode={mode!r}: use factor (the value multiplies optimizer.lr, as torch's "
                f"LambdaLR does) or absolute (the value is the lr, as Keras's LearningRateScheduler)."
            )
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


def sequential(
    optimizer: Optimizer, schedulers: list[Any], milestones: list[int], last_epoch: int = -1
) -> SequentialLR:
    """torch's SequentialLR over configured schedulers: the first until milestones[0], the next until milestones[1]…"""
    if len(schedulers) != len(milestones) + 1:
        raise ConfigError(
            f"scheduler: {len(schedulers)} schedulers need {len(schedulers) - 1} milestones, not {len(milestones)}."
        )
    if list(milestones) != sorted(set(milestones)) or milestones[0] < 1:
        raise ConfigError(f"scheduler.milestones={list(milestones)}: milestones must be increasing and at least 1.")
    children = _build_children(optimizer, schedulers)
    return SequentialLR(optimizer, children, list(milestones), last_epoch=last_epoch)


def chained(optimizer: Optimizer, schedulers: list[Any]) -> ChainedScheduler:
    """torch's ChainedScheduler: every configured scheduler steps at once, their factors multiply."""
    return ChainedScheduler(_build_children(optimizer, schedulers), optimizer=optimizer)


def _build_children(optimizer: Optimizer, schedulers: list[Any]) -> list[LRScheduler]:
    if len(schedulers) < 1:
        raise ConfigError("scheduler.schedulers is empty; list the schedulers to compose, each with its _target_.")
    nodes = [OmegaConf.create(node) if not OmegaConf.is_config(node) else node for node in schedulers]
    return [
        build_node(f"scheduler.schedulers[{i}]", node, reserved=RESERVED, optimizer=optimizer)
        for i, node in enumerate(nodes)
    ]


def check_lambda_mode(scheduler: LRScheduler) -> None:
    """Warn when a factor expression starts at the optimizer's LR: the Keras-for-LambdaLR mistake, lr squared."""
    if not isinstance(scheduler, ExpressionLambdaLR) or scheduler.mode != "factor":
        return
    start = scheduler.lr_lambdas[0](0)
    base = scheduler.base_lrs[0]
    if base != 1 and math.isclose(start, base, rel_tol=1e-9):
        log.warning(
            f"scheduler.lr_lambda is {start:g} at epoch 0, the same as optimizer.lr: with mode=factor (torch's "
            f"LambdaLR) it MULTIPLIES the lr, so training starts at {base:g} x {start:g} = {base * start:g}. If the "
            f"expression is the learning rate itself (Keras's LearningRateScheduler), set scheduler.mode=absolute; "
            f"if it is meant as a factor, keep mode=factor."
        )


# Keys of the scheduler node that the runner reads itself, with their defaults; the scheduler class never sees them.
SCHEDULER_SETTINGS = {"interval": "epoch", "monitor": "val_loss", "warmup": 0, "warmup_start_factor": 0.1}
INTERVALS = ("epoch", "step")
# Arguments the runner passes (or keeps at torch's default); the YAML must not set them.
RESERVED = ("optimizer", "last_epoch", "total_steps", "steps_per_epoch", "stepped_per_batch", "epochs")
# Arguments that are the schedule's length: left null in the YAML, the runner fills in the rest of the run after
# the warm-up, so the schedule follows trainer.epochs, the warm-up and interval=step.
RUN_LENGTH_ARGUMENTS = {CosineAnnealingLR: "T_max"}
# Schedulers that cannot follow a warm-up in torch's SequentialLR, and what to do instead.
NO_WARMUP = {
    ReduceLROnPlateau: "it steps on a metric, which SequentialLR cannot pass on",
    SequentialLR: "it is a composition already",
    ChainedScheduler: "it is a composition already",
    OneCycleLR: "it warms up by itself over pct_start of the run",
}


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
    "CosineAnnealingLR": {"T_max": lambda v: None if v is None or v >= 1 else "T_max must be at least 1"},
    "CosineAnnealingWarmRestarts": {"T_0": _at_least_one("T_0"), "T_mult": _at_least_one("T_mult")},
    "ReduceLROnPlateau": {
        "factor": lambda v: None if 0 < v < 1 else "factor must be between 0 and 1",
        "patience": lambda v: None if v >= 0 else "patience must be at least 0",
    },
    "OneCycleLR": {
        "max_lr": _positive("max_lr"),
        "div_factor": _positive("div_factor"),
        "final_div_factor": _positive("final_div_factor"),
    },
}


@dataclass(frozen=True)
class SchedulePlan:
    """A scheduler config read and checked: what to build, when it steps, on what metric, after what warm-up.

    Steps are epochs, or batches with ``interval=step``; ``warmup`` counts the same steps.
    """

    node: DictConfig
    target: Callable[..., Any]
    interval: str
    monitor: str | None  # ReduceLROnPlateau only
    warmup: int
    warmup_start_factor: float
    steps_per_epoch: int
    epochs: int

    @property
    def stepped_per_batch(self) -> bool:
        return self.interval == "step"

    @property
    def total_steps(self) -> int:
        """Scheduler steps in the whole run."""
        return self.epochs * (self.steps_per_epoch if self.stepped_per_batch else 1)

    @property
    def main_steps(self) -> int:
        """Scheduler steps after the warm-up: the length the configured scheduler is given."""
        return self.total_steps - self.warmup


def _setting(node: DictConfig, key: str) -> Any:
    value = node.get(key)
    return SCHEDULER_SETTINGS[key] if value is None else value


def plan_schedule(
    node: DictConfig, epochs: int, steps_per_epoch: int = 1, metrics: RunMetrics | None = None
) -> SchedulePlan:
    """Read and check a scheduler node: its interval, monitor and warm-up, and arguments that would fail later.

    ``metrics`` (once the data is known) are the metrics the run logs, which a plateau scheduler may watch.

    Raises:
        ConfigError: an unknown interval, a plateau scheduler stepped per batch or watching a metric that is not
            logged or in the wrong direction, a warm-up that does not fit, a value torch would fail on later.
    """
    interval = _setting(node, "interval")
    if interval not in INTERVALS:
        raise ConfigError(
            f"scheduler.interval={interval!r}: use epoch (step the scheduler once per epoch) or step (after every "
            f"batch)."
        )
    target = resolve_target("scheduler", node)
    arguments = node_arguments(node, SCHEDULER_SETTINGS)
    for key, check in LATE_FAILURES.get(getattr(target, "__name__", ""), {}).items():
        problem = check(arguments[key]) if key in arguments else None
        if problem:
            raise ConfigError(f"scheduler.{key}={arguments[key]!r}: {target.__name__} {problem}.")
    plateau = isinstance(target, type) and issubclass(target, ReduceLROnPlateau)
    monitor = _check_monitor(node, interval, metrics) if plateau else None
    if not plateau and "monitor" in node:
        raise ConfigError(
            f"scheduler.monitor is for ReduceLROnPlateau (scheduler=plateau); {target.__name__} steps without a metric."
        )
    plan = SchedulePlan(
        node,
        target,
        interval,
        monitor,
        int(_setting(node, "warmup")),
        float(_setting(node, "warmup_start_factor")),
        max(steps_per_epoch, 1),
        epochs,
    )
    _check_warmup(plan)
    return plan


def _check_monitor(node: DictConfig, interval: str, metrics: RunMetrics | None) -> str:
    monitor = _setting(node, "monitor")
    if interval == "step":
        raise ConfigError(
            "scheduler.interval=step: ReduceLROnPlateau steps on a validation metric, once per epoch; "
            "use scheduler.interval=epoch."
        )
    if metrics is not None and monitor not in metrics.logged():
        raise ConfigError(f"scheduler.monitor={monitor!r}: ReduceLROnPlateau can watch {', '.join(metrics.logged())}.")
    entry = metrics.find(monitor, "scheduler.monitor") if metrics else METRICS.get(split_and_metric(monitor)[1])
    better, mode = entry.mode if entry else None, node.get("mode", "min")
    if better is not None and mode != better:  # None: the user's own metric, checked once the metrics are built
        raise ConfigError(
            f"scheduler.monitor={monitor} with scheduler.mode={mode}: the LR would be cut while {monitor} improves; "
            f"set scheduler.mode={better}."
        )
    return monitor


def _check_warmup(plan: SchedulePlan) -> None:
    if plan.warmup == 0:
        return
    built = {sequential: SequentialLR, chained: ChainedScheduler}.get(plan.target, plan.target)
    why = next((why for kind, why in NO_WARMUP.items() if isinstance(built, type) and issubclass(built, kind)), None)
    if why is not None:
        raise ConfigError(
            f"scheduler.warmup={plan.warmup}: {built.__name__} cannot follow a warm-up ({why}); leave scheduler.warmup "
            f"at 0, or make a LinearLR warm-up the first of scheduler.schedulers (scheduler=sequential)."
        )
    if not 0 < plan.warmup < plan.total_steps:
        raise ConfigError(
            f"scheduler.warmup={plan.warmup}: the warm-up must be at least 1 step and shorter than the run "
            f"({plan.total_steps} scheduler steps)."
        )
    if not 0 < plan.warmup_start_factor <= 1:
        raise ConfigError(
            f"scheduler.warmup_start_factor={plan.warmup_start_factor}: the warm-up starts at this fraction of the "
            f"lr; use a value above 0 and at most 1."
        )


def build_scheduler(plan: SchedulePlan, optimizer: Optimizer) -> LRScheduler:
    """torch's scheduler for a plan: the configured class, after a linear warm-up when ``scheduler.warmup`` > 0."""
    warmup = LinearLR(optimizer, plan.warmup_start_factor, 1.0, plan.warmup) if plan.warmup else None
    runtime = {
        "optimizer": optimizer,
        "total_steps": plan.main_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "stepped_per_batch": plan.stepped_per_batch,
        "epochs": plan.epochs,
    }
    leave_out = set(SCHEDULER_SETTINGS)
    length = RUN_LENGTH_ARGUMENTS.get(plan.target)
    if length is not None and plan.node.get(length) is None:
        leave_out.add(length)
        runtime[length] = plan.main_steps
    scheduler = build_node("scheduler", plan.node, leave_out=leave_out, reserved=RESERVED, **runtime)
    if warmup is None:
        return scheduler
    return SequentialLR(optimizer, [warmup, scheduler], milestones=[plan.warmup])


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
    improves, so the simulation covers its lowest LRs. ``step_lrs`` gets group 0's LR at every scheduler step.

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


def check_schedule(
    plan: SchedulePlan,
    build_optimizer: Callable[[list[torch.Tensor]], Optimizer],
    step_lrs: list[float] | None = None,
) -> list[list[float]]:
    """Run the planned schedule through every epoch (and step) on a throw-away parameter; return the epoch LRs."""
    return simulate_schedule(
        build_optimizer,
        lambda optimizer: build_scheduler(plan, optimizer),
        plan.epochs,
        plan.steps_per_epoch,
        plan.stepped_per_batch,
        step_lrs,
    )
