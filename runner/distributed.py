"""Data-parallel training over the processes torchrun starts: the process group, who writes, agreeing to stop.

``torchrun --nproc_per_node=N -m runner trainer.strategy=ddp`` starts N processes (ranks); each trains on its
shard of every batch and DistributedDataParallel averages their gradients. ``trainer.batch_size`` stays the
global batch, so a config means the same run on 1 or N devices. Rank 0 decides what a launch continues, writes
every checkpoint and logs to MLflow; the others follow its decisions through the process group.

A single process gets a ``Distributed`` of one rank whose collectives do nothing, so the run reads the same.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from runner.config import torchrun_world_size
from runner.device import select_device
from runner.errors import ConfigError, ReportedByRankZero, RunnerError
from runner.signals import StopFlag

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often the ranks share their stop flags: a collective costs about 0.3 ms between two CPU processes, so
# they check every few steps, as many as take about this long; a stop then waits at most that long.
STOP_CHECK_SECONDS = 0.2


@dataclass
class Distributed:
    """This process's place among the ranks, and the few collectives the run needs."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: str | None = None  # None: one process, no process group
    control: Any = None  # a Gloo group for small CPU-side messages when the gradients go through NCCL
    raised_together: bool = False  # every rank raised rank 0's error at the same ``share``: they can leave together

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, batch_size: int, accumulate: int = 1) -> str:
        """How the processes share a step's samples, and how many batches each step sums."""
        summed = f"{accumulate} batches of {batch_size} per step, {accumulate * batch_size} samples"
        if not self.enabled:
            return f" ({summed})" if accumulate > 1 else ""
        processes = f"{self.world_size} process" + ("es" if self.world_size > 1 else "")
        per_process = batch_size // self.world_size
        if accumulate > 1:
            return f" (DDP over {processes}, {self.backend}; {per_process} samples per process per batch, {summed})"
        return (
            f" (DDP over {processes}, {self.backend}; {per_process} samples per process per step, {batch_size} in all)"
        )

    def share(self, compute: Callable[[], T]) -> T:
        """Rank 0 computes the value and every rank gets it; a RunnerError there is raised on every rank."""
        if not self.enabled:
            return compute()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = (True, compute())
            except RunnerError as err:
                payload[0] = (False, err)
        dist.broadcast_object_list(payload, src=0, group=self.control)
        ok, value = payload[0]
        if not ok:
            self.raised_together = True
            raise value if self.is_main else ReportedByRankZero(value)
        return value

    def gather(self, value: T) -> list[T] | None:
        """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.control)
        return gathered

    def sum(self, values: list[float | torch.Tensor]) -> list[float]:
        """Each value summed over the ranks, in float64 (loss sums, sample counts)."""
        if not self.enabled:
            return [float(v) for v in values]
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        summed = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
        dist.all_reduce(summed)
        return summed.tolist()

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), so all evaluate the model that is checkpointed."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self) -> None:
        """Leave the process group together, once every rank is done (rank 0 finishes writing last).

        Once in CI a rank that left first, while rank 0 still wrote, aborted in Gloo's teardown ("terminate called
        without an active exception"); leaving together, the DDP wrapper collected first, is torch's own advice.
        """
        if self.enabled and dist.is_initialized():
            self.barrier()
            gc.collect()  # the DDP wrapper and its pending Gloo work go while the group is still there
            dist.destroy_process_group()


def adopt_submitit_tasks() -> None:
    """A job of the submitit launcher (``hydra/launcher=slurm``) with several tasks: give each task the env://
    variables torchrun would, from submitit's own description of the job (SLURM's, or its local executor's)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or torchrun_world_size() is not None:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        tasks = TorchDistributedEnvironment()
        tasks.export(set_cuda_visible_devices=False)  # each rank takes cuda:LOCAL_RANK itself
        if tasks.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # What torchrun does for several workers on one node: else each task takes every core, they compete,
            # and a SLURM job's floating-point sums come out other than torchrun's ranks' on the same config.
            os.environ["OMP_NUM_THREADS"] = "1"
            torch.set_num_threads(1)


def start_distributed(trainer: Any) -> Distributed:
    """Join the process group torchrun set up when the strategy asks for DDP; otherwise one process.

    ``check_settings`` has already refused a strategy that does not fit the environment.

    Raises:
        ConfigError: NCCL without CUDA, or a device setting that cannot be split over the ranks.
        RunnerError: this rank's GPU does not exist (too many processes per node).
    """
    if torchrun_world_size() is None or trainer.strategy == "single":
        return Distributed(select_device(trainer.device))
    rank, world_size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = _rank_device(str(trainer.device), local_rank)
    backend = trainer.backend if trainer.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        why = "CUDA is not available here" if not torch.cuda.is_available() else "trainer.device=cpu"
        raise ConfigError(
            f"trainer.backend=nccl needs CUDA, but {why}; use trainer.backend=gloo (or auto, which takes gloo on the "
            f"CPU)."
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        store=_attempt_store(),
        rank=rank,
        world_size=world_size,
        device_id=device if backend == "nccl" else None,
    )
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the run's story, from rank 0
    return Distributed(device, rank, world_size, backend, control)


def _attempt_store() -> dist.Store:
    """torchrun's rendezvous store, its keys scoped to this restart attempt.

    torchrun keeps one store for all attempts of ``--max-restarts``; without a prefix the restarted workers read
    the dead workers' addresses from it and fail (Gloo: "connectFullMesh failed ... Connection refused") or
    hang. Scoping a shared store with a PrefixStore is what torch's own elastic code asks of its users.
    """
    store, _, _ = next(dist.rendezvous("env://"))
    return dist.PrefixStore(f"runner/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _rank_device(name: str, local_rank: int) -> torch.device:
    """Each rank trains on ``cuda:LOCAL_RANK`` (or the CPU)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "mps":
        raise ConfigError("trainer.strategy=ddp does not run on MPS; use trainer.device=cpu.")
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f"trainer.device={name}: under DDP each process takes cuda:LOCAL_RANK; use trainer.device=cuda (or auto)."
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but CUDA is not available here; use trainer.device=cpu (DDP over Gloo) or auto."
        )
    if local_rank >= torch.cuda.device_count():
        raise RunnerError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
            f"start at most that many processes per node (torchrun --nproc_per_node)."
        )
    return torch.device("cuda", local_rank)


class AgreedStop:
    """A stop signal on any rank stops every rank after the same step.

    Each rank calls this after every step and every epoch, as the loop calls a ``StopFlag``; every ``interval``
    steps and at every epoch's end the ranks share their flags in one small all-reduce (the maximum signal
    number, and rank 0's choice of the next interval, sized to about STOP_CHECK_SECONDS of steps). All ranks
    make the same calls, so they agree.
    """

    def __init__(self, flag: StopFlag, ranks: Distributed):
        self.flag, self.ranks = flag, ranks
        self.interval, self.countdown = 1, 1
        self.last_check = time.monotonic()
        self.agreed = 0  # the signal number every rank stops for

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.agreed).name if self.agreed else None

    def hand_over(self) -> None:
        self.flag.hand_over()  # only on the rank whose signal it was

    def __call__(self, global_step: int, epoch_end: bool = False) -> bool:
        self.flag(global_step, epoch_end=epoch_end)
        if self.agreed:
            return True
        self.countdown -= 1
        if self.countdown > 0 and not epoch_end:
            return False
        now = time.monotonic()
        proposal = 0
        if self.ranks.is_main:
            per_step = max(now - self.last_check, 1e-6) / self.interval
            proposal = max(1, min(2 * self.interval, 1000, int(STOP_CHECK_SECONDS / per_step)))
        shared = torch.tensor([self.flag.signum or 0, proposal], dtype=torch.int64)
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=self.ranks.control)
        self.agreed, self.interval = int(shared[0]), int(shared[1])
        self.countdown, self.last_check = self.interval, now
        return bool(self.agreed)
