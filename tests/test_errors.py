"""The one error path every entry point uses: one line, the right exit code, rank 0 speaking for all."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from runner.errors import (
    EXIT_STOPPED,
    ConfigError,
    ReportedByRankZero,
    RunnerError,
    Stopped,
    is_config_error,
    report_error,
)


def test_a_runner_error_is_one_line_on_stderr_with_its_exit_code(capsys):
    assert report_error(ConfigError("trainer.epochs must be at least 1, got 0.\nsecond line")) == 2
    assert capsys.readouterr().err == "error: trainer.epochs must be at least 1, got 0.\n"


def test_a_stop_is_a_warning_without_error_prefix_and_exits_75(caplog):
    logger = logging.getLogger("runner.test_errors")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        assert report_error(Stopped("stopped by SIGTERM at epoch 2"), logger) == EXIT_STOPPED
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage() == "stopped by SIGTERM at epoch 2"


def test_under_torchrun_rank_zero_speaks_for_shared_errors_and_other_ranks_for_their_own(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert report_error(ConfigError("bad input every rank meets")) == 2
    assert report_error(ReportedByRankZero(ConfigError("rank 0's decision"))) == 2
    assert capsys.readouterr().err == ""
    assert report_error(RunnerError("LOCAL_RANK=1 but this node has 1 CUDA device(s)")) == 2
    assert "LOCAL_RANK=1" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    report_error(ConfigError("bad input every rank meets"))
    assert capsys.readouterr().err == "error: bad input every rank meets\n"


def test_hydra_and_omegaconf_errors_count_as_config_errors_and_others_do_not():
    settings = OmegaConf.create({"epochs": 1})
    OmegaConf.set_struct(settings, True)  # as Hydra composes it: a misspelled key is an error
    with pytest.raises(ConfigAttributeError) as caught:
        _ = settings.epoch
    assert is_config_error(caught.value)
    assert is_config_error(ConfigError("x"))
    assert not is_config_error(ZeroDivisionError("a bug, with its traceback"))
