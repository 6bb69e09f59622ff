"""The loss, from the ``loss`` config group: torch's own loss classes, or a user's module or function.

``loss=auto`` (the default) follows the data: cross-entropy for classification, mean squared error for
regression. Any ``_target_`` works: a class is built with the node's arguments (an ``nn.Module`` such as
``torch.nn.HuberLoss``), a function of ``(outputs, targets)`` is the loss itself. Before any training, one batch
goes through the model and the loss, so a model whose outputs do not fit the loss and targets is refused in one
line naming both shapes.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from runner.errors import ConfigError, UserCodeError, is_users_code
from runner.targets import build_node, node_arguments, qualified_name, resolve_target

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def auto(task: str) -> nn.Module:
    """Cross-entropy for classification, mean squared error for regression: what the data's task calls for."""
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def cross_entropy(label_smoothing: float = 0.0, weight: list[float] | None = None) -> nn.CrossEntropyLoss:
    """torch's CrossEntropyLoss, with class weights given as a plain list in the YAML."""
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing={label_smoothing}: use a value from 0 (none) up to, not including, 1.")
    return nn.CrossEntropyLoss(
        weight=torch.tensor(weight, dtype=torch.float32) if weight else None, label_smoothing=label_smoothing
    )


def _is_the_loss_itself(target: Callable[..., Any], arguments: dict[str, Any]) -> bool:
    """A plain function of (outputs, targets), given no arguments, is the loss itself rather than a factory."""
    if inspect.isclass(target) or arguments:
        return False
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) >= 2


def build_loss(node: DictConfig, task: str) -> Loss:
    """The configured loss; ``task`` (classification or regression) is passed to factories that take it."""
    target = resolve_target("loss", node)
    if _is_the_loss_itself(target, node_arguments(node)):
        return target
    loss = build_node("loss", node, task=task)
    if not callable(loss):
        raise ConfigError(
            f"loss._target_={node._target_}: built a {type(loss).__name__}, which is not callable; "
            f"give an nn.Module or a function of (outputs, targets)."
        )
    if isinstance(weight := getattr(loss, "weight", None), torch.Tensor) and isinstance(loss, nn.Module):
        loss.register_buffer("weight", weight)  # moves to the device with .to()
    return loss


def loss_name(loss: Loss) -> str:
    """A function's own dotted name, or a loss module's class's."""
    return qualified_name(loss if inspect.isfunction(loss) else type(loss))


def check_loss_fits(loss: Loss, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """One forward pass on one batch and the loss on it, before training: a scalar comes out, or one line names
    the shapes (an error inside the user's own loss keeps its traceback).

    Raises:
        ConfigError: the outputs do not fit the loss and targets.
        UserCodeError: the user's own loss raised.
    """
    training = model.training
    model.eval()  # no BatchNorm statistics updated, no dropout drawn: the check leaves the run as it was
    with torch.no_grad():
        try:
            outputs = model(inputs).float()
        except Exception as err:  # noqa: BLE001
            where = f"a batch of inputs of shape {tuple(inputs.shape)}"
            if is_users_code(model):
                raise UserCodeError(
                    f"model ({type(model).__name__}) raised on {where}: {type(err).__name__}: {err}"
                ) from err
            raise ConfigError(
                f"model ({type(model).__name__}) does not take {where}: {str(err).splitlines()[0]}."
            ) from None
        try:
            with warnings.catch_warnings():
                # torch's MSE/L1/Huber broadcast (N, 1) against (N,) with only a warning: a silently wrong loss.
                warnings.filterwarnings("error", message=".*target size .* is different to the input size")
                value = loss(outputs, targets)
        except Exception as err:  # noqa: BLE001 - any failure here is a misfit, or the user's own bug
            where = f"the model's outputs of shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}"
            if is_users_code(loss):
                raise UserCodeError(f"loss ({loss_name(loss)}) raised on {where}: {type(err).__name__}: {err}") from err
            raise ConfigError(
                f"loss ({loss_name(loss)}) does not fit {where} ({str(err).splitlines()[0]}); pick a loss for this "
                f"data (loss=cross_entropy for class labels, mse/l1/huber for numbers, bce_with_logits for 0/1 "
                f"labels) or a model with as many outputs as the loss needs."
            ) from None
    model.train(training)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"loss ({loss_name(loss)}) gave {shape}, not one number; reduce it (mean or sum) to a scalar."
        )
