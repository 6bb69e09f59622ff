"""Build one ``_target_`` config node, checked against its constructor's signature first.

A misspelled or foreign argument (``+optimizer.mu=0.9`` for ASGD) fails at start-up with one line naming the
class, the bad keys and the valid ones. Runtime objects (the model's parameters, the optimizer) are passed in
by the caller, so the YAML holds only hyper-parameters. This module knows no config group in particular: the
groups' own modules (:mod:`runner.build`, :mod:`runner.schedules`) say which arguments the runner fills in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError, RunnerError, is_users_code, users_failures


def resolve_target(group: str, node: DictConfig) -> Callable[..., Any]:
    """The class or function a node names.

    Raises:
        ConfigError: no ``_target_``, or one that cannot be imported.
    """
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{group}._target_ is missing; name the class or function to build, e.g. torch.optim.SGD.")
    try:
        return get_object(target)
    except Exception:
        raise ConfigError(
            f"{group}._target_={target!r} cannot be imported; check the spelling and that its package is installed."
        ) from None


def node_arguments(node: DictConfig, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """The node's arguments as plain Python values, without Hydra's underscore keys and the keys in ``leave_out``."""
    values = OmegaConf.to_container(node, resolve=True)
    return {key: value for key, value in values.items() if not key.startswith("_") and key not in leave_out}


def signature_parameters(target: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The target's parameters, or None where there is nothing to check against (``**kwargs``, builtins)."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return dict(parameters)


def qualified_name(target: Callable[..., Any]) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}".lstrip(".")


def check_arguments(
    group: str, target: Callable[..., Any], kwargs: dict[str, Any], runtime: Collection[str] = ()
) -> None:
    """Refuse unknown arguments, arguments the runner sets (``runtime``) and missing required ones, in one message.

    Raises:
        ConfigError: naming the class, the bad keys and the valid ones.
    """
    parameters = signature_parameters(target)
    if parameters is None:
        return
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
        raise ConfigError(
            f"{group} ({qualified_name(target)}): {'; '.join(problems)}. Valid arguments: {', '.join(accepted)}."
        )


def build_node(
    group: str, node: DictConfig, leave_out: Collection[str] = (), reserved: Collection[str] = (), **runtime: Any
) -> Any:
    """Check ``node`` against its target's signature, then instantiate it with the runtime arguments.

    ``leave_out`` names keys of the node that the runner reads itself and the target never sees; ``reserved``
    names arguments the YAML may not set (those passed here, and others the target must keep at their
    default, such as a scheduler's ``last_epoch``). Runtime arguments the target does not take are not passed,
    so a user's own model class need not accept ``input_shape`` or ``num_outputs``.
    """
    target = resolve_target(group, node)
    kwargs = node_arguments(node, leave_out)
    check_arguments(group, target, kwargs, runtime={*reserved, *runtime})
    parameters = signature_parameters(target)
    if parameters is not None:
        runtime = {key: value for key, value in runtime.items() if key in parameters}
    if leave_out:
        plain = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({key: value for key, value in plain.items() if key not in leave_out})
    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, RunnerError):  # already a message for the user
            raise cause from None
        if cause is not None and not isinstance(cause, TypeError) and is_users_code(target):
            # Not its arguments: the user's own function or constructor failed, and its frames are theirs to see.
            with users_failures(target, f"{group}: {qualified_name(target)}"):
                raise cause from None
        raise ConfigError(f"{group}: {qualified_name(target)} refused its arguments: {cause or err}") from None
