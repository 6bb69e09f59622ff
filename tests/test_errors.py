"""The one error path every entry point uses: one line, the right exit code, rank 0 speaking for all."""

from __future__ import annotations

import logging

import pytest
from conftest import run_runner
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


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.epoch=3", "Could not override 'trainer.epoch'; Key 'epoch' not in 'TrainerConfig'; To append"),
        ("optimizer=nope", "Could not find 'optimizer/nope'; Available options in 'optimizer': adam, adamw, asgd, sgd"),
        ("trainer.epochs=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("optimizer.lr=[1", "cannot parse the override 'optimizer.lr=[1': no viable alternative at input '[1'"),
        (
            "scheduler.lr_lambda=0.1*(1+epoch)",
            "cannot parse the override 'scheduler.lr_lambda=0.1*(1+epoch)': mismatched",
        ),
    ],
)
def test_hydra_config_errors_are_one_line_and_exit_2(tmp_path, override, expected):
    result = run_runner(override, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line
    if "cannot parse" in expected:
        assert "Quote a value" in line and "for the shell and for Hydra" in line


def test_hydra_config_errors_in_a_sweep_are_one_line_and_hydra_full_error_still_gives_the_traceback(tmp_path):
    sweep = run_runner("-m", "trainer.epoch=3,4", cwd=tmp_path, timeout=120)
    assert sweep.returncode == 2
    (line,) = sweep.stderr.strip().splitlines()
    assert "Key 'epoch' not in 'TrainerConfig'" in line
    full = run_runner("trainer.epoch=3", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigCompositionException" in full.stderr
