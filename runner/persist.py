"""MLflow off the training thread: opening it (seconds of imports and store set-up) and logging each epoch.

Jobs run in order on one background thread while training goes on. After an error there (a lost tracking server)
the later jobs are skipped, so nothing is logged over a gap, and training goes on; ``close`` raises the error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class Persister:
    """One background thread running submitted jobs in order; ``flush`` waits for them and re-raises a failure."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()  # small jobs: no bound needed
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
        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every submitted job has run; raise the first failure among them."""
        self._jobs.join()
        self._raise_failure()

    def close(self, timeout: float | None = None) -> None:
        """Finish the submitted jobs and stop the thread, waiting at most ``timeout`` seconds; raise the first
        failure among them, or TimeoutError when a job is still running then (the thread is a daemon: left behind).
        """
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._failed = True
                raise TimeoutError(f"no answer within {timeout:g} s")
        self._raise_failure()
