"""Checkpoint writes and MLflow logging off the training thread, one epoch after another, in order.

At the end of an epoch the training thread takes a snapshot of the state (tensors copied, so training can go
on changing them) and hands the epoch to one background thread, which writes the checkpoint and only then
logs the epoch's metrics. So, as before, MLflow never holds an epoch that no checkpoint holds, and a restart
re-logs, never loses. An error there (a full disk, a lost tracking server) stops training at the next epoch
end, with the error of the background thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch

# Epochs waiting to be written at most: beyond that the training thread waits, so memory stays bounded when
# writes are slower than epochs.
MAX_PENDING = 2


def snapshot(value: Any) -> Any:
    """A copy of a state bundle that later training steps cannot change: tensors are copied to CPU memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: snapshot(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snapshot(item) for item in value]
    if isinstance(value, tuple):
        return tuple(snapshot(item) for item in value)
    return value  # numbers, strings, None: immutable


class Persister:
    """One background thread running submitted jobs in order; ``flush`` waits for them and re-raises a failure."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=MAX_PENDING)
        self._error: BaseException | None = None  # the failure not yet raised in the training thread
        self._failed = False  # after a failure, later jobs are skipped: no epoch is logged over a missing one
        self._thread = threading.Thread(target=self._work, name="runner-persist", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if not self._failed:
                    job()
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                self._error, self._failed = err, True
            finally:
                self._jobs.task_done()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise_failure()
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every submitted job has run; raise the first failure among them."""
        self._jobs.join()
        self._raise_failure()

    def close(self) -> None:
        """Finish the submitted jobs and stop the thread; raise the first failure among them."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise_failure()
