"""Errors meant for users, and the one path that turns them into one line and an exit code.

Every entry point (``runner``, ``runner.preview``, ``runner.compare``, a sweep's callback) reports through
``report_error``: a ``RunnerError`` (and Hydra's or OmegaConf's own config errors) becomes ``error: <one line>``
and its exit code, without a traceback unless ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager

# sysexits.h's EX_USAGE-like "bad input", and EX_TEMPFAIL, "temporary failure; the user is invited to retry":
# stopped, checkpointed, resumable.
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 75
# torchrun stops every process as soon as one exits: another rank that meets the same bad input leaves this long for
# rank 0, which says it, to get there (under load rank 0 can be seconds behind). torchrun's SIGTERM ends the wait.
RANK_ZERO_GRACE_S = 15.0
# Set beside HYDRA_FULL_ERROR=1 when the runner set that itself, to catch Hydra's config errors (runner.__main__).
RAISED_FOR_RUNNER_ENV = "RUNNER_HYDRA_FULL_ERROR_SET"


class RunnerError(Exception):
    """Base of every error the runner reports to its user as one line."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(RunnerError, ValueError):
    """The configuration asks for something impossible; the message names the key and the fix."""


class CheckpointError(RunnerError):
    """A checkpoint that cannot be used: another format, another model, or none where one was asked for."""


class Stopped(RunnerError):
    """A stop signal ended the launch after a checkpoint; the same command resumes.

    ``hand_over`` passes the signal on to the handler the runner displaced (submitit's requeue), once the stop is
    reported and every rank has left the process group.
    """

    exit_code = EXIT_STOPPED

    def __init__(self, message: str, hand_over: Callable[[], None] = lambda: None):
        super().__init__(message)
        self.hand_over = hand_over


class Diverged(RunnerError):
    """The training loss became NaN or infinite (or an optimizer step overflowed): the run is over, FAILED, its last
    good checkpoint kept; ``runner.json`` says so, and the same command refuses rather than resume into it."""

    exit_code = 1


class UserCodeError(RunnerError):
    """The user's own code (data function, loss, metric, callback) raised: reported with its traceback frames and
    the hook it came from, since that is the user's bug to see."""

    exit_code = 1


# Packages whose frames are not the user's code: left out of a UserCodeError's traceback.
LIBRARY_PACKAGES = ("runner", "torch", "torchvision", "torchmetrics", "hydra", "omegaconf", "numpy", "pandas")


def is_users_code(thing: object) -> bool:
    """Whether an object (a function, a class, an instance) comes from outside the runner and its libraries."""
    kind = thing if isinstance(thing, type) or callable(thing) and hasattr(thing, "__code__") else type(thing)
    module = getattr(kind, "__module__", None) or ""
    return module.split(".", 1)[0] not in LIBRARY_PACKAGES


def users_traceback(err: BaseException) -> str:
    """The frames of ``err``'s traceback that are the user's (not the runner's or its libraries'), as text."""
    frames = [
        frame
        for frame in traceback.extract_tb(err.__traceback__)
        if not any(f"{os.sep}{package}{os.sep}" in frame.filename for package in LIBRARY_PACKAGES)
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(err), err)
    return "Traceback (the user's code, most recent call last):\n" + "".join(lines)


class NotFinished(RunnerError):
    """The run is not over and nothing is lost: running the same command again continues it (exit 75)."""

    exit_code = EXIT_STOPPED


class CheckpointNotWritten(NotFinished):
    """A checkpoint could not be written (a full disk, say); the previous one stands, and the same command resumes
    from it once the cause is gone."""


class TrackingBehind(NotFinished):
    """Training went on when the tracking server stopped answering; MLflow lacks epochs the checkpoint holds."""


class RunInUse(NotFinished):
    """The run this launch would continue is being trained by another process; nothing was done, try again later."""


class ReportedByRankZero(RunnerError):
    """Under torchrun, an error rank 0 met and shared with the other ranks: rank 0 reports it, once for all."""

    def __init__(self, error: RunnerError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


@contextmanager
def users_failures(thing: object, what: str):
    """Around a call into ``thing``: an exception it raises, when ``thing`` is the user's code (not the runner's or
    a library's), becomes a UserCodeError naming ``what``, with the user's frames kept as its cause. The runner's
    own errors pass through."""
    try:
        yield
    except RunnerError:
        raise
    except Exception as err:
        if not is_users_code(thing):
            raise
        raise UserCodeError(f"{what} raised {type(err).__name__}: {err}") from err


def full_traceback_wanted() -> bool:
    """The user set HYDRA_FULL_ERROR=1 (not the runner, for its own catching of Hydra's errors)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" and os.environ.get(RAISED_FOR_RUNNER_ENV) != "1"


def is_config_error(err: BaseException) -> bool:
    """A runner error, or Hydra's or OmegaConf's own (an unknown option, a misspelled key, a bad override)."""
    if isinstance(err, RunnerError):
        return True
    if "hydra" not in sys.modules and "omegaconf" not in sys.modules:
        return False
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, HydraException | OmegaConfBaseException)


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's first line, cut at ``limit`` characters, or its type's name when it says nothing: how a
    failure the runner works around is named in its one-line warning or error."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def report_error(err: BaseException, logger: logging.Logger | None = None) -> int:
    """Say ``err`` in one line (through ``logger``, else on stderr) and return the exit code to leave with.

    Under torchrun only rank 0 speaks for what every rank meets alike (bad input, a stop) and for what it
    shared; another rank's own failure (its GPU missing) is still reported by that rank.
    """
    exit_code = getattr(err, "exit_code", EXIT_BAD_INPUT)
    shared = isinstance(err, ReportedByRankZero | ConfigError | Stopped | Diverged)  # every rank meets these alike
    if shared and os.environ.get("RANK", "0") != "0":
        if exit_code == EXIT_BAD_INPUT:
            time.sleep(RANK_ZERO_GRACE_S)
        return exit_code
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    retry = isinstance(err, Stopped | RunInUse | TrackingBehind)  # not a mistake: the same command, later, carries on
    line = message if retry else f"error: {message}"
    if isinstance(err, UserCodeError) and err.__cause__ is not None:
        line += "\n" + users_traceback(err.__cause__).rstrip()
    if logger is None:
        print(line, file=sys.stderr)
    elif retry:
        logger.warning(line)
    else:
        logger.error(line)
    return exit_code
