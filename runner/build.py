"""Build data, model, optimizer and scheduler from their ``_target_`` config nodes.

Every node is checked against its constructor's signature first, so a misspelled or foreign argument
(``+optimizer.mu=0.9`` for ASGD) fails at start-up with one line naming the class, the bad keys and the valid
ones. Runtime objects (the model's parameters, the optimizer) are passed in here, so the YAML holds only
hyper-parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import ReduceLROnPlateau

from runner.data import DataSplits, steps_per_epoch
from runner.errors import ConfigError, RunnerError
from runner.schedules import check_lambda_mode, check_scheduler_arguments, simulate_schedule

# Arguments the runner passes itself, per group; the YAML must not set them.
RUNTIME_ARGUMENTS = {
    "data": ("seed",),
    "model": ("input_shape", "num_outputs"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "last_epoch", "total_steps", "steps_per_epoch", "stepped_per_batch", "epochs"),
}
# Keys of the scheduler node that the runner reads and the scheduler class never sees.
SCHEDULER_SETTINGS = {"interval": "epoch", "monitor": "val_loss"}
INTERVALS = ("epoch", "step")


@dataclass
class Built:
    data: DataSplits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: SchedulePlan


@dataclass
class SchedulePlan:
    """When the scheduler steps and on what: once per epoch or per batch, and the metric ReduceLROnPlateau watches."""

    interval: str
    monitor: str | None  # ReduceLROnPlateau only
    steps_per_epoch: int
    epochs: int

    @property
    def stepped_per_batch(self) -> bool:
        return self.interval == "step"

    @property
    def total_steps(self) -> int:
        return self.epochs * (self.steps_per_epoch if self.stepped_per_batch else 1)

    def runtime(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"optimizer": optimizer, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "stepped_per_batch": self.stepped_per_batch}


def resolve_target(group: str, node: DictConfig) -> Callable[..., Any]:
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{group}._target_ is missing; name the class or function to build, e.g. torch.optim.SGD.")
    try:
        return get_object(target)
    except Exception:
        raise ConfigError(f"{group}._target_={target!r} cannot be imported; check the spelling and that its package is installed.") from None


def constructor_kwargs(node: DictConfig, group: str = "") -> dict[str, Any]:
    """The node's arguments as plain Python values, without Hydra's underscore keys (or the runner's scheduler keys)."""
    values = OmegaConf.to_container(node, resolve=True)
    skipped = SCHEDULER_SETTINGS if group == "scheduler" else {}
    return {key: value for key, value in values.items() if not key.startswith("_") and key not in skipped}


def signature_parameters(target: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The target's parameters, or None where there is nothing to check against (``**kwargs``, builtins)."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return dict(parameters)


def check_arguments(group: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Refuse unknown, runtime-only and missing required arguments, all in one message.

    Raises:
        ConfigError: naming the class, the bad keys and the valid ones.
    """
    parameters = signature_parameters(target)
    if parameters is None:
        return
    runtime = RUNTIME_ARGUMENTS.get(_root(group), ())
    accepted = [name for name, p in parameters.items() if p.kind is not p.VAR_POSITIONAL and name not in runtime]
    problems = []
    unknown = sorted(set(kwargs) - set(accepted) - set(runtime))
    if unknown:
        problems.append(f"unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    forbidden = sorted(set(kwargs) & set(runtime))
    if forbidden:
        problems.append(f"{', '.join(forbidden)} {'is' if len(forbidden) == 1 else 'are'} set by the runner")
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and name not in runtime
        and name not in kwargs
    ]
    if missing:
        problems.append(f"missing required {', '.join(missing)}")
    if problems:
        raise ConfigError(f"{group} ({_name(target)}): {'; '.join(problems)}. Valid arguments: {', '.join(accepted)}.")


def _root(group: str) -> str:
    """``scheduler.schedulers[0]`` (a composed scheduler's part) -> ``scheduler``."""
    return group.split(".", 1)[0]


def _name(target: Callable[..., Any]) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}".lstrip(".")


def build_node(group: str, node: DictConfig, **runtime: Any) -> Any:
    """Check ``node`` against its target's signature, then instantiate it with the runtime arguments.

    Runtime arguments the target does not take are left out, so a user's own model class need not accept
    ``input_shape`` or ``num_outputs``.
    """
    target = resolve_target(group, node)
    kwargs = constructor_kwargs(node, _root(group))
    check_arguments(group, target, kwargs)
    parameters = signature_parameters(target)
    if parameters is not None:
        runtime = {key: value for key, value in runtime.items() if key in parameters}
    if _root(group) == "scheduler":  # without the runner's own keys (interval, monitor)
        node = OmegaConf.create({key: value for key, value in OmegaConf.to_container(node, resolve=True).items()
                                 if key not in SCHEDULER_SETTINGS})
    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as err:
        if isinstance(err.__cause__, RunnerError):  # already a message for the user
            raise err.__cause__ from None
        raise ConfigError(f"{group}: {_name(target)} refused its arguments: {err.__cause__ or err}") from None


def schedule_plan(cfg: DictConfig, steps_per_epoch: int, classification: bool = True) -> SchedulePlan:
    """Read and check the scheduler's ``interval`` and ``monitor``.

    Raises:
        ConfigError: an unknown interval, a plateau scheduler stepped per batch, or a metric that is not logged.
    """
    interval = cfg.scheduler.get("interval", SCHEDULER_SETTINGS["interval"])
    if interval not in INTERVALS:
        raise ConfigError(f"scheduler.interval={interval!r}: use epoch (step the scheduler once per epoch) or step (after every batch).")
    target = resolve_target("scheduler", cfg.scheduler)
    monitor = None
    if isinstance(target, type) and issubclass(target, ReduceLROnPlateau):
        monitor = cfg.scheduler.get("monitor", SCHEDULER_SETTINGS["monitor"])
        metrics = ["train_loss", "val_loss", *(["val_accuracy"] if classification else [])]
        if monitor not in metrics:
            raise ConfigError(f"scheduler.monitor={monitor!r}: ReduceLROnPlateau can watch {', '.join(metrics)}.")
        mode = cfg.scheduler.get("mode", "min")
        if (mode == "max") != monitor.endswith("accuracy"):
            better = "max" if monitor.endswith("accuracy") else "min"
            raise ConfigError(f"scheduler.monitor={monitor} with scheduler.mode={mode}: the LR would be cut while "
                              f"{monitor} improves; set scheduler.mode={better}.")
        if interval == "step":
            raise ConfigError("scheduler.interval=step: ReduceLROnPlateau steps on a validation metric, once per epoch; "
                              "use scheduler.interval=epoch.")
    elif "monitor" in cfg.scheduler:
        raise ConfigError(f"scheduler.monitor is for ReduceLROnPlateau (scheduler=plateau); {target.__name__} steps without a metric.")
    return SchedulePlan(interval, monitor, max(steps_per_epoch, 1), cfg.trainer.epochs)


def build_schedule(cfg: DictConfig, plan: SchedulePlan):
    """(make_optimizer, make_scheduler) for this config, the scheduler told how often it steps."""

    def make_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_node("optimizer", cfg.optimizer, params=params)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return build_node("scheduler", cfg.scheduler, **plan.runtime(optimizer))

    return make_optimizer, make_scheduler


def check_schedule(cfg: DictConfig, plan: SchedulePlan, step_lrs: list[float] | None = None) -> list[list[float]]:
    """Build the optimizer and scheduler on a throw-away parameter and run the whole schedule; return epoch LRs
    (and append group 0's LR at every scheduler step to ``step_lrs``). ``check_before_data`` comes first."""
    make_optimizer, make_scheduler = build_schedule(cfg, plan)
    return simulate_schedule(make_optimizer, make_scheduler, plan.epochs, plan.steps_per_epoch, plan.stepped_per_batch, step_lrs)


def check_before_data(cfg: DictConfig) -> None:
    """What can be refused before the data loads: the optimizer, and the scheduler's settings and arguments."""
    schedule_plan(cfg, steps_per_epoch=1)
    target = resolve_target("scheduler", cfg.scheduler)
    kwargs = constructor_kwargs(cfg.scheduler, "scheduler")
    check_scheduler_arguments(target, kwargs)
    check_arguments("scheduler", target, kwargs)
    build_node("optimizer", cfg.optimizer, params=[torch.zeros(1, requires_grad=True)])


def build_everything(cfg: DictConfig, device: torch.device, world_size: int = 1) -> Built:
    """Build data, model, optimizer and scheduler, and run the schedule through every epoch (and step) first.

    Optimizer and scheduler settings are checked before the data loads, so their errors come at once; the
    schedule is simulated once the data gives the number of steps per epoch, before any training.
    """
    check_before_data(cfg)
    data: DataSplits = build_node("data", cfg.data, seed=cfg.trainer.seed)
    plan = schedule_plan(cfg, steps_per_epoch(len(data.train), cfg.trainer.batch_size, world_size), data.is_classification)
    check_schedule(cfg, plan)  # a NaN, negative or failing LR at some epoch fails here, not mid-run
    num_outputs = data.num_classes if data.is_classification else 1
    model = build_node("model", cfg.model, input_shape=data.input_shape, num_outputs=num_outputs).to(device)
    make_optimizer, make_scheduler = build_schedule(cfg, plan)
    optimizer = make_optimizer(list(model.parameters()))
    scheduler = make_scheduler(optimizer)
    check_lambda_mode(scheduler, optimizer)
    return Built(data, model, optimizer, scheduler, plan)
