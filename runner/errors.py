"""Errors meant for users: ``__main__`` prints them as one line, without a traceback, and exits non-zero."""

from __future__ import annotations


class RunnerError(Exception):
    """Base of every error the runner reports to its user as one line."""

    exit_code = 2


class ConfigError(RunnerError, ValueError):
    """The configuration asks for something impossible; the message names the key and the fix."""
