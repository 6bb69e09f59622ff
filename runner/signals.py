"""Stop signals: the handler only sets a flag; the training loop checks it at each step boundary.

SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (what SLURM, submitit and most schedulers send before a kill or at the
time limit) ask for a stop: the loop finishes its optimizer step, the run writes a checkpoint, marks the MLflow
run KILLED and exits with ``EXIT_STOPPED``, so a requeue of the same command resumes. Saving inside the handler
would run arbitrary code at an arbitrary point of the step; other tools that do so hang. A second Ctrl-C exits at
once.

Once the checkpoint is written, the signal is handed to the handler it displaced, if that was Python code: under
submitit that is its requeue handler, so a job at its time limit is checkpointed by the runner, then requeued.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

from runner.errors import EXIT_STOPPED

log = logging.getLogger(__name__)

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "StopFlag"]
EXIT_INTERRUPTED_TWICE = 130
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

# Fault injection for the resume tests: "SIGNAME:STEP" makes the process send itself that real signal right
# after global step STEP, so a test can interrupt mid-epoch at an exact point; "SIGNAME:STEP+B" B batches later,
# in the middle of the next step's gradient accumulation; "SIGNAME:STEP:RANK" only the DDP rank RANK, and only in
# torchrun's first attempt (a restart must get past that step).
FAULT_AT_STEP_ENV = "RUNNER_FAULT_AT_STEP"
# For the cluster tests: sleep this many seconds after every batch, so that a tiny run lasts as long as
# SLURM's shortest time limit (a minute) needs, without taking the CPU the other jobs share. The result is the same.
STEP_DELAY_ENV = "RUNNER_STEP_DELAY_S"


class StopFlag:
    """Set by a stop signal; called by the loop after every batch (and every epoch)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._displaced: dict[int, object] = {}
        self._fault = _parse_fault(os.environ.get(FAULT_AT_STEP_ENV))
        self._step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._displaced = dict(self._previous)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            os._exit(EXIT_INTERRUPTED_TWICE)  # the second Ctrl-C: the user means now
        self.signal_name, self.signum = name, signum
        log.warning(f"{name} received: stopping after this step and writing a checkpoint (Ctrl-C again to quit now)")

    def hand_over(self) -> None:
        """Pass the stop signal on to the Python handler it displaced (submitit's requeue), after the checkpoint.

        That handler may requeue the job and exit; Python's own Ctrl-C handler is left out (we exit ourselves).
        """
        previous = self._displaced.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            log.info(f"handing {self.signal_name} on to {getattr(previous, '__qualname__', previous)}")
            previous(self.signum, None)

    def __call__(self, global_step: int, epoch_end: bool = False) -> bool:
        if self._step_delay and not epoch_end:
            time.sleep(self._step_delay)
        if self._fault is not None and global_step == self._fault[1] and not epoch_end:
            signum, step, batches_later = self._fault
            self._fault = (signum, step, batches_later - 1) if batches_later else None  # once
            if not batches_later:
                os.kill(os.getpid(), signum)
        return self.signal_name is not None


def _parse_fault(spec: str | None) -> tuple[int, int, int] | None:
    if not spec:
        return None
    name, step, *rank = spec.split(":")
    if rank and (rank[0] != os.environ.get("RANK", "0") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return None
    step, _, batches_later = step.partition("+")
    return signal.Signals[name].value, int(step), int(batches_later or 0)
