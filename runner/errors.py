"""Errors meant for users, and the one path that turns them into one line and an exit code.

Every entry point (``runner``, ``runner.preview``, ``runner.compare``, a sweep's callback) reports through
``report_error``: a ``RunnerError`` (and Hydra's or OmegaConf's own config errors) becomes ``error: <one line>``
and its exit code, without a traceback unless ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import logging
import os
import sys

# sysexits.h's EX_USAGE-like "bad input", and EX_TEMPFAIL, "temporary failure; the user is invited to retry":
# stopped, checkpointed, resumable.
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 75
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
    """A stop signal ended the launch after a checkpoint; the same command resumes."""

    exit_code = EXIT_STOPPED


class CheckpointNotWritten(RunnerError):
    """A checkpoint could not be written (a full disk, say); the previous one stands, and the same command resumes
    from it once the cause is gone."""

    exit_code = EXIT_STOPPED


class TrackingBehind(RunnerError):
    """Training went on when the tracking server stopped answering; MLflow lacks epochs the checkpoint holds."""

    exit_code = EXIT_STOPPED


class RunInUse(RunnerError):
    """The run this launch would continue is being trained by another process; nothing was done, try again later."""

    exit_code = EXIT_STOPPED


class ReportedByRankZero(RunnerError):
    """Under torchrun, an error rank 0 met and shared with the other ranks: rank 0 reports it, once for all."""

    def __init__(self, error: RunnerError):
        super().__init__(str(error))
        self.exit_code = error.exit_code


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


def report_error(err: BaseException, logger: logging.Logger | None = None) -> int:
    """Say ``err`` in one line (through ``logger``, else on stderr) and return the exit code to leave with.

    Under torchrun only rank 0 speaks for what every rank meets alike (bad input, a stop) and for what it
    shared; another rank's own failure (its GPU missing) is still reported by that rank.
    """
    exit_code = getattr(err, "exit_code", EXIT_BAD_INPUT)
    shared = isinstance(err, ReportedByRankZero | ConfigError | Stopped)
    if shared and os.environ.get("RANK", "0") != "0":
        return exit_code
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    retry = isinstance(
        err, Stopped | RunInUse | TrackingBehind
    )  # not the user's mistake: the same command, later, carries on
    line = message if retry else f"error: {message}"
    if logger is None:
        print(line, file=sys.stderr)
    elif retry:
        logger.warning(line)
    else:
        logger.error(line)
    return exit_code
