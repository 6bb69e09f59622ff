"""Training state as parts that save and load themselves; a checkpoint is the collection of their ``state_dict()``s.

Each part (model, optimizer, scheduler, progress, RNG streams, metric history, ...) is registered once, by name,
where the run assembles it, in the manner of torch.distributed.checkpoint's ``Stateful`` and torchtitan's
checkpoint manager: adding a part to the checkpoint is one ``register`` line, and loading gives every part back
its own entry. Everything a part returns is tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from runner.errors import CheckpointError

log = logging.getLogger(__name__)

# Top-level keys of a checkpoint that describe it rather than hold a part's state (see runner.checkpoint).
CHECKPOINT_KEYS = ("format", "fingerprint", "config", "finished", "torch_version", "runner_version")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


class TrainingState:
    """The named parts a checkpoint holds."""

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}
        self._optional: set[str] = set()

    def register(self, name: str, part: Stateful, optional: bool = False) -> None:
        """Add a part; ``optional`` parts may be absent from a checkpoint (a GradScaler added by a forced resume)."""
        if name in self._parts or name in CHECKPOINT_KEYS:
            raise ValueError(f"a checkpoint part named {name!r} exists already")
        self._parts[name] = part
        if optional:
            self._optional.add(name)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state. Under DDP every rank calls this: the RNG streams part gathers from all ranks."""
        return {name: part.state_dict() for name, part in self._parts.items()}

    def load_state_dict(self, state: dict[str, Any], leave_out: tuple[str, ...] = ()) -> None:
        """Give every part (but those in ``leave_out``) its entry of ``state``.

        Raises:
            CheckpointError: a part is missing or does not fit (another model, optimizer or scheduler).
        """
        for name, part in self._parts.items():
            if name in leave_out or (name in self._optional and name not in state):
                continue
            if name not in state:
                raise CheckpointError(f"holds no {name}; it was not written by this config's run")
            try:
                part.load_state_dict(state[name])
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                raise CheckpointError(f"does not fit this config's {name}: {str(err).splitlines()[0]}") from None


@dataclass
class History:
    """The metrics of every finished epoch, and the per-step LRs recorded in them (``tracking.log_every_n_steps``)."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    lr_steps: dict[int, float] = field(default_factory=dict)

    def record(self, metrics: dict[str, float], lr_steps: dict[int, float]) -> None:
        self.epochs.append(metrics)
        self.lr_steps.update(lr_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs), "lr_steps": dict(self.lr_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs, self.lr_steps = list(state["epochs"]), dict(state["lr_steps"])


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Python's, NumPy's and torch's CPU RNG state, and the training GPU's, as tensors and plain values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
        "torch": torch.get_rng_state(),
        # Only this process's GPU: under DDP each rank has its own, and touching the others would start CUDA on them.
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["position"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class RankStreams:
    """What differs between the DDP ranks: each one's RNG streams and running loss of the epoch in progress.

    ``state_dict`` gathers every rank's (a collective: every rank calls it; rank 0 gets the list). A run
    continued on another number of processes gives rank 0 the epoch's whole running loss and every rank rank
    0's RNG streams: the data order is the same (a function of seed and epoch), the floating-point sums may
    differ from an uninterrupted run.
    """

    def __init__(self, progress: Any, ranks: Any, loop: Any):
        # runner.train.Progress, runner.distributed.Distributed, runner.train.Loop
        self.progress, self.ranks, self.loop = progress, ranks, loop

    def state_dict(self) -> dict[str, Any]:
        progress = self.progress
        loss_sum = progress.loss_sum.detach().cpu() if progress.loss_sum is not None else None
        mine = {"rng": capture_rng_state(self.ranks.device), "loss_sum": loss_sum, "samples": progress.samples}
        if self.loop.accumulating(progress.batch):  # a stop between the batches of one step (each rank's own sums)
            mine["gradients"] = [None if p.grad is None else p.grad.detach().cpu() for p in self._parameters()]
        return {"ranks": self.ranks.gather(mine)}

    def _parameters(self) -> list[torch.nn.Parameter]:
        return list(self.loop.model.parameters())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, ranks, progress = state["ranks"], self.ranks, self.progress
        if len(saved) == ranks.world_size:
            mine = saved[ranks.rank]
            loss_sum, samples = mine["loss_sum"], mine["samples"]
        else:
            if ranks.is_main:
                log.warning(
                    f"the checkpoint was written by {len(saved)} process(es), this launch has {ranks.world_size}: "
                    f"same data order, floating-point sums may differ from an uninterrupted run."
                )
            mine = saved[0]
            loss_sum = sum((r["loss_sum"] for r in saved[1:]), saved[0]["loss_sum"]) if ranks.is_main else None
            samples = sum(r["samples"] for r in saved) if ranks.is_main else 0
            if loss_sum is None and saved[0]["loss_sum"] is not None:
                loss_sum = torch.zeros_like(saved[0]["loss_sum"])
        progress.loss_sum = loss_sum.to(ranks.device) if loss_sum is not None else None
        progress.samples = samples
        restore_rng_state(mine["rng"], ranks.device)
        if "gradients" in saved[0]:
            self._restore_gradients(mine["gradients"] if len(saved) == ranks.world_size else _mean(saved))

    def _restore_gradients(self, gradients: list[torch.Tensor | None]) -> None:
        """The gradients summed for the step in progress, so the rest of its batches add to them."""
        parameters = self._parameters()
        if len(gradients) != len(parameters):
            raise ValueError(f"it holds gradients of {len(gradients)} parameters, the model has {len(parameters)}")
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = None if gradient is None else gradient.to(parameter.device, parameter.dtype)


def _mean(saved: list[dict[str, Any]]) -> list[torch.Tensor | None]:
    """Each parameter's gradient averaged over the ranks that wrote them: DDP averages at the step, so every rank of
    another number of processes starting from the mean ends the step with the same gradients."""
    columns = zip(*(rank["gradients"] for rank in saved), strict=True)
    return [None if grads[0] is None else torch.stack(list(grads)).mean(0) for grads in columns]
