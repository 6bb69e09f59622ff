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

from runner.data import DataSplits
from runner.errors import ConfigError, RunnerError
from runner.schedules import check_scheduler_arguments, simulate_schedule

# Arguments the runner passes itself, per group; the YAML must not set them.
RUNTIME_ARGUMENTS = {
    "data": ("seed",),
    "model": ("input_shape", "num_outputs"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "last_epoch"),
}


@dataclass
class Built:
    data: DataSplits
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def resolve_target(group: str, node: DictConfig) -> Callable[..., Any]:
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{group}._target_ is missing; name the class or function to build, e.g. torch.optim.SGD.")
    try:
        return get_object(target)
    except Exception:
        raise ConfigError(f"{group}._target_={target!r} cannot be imported; check the spelling and that its package is installed.") from None


def constructor_kwargs(node: DictConfig) -> dict[str, Any]:
    """The node's arguments as plain Python values, without Hydra's underscore keys."""
    values = OmegaConf.to_container(node, resolve=True)
    return {key: value for key, value in values.items() if not key.startswith("_")}


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
    runtime = RUNTIME_ARGUMENTS.get(group, ())
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


def _name(target: Callable[..., Any]) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}".lstrip(".")


def build_node(group: str, node: DictConfig, **runtime: Any) -> Any:
    """Check ``node`` against its target's signature, then instantiate it with the runtime arguments.

    Runtime arguments the target does not take are left out, so a user's own model class need not accept
    ``input_shape`` or ``num_outputs``.
    """
    target = resolve_target(group, node)
    check_arguments(group, target, constructor_kwargs(node))
    parameters = signature_parameters(target)
    if parameters is not None:
        runtime = {key: value for key, value in runtime.items() if key in parameters}
    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as err:
        if isinstance(err.__cause__, RunnerError):  # already a message for the user
            raise err.__cause__ from None
        raise ConfigError(f"{group}: {_name(target)} refused its arguments: {err.__cause__ or err}") from None


def build_everything(cfg: DictConfig, device: torch.device) -> Built:
    """Build data, model, optimizer and scheduler, and check the schedule over every epoch before training.

    The optimizer and scheduler are built (on a throw-away parameter) before the data is loaded, so their
    errors come at once.
    """
    scheduler_target = resolve_target("scheduler", cfg.scheduler)
    check_scheduler_arguments(scheduler_target, constructor_kwargs(cfg.scheduler))

    def make_optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return build_node("optimizer", cfg.optimizer, params=params)

    def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return build_node("scheduler", cfg.scheduler, optimizer=optimizer)

    simulate_schedule(make_optimizer, make_scheduler, cfg.trainer.epochs)  # a bad epoch fails here, not mid-run
    data: DataSplits = build_node("data", cfg.data, seed=cfg.trainer.seed)
    num_outputs = data.num_classes if data.is_classification else 1
    model = build_node("model", cfg.model, input_shape=data.input_shape, num_outputs=num_outputs).to(device)
    optimizer = make_optimizer(list(model.parameters()))
    return Built(data, model, optimizer, make_scheduler(optimizer))
