"""How a run ends when training goes wrong: a NaN or infinite loss stops it in one line, FAILED, exit 1, its last
good checkpoint untouched, and the same command refuses to resume into it. Real ``python -m runner`` processes,
a real SQLite MLflow store."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import metric_series, mlflow_runs, run_runner

from runner.checkpoint import list_checkpoints
from runner.signals import FAULT_AT_STEP_ENV

pytestmark = pytest.mark.slow  # real `python -m runner` subprocesses

BASE = ["trainer.epochs=4", "trainer.device=cpu", "trainer.progress_bar=false", "trainer.checkpoint_min_seconds=0"]
# The LR multiplied by 1e12 from the third epoch on: epochs 1 and 2 train, epoch 3's loss becomes NaN.
BLOWS_UP_IN_EPOCH_3 = ["scheduler=lambda", "scheduler.lr_lambda='1 if epoch < 2 else 1e12'"]
DIVERGED_FIX = "Checkpoints written before are kept and this run will not be resumed"


def launch(tmp_path, *overrides: str, run_dir: str = "run"):
    return run_runner(
        *BASE, *overrides, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "[runner][ERROR] - error:" in line]


def test_a_loss_that_becomes_nan_ends_the_run_failed_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    result = launch(tmp_path, *BLOWS_UP_IN_EPOCH_3)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "training diverged: the training loss is nan over epoch 3/4 (steps 91-135, lr now 1e+11)" in line
    assert DIVERGED_FIX in line and "epoch 3/4 lr" not in result.stderr  # the diverged epoch is not reported as one

    run_dir = tmp_path / "run"
    checkpoints = list_checkpoints(run_dir)
    assert [p.name for p in checkpoints] == ["epoch-0001-step-00000045.pt", "epoch-0002-step-00000090.pt"]
    last = torch.load(checkpoints[-1], weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in last["model"].values())
    record = json.loads((run_dir / "runner.json").read_text())
    assert record["diverged"].startswith("training diverged: the training loss is nan over epoch 3/4")
    assert not record["finished"]

    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert logged.info.status == "FAILED"
    assert len(metric_series(client, logged.info.run_id, "train_loss")) == 2  # the good epochs, each once
    assert all(math.isfinite(value) for value in metric_series(client, logged.info.run_id, "train_loss"))

    again = launch(tmp_path, *BLOWS_UP_IN_EPOCH_3)
    assert again.returncode == 1 and "training on" not in again.stderr, again.stderr[-2000:]
    (line,) = error_lines(again.stderr)
    assert "run diverged: the training loss is nan over epoch 3/4" in line
    assert "Resuming it would diverge again" in line and "resume=never" in line
    assert list_checkpoints(run_dir) == checkpoints  # nothing written, nothing pruned

    fresh = launch(tmp_path, *BLOWS_UP_IN_EPOCH_3, "resume=never", run_dir="fresh")
    assert "training on cpu in" in fresh.stderr and fresh.returncode == 1  # trains afresh (and diverges again)


def test_a_divergence_mid_epoch_is_never_written_into_a_mid_epoch_checkpoint(tmp_path):
    """checkpoint_every_steps writes between epoch ends; the loss summed so far is checked before each write."""
    result = launch(
        tmp_path,
        "scheduler=lambda",
        "scheduler.interval=step",
        "scheduler.lr_lambda='1 if step < 100 else 1e12'",
        "trainer.checkpoint_every_steps=30",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    (line,) = error_lines(result.stderr)
    assert "the training loss is nan over epoch 3/4 (steps 91-120, lr now 1e+11)" in line
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert newest.name == "epoch-0002-step-00000090.pt"


def test_an_lr_that_overflows_the_first_step_is_the_same_one_line(tmp_path):
    result = launch(tmp_path, "optimizer.lr=1e300")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "training diverged: the optimizer step overflowed at epoch 1/4, step 1 (lr 1e+300" in line
    assert DIVERGED_FIX in line
    assert not list_checkpoints(tmp_path / "run")


def test_detect_nonfinite_false_lets_a_nan_run_finish_as_before(tmp_path):
    result = launch(tmp_path, "optimizer.lr=1e30", "trainer.detect_nonfinite=false")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 4/4 lr 1e+30 train_loss nan" in result.stderr


# An LR high enough that validation accuracy goes up and down, so the best epochs are not simply the last ones.
OSCILLATING = ["trainer.epochs=10", "trainer.deterministic=true", "optimizer.lr=0.9", "trainer.checkpoint_every=3"]


def best_files(run_dir) -> dict[str, dict]:
    return {path.name: torch.load(path, weights_only=True) for path in sorted((run_dir / "checkpoints").glob("best*"))}


def test_the_best_epochs_are_kept_apart_and_a_killed_run_keeps_the_same_ones(tmp_path):
    keep = ["trainer.monitor=val_accuracy", "trainer.keep_best=6", "trainer.keep_checkpoints=1"]
    whole = launch(tmp_path, *OSCILLATING, *keep, run_dir="whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = best_files(tmp_path / "whole")
    final = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=True)
    accuracies = [epoch["val_accuracy"] for epoch in final["history"]["epochs"]]
    ranked = sorted(range(10), key=lambda i: (-accuracies[i], i))[:6]  # best first, the earlier epoch on a tie
    assert set(reference) == {"best.pt", *(f"best-epoch-{i + 1:04d}.pt" for i in ranked)}
    assert reference["best.pt"]["epoch"] == ranked[0] + 1
    assert (tmp_path / "whole/checkpoints/best.pt").samefile(
        tmp_path / f"whole/checkpoints/best-epoch-{ranked[0] + 1:04d}.pt"
    )
    assert min(ranked) < 6 < max(ranked), "best epochs on both sides of the checkpoint the kill resumes from"
    assert final["best"]["ranking"] == [[accuracies[i], i + 1] for i in ranked]
    assert reference["best.pt"]["monitor"] == {"name": "val_accuracy", "value": accuracies[ranked[0]]}
    notes = [line for line in whole.stderr.splitlines() if "best val_accuracy so far" in line]
    assert len(notes) == sum(1 for i, a in enumerate(accuracies) if a > max(accuracies[:i], default=-1))

    # kill -9 mid-epoch 9: the last checkpoint holds epoch 6, best files of epochs 7 and 8 are on disk already
    overrides = [
        *BASE,
        *OSCILLATING,
        *keep,
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "hydra.run.dir=killed",
    ]
    killed = run_runner(*overrides, cwd=tmp_path, env={FAULT_AT_STEP_ENV: "SIGKILL:380"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_runner(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0 and "from epoch-0006-step-00000270.pt" in resumed.stderr, resumed.stderr[-2000:]
    again = best_files(tmp_path / "killed")
    assert set(again) == set(reference)
    resumed_final = torch.load(list_checkpoints(tmp_path / "killed")[-1], weights_only=True)
    assert resumed_final["best"] == final["best"]  # the ranking came back with the checkpoint of epoch 6
    for name in reference:
        assert again[name]["epoch"] == reference[name]["epoch"] and again[name]["monitor"] == reference[name]["monitor"]
        for key, tensor in reference[name]["model"].items():
            assert torch.equal(again[name]["model"][key], tensor), (name, key)


def test_a_monitor_the_run_does_not_log_is_one_line_before_training(tmp_path):
    result = launch(tmp_path, "trainer.monitor=val_f1")
    assert result.returncode == 2 and "epoch 1/" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert "trainer.monitor='val_f1' is not logged by this run; use one of train_loss, val_loss, val_accuracy." in line


def test_early_stopping_ends_the_run_finished_at_the_same_epoch_with_and_without_a_kill(tmp_path):
    from conftest import assert_same_result

    stopping = ["trainer.epochs=30", "trainer.deterministic=true", "optimizer.lr=0.9"]
    stopping += ["trainer.early_stopping.patience=3", "tracking.experiment=stopping"]
    whole = launch(tmp_path, *stopping, run_dir="whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    record = json.loads((tmp_path / "whole" / "runner.json").read_text())
    assert record["finished"] and record["stopped_early"].startswith("by callbacks.early_stopping after epoch ")
    stopped_at = int(record["stopped_early"].split("after epoch ")[1].split("/")[0])
    assert 5 < stopped_at < 30
    assert "val_loss did not improve on" in record["stopped_early"] and "for 3 epochs" in record["stopped_early"]
    assert f"stopped early {record['stopped_early']}" in whole.stderr
    reference = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=True)
    losses = [epoch["val_loss"] for epoch in reference["history"]["epochs"]]
    assert len(losses) == stopped_at and min(losses[-3:]) >= min(losses[:-3])  # three epochs without a new best
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "stopping")
    assert logged.info.status == "FINISHED" and logged.data.tags["stopped_early"] == record["stopped_early"]

    again = launch(tmp_path, *stopping, run_dir="whole")
    assert again.returncode == 0 and f"stopped early {record['stopped_early']}" in again.stderr
    assert "already finished" in again.stderr and "epoch 1/" not in again.stderr

    # Killed after the final checkpoint but before runner.json said finished: the next launch trains nothing more
    unmarked = {**record, "finished": False, "stopped_early": None}
    (tmp_path / "whole" / "runner.json").write_text(json.dumps(unmarked))
    gap = launch(tmp_path, *stopping, run_dir="whole")
    assert gap.returncode == 0 and f"stopped early after epoch {stopped_at}; logging" in gap.stderr, gap.stderr[-2000:]
    assert f"epoch {stopped_at + 1}/30" not in gap.stderr
    assert json.loads((tmp_path / "whole" / "runner.json").read_text()) == {**record, "created": record["created"]}

    # kill -9 two epochs before the stop: the checkpoint holds one epoch without improvement counted, not zero
    overrides = [*BASE, *stopping, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=killed"]
    kill_at = (stopped_at - 2) * 45 + 10
    killed = run_runner(*overrides, cwd=tmp_path, env={FAULT_AT_STEP_ENV: f"SIGKILL:{kill_at}"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_runner(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "killed" / "runner.json").read_text())["stopped_early"] == record["stopped_early"]
    assert_same_result(torch.load(list_checkpoints(tmp_path / "killed")[-1], weights_only=True), reference)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_torchs_own_and_logs_the_mean_gradient_norm(make_config, algorithm):
    """One epoch through the runner's loop against the same epoch written by hand with torch.nn.utils."""
    import copy

    import torch.nn.functional as F

    from runner.build import build_everything
    from runner.distributed import Distributed
    from runner.session import make_loop
    from runner.train import Progress, train

    cpu = torch.device("cpu")
    cfg = make_config(
        "trainer.epochs=1", "trainer.gradient_clip_val=0.05", f"trainer.gradient_clip_algorithm={algorithm}"
    )
    built = build_everything(cfg, cpu)
    loop = make_loop(cfg, built, Distributed(cpu))
    model = copy.deepcopy(built.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    batches = list(loop.train_batches.epoch(0))

    results = []
    train(loop, Progress(), results.append)
    norms = []
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        if algorithm == "norm":
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        else:
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.05)
        optimizer.step()
    for (name, expected), actual in zip(model.state_dict().items(), built.model.state_dict().values(), strict=True):
        assert torch.equal(actual, expected), name
    assert min(norms) > 0.05  # the clipping did something at every step
    assert results[0].metrics["grad_norm"] == pytest.approx(float(sum(norms)) / len(norms), rel=1e-6)


def test_under_16_mixed_the_steps_the_grad_scaler_skips_are_left_out_of_grad_norm(make_config):
    """A skipped step's unscaled gradients are inf: its norm would make the epoch's grad_norm inf."""
    from runner.build import build_everything
    from runner.distributed import Distributed
    from runner.session import make_loop
    from runner.train import Progress, train

    cpu = torch.device("cpu")
    cfg = make_config("trainer.epochs=2", "trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0")
    loop = make_loop(cfg, build_everything(cfg, cpu), Distributed(cpu))
    # A scale so large that float16 gradients overflow: GradScaler halves it at each skipped step until they fit
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    results = []
    train(loop, Progress(), results.append)
    skipped = round(math.log2(2.0**40 / loop.scaler.get_scale()))  # no growth: its interval is 2000 steps
    assert 10 < skipped < len(loop.train_batches)  # skipped steps in the first epoch, and steps taken
    norms = [result.metrics["grad_norm"] for result in results]
    assert all(math.isfinite(norm) and norm > 0 for norm in norms), norms


def test_gradient_clipping_settings_that_cannot_work_are_one_line(make_config):
    from runner.config import check_settings
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.gradient_clip_val must be above 0 \(or null: no clipping\), got 0"):
        check_settings(make_config("trainer.gradient_clip_val=0"))
    with pytest.raises(ConfigError, match="trainer.gradient_clip_algorithm='l2': use norm or value."):
        check_settings(make_config("trainer.gradient_clip_algorithm=l2"))


def test_a_run_with_clipping_stopped_mid_epoch_resumes_bitwise_grad_norm_included(tmp_path):
    from conftest import assert_same_result

    clipping = ["trainer.deterministic=true", "trainer.gradient_clip_val=0.5"]
    whole = launch(tmp_path, *clipping, run_dir="whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    overrides = [*BASE, *clipping, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=stopped"]
    stopped = run_runner(*overrides, cwd=tmp_path, env={FAULT_AT_STEP_ENV: "SIGTERM:100"})  # mid-epoch 3
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    resumed = run_runner(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0 and "epoch 3/4, batch 10 of 45" in resumed.stderr, resumed.stderr[-2000:]
    reference = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=True)
    assert all("grad_norm" in epoch for epoch in reference["history"]["epochs"])
    assert_same_result(torch.load(list_checkpoints(tmp_path / "stopped")[-1], weights_only=True), reference)


def train_in_process(cfg):
    """Build and train ``cfg`` through the runner's own loop in this process; (model, each epoch's result)."""
    from runner.build import build_everything
    from runner.distributed import Distributed
    from runner.session import make_loop
    from runner.train import Progress, train

    cpu = torch.device("cpu")
    torch.manual_seed(cfg.trainer.seed)
    built = build_everything(cfg, cpu)
    loop = make_loop(cfg, built, Distributed(cpu))
    results = []
    train(loop, Progress(), results.append)
    return built.model, results, loop


def test_four_accumulated_batches_of_8_step_like_one_batch_of_32(make_config):
    """A model without batch-dependent layers: the same samples reach each step, the same mean gradient, the same
    per-step schedule (OneCycle over the optimizer steps, not the batches)."""
    schedule = ["scheduler=onecycle", "trainer.epochs=2", "tracking.log_every_n_steps=1"]
    model_32, results_32, loop_32 = train_in_process(make_config(*schedule, "trainer.batch_size=32"))
    accumulated = [*schedule, "trainer.batch_size=8", "trainer.accumulate_grad_batches=4"]
    model_4x8, results_4x8, loop_4x8 = train_in_process(make_config(*accumulated))

    # 1438 samples: 45 steps, the last of 30 samples (3 batches of 8 and one of 6, weighted by their samples)
    assert (len(loop_4x8.train_batches), len(loop_32.train_batches), loop_32.train_batches.samples) == (180, 45, 1438)
    assert results_4x8[-1].lr_steps == pytest.approx(results_32[-1].lr_steps, rel=1e-12)  # 45 steps an epoch
    assert sorted(results_4x8[-1].lr_steps) == list(range(45, 90))
    for (name, expected), actual in zip(model_32.state_dict().items(), model_4x8.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=name)
    for epoch_32, epoch_4x8 in zip(results_32, results_4x8, strict=True):
        assert epoch_4x8.metrics["val_loss"] == pytest.approx(epoch_32.metrics["val_loss"], rel=1e-4)


def test_accumulation_that_cannot_work_is_one_line(make_config):
    from runner.config import check_settings
    from runner.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches must be at least 1 \(1: a step per batch"):
        check_settings(make_config("trainer.accumulate_grad_batches=0"))


def test_a_run_stopped_in_the_middle_of_an_accumulation_resumes_bitwise(tmp_path):
    """SIGTERM two batches into a step of four: the checkpoint holds the gradients summed so far, and the resumed
    run adds the other two batches' to them. Per-step schedule, clipping: every piece of the step is in play."""
    from conftest import assert_same_result

    accumulating = [
        "trainer.deterministic=true",
        "trainer.batch_size=8",
        "trainer.accumulate_grad_batches=4",
        "trainer.epochs=2",
        "scheduler=onecycle",
        "trainer.gradient_clip_val=0.5",
    ]
    step_checkpoints = ["trainer.checkpoint_every_steps=10", "trainer.keep_checkpoints=100"]
    whole = launch(tmp_path, *accumulating, *step_checkpoints, run_dir="whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    # every 10 optimizer steps, right after the step: never between its batches, never over an epoch's end one
    written = [torch.load(path, weights_only=True) for path in list_checkpoints(tmp_path / "whole")]
    assert [(c["progress"]["global_step"], c["progress"]["batch"]) for c in written] == [
        (10, 40), (20, 80), (30, 120), (40, 160), (45, 0), (50, 20), (60, 60), (70, 100), (80, 140), (90, 0)
    ]  # fmt: skip
    assert not any("gradients" in c["ranks"]["ranks"][0] for c in written)
    overrides = [*BASE, *accumulating, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "hydra.run.dir=stopped"]
    stopped = run_runner(*overrides, cwd=tmp_path, env={FAULT_AT_STEP_ENV: "SIGTERM:50+2"})  # epoch 2, step 51
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert "at epoch 2, batch 22" in stopped.stderr, stopped.stderr[-2000:]  # (50 - 45) x 4 + 2 batches into it
    held = torch.load(list_checkpoints(tmp_path / "stopped")[-1], weights_only=True)
    assert held["progress"]["global_step"] == 50 and len(held["ranks"]["ranks"][0]["gradients"]) > 0
    resumed = run_runner(*overrides, cwd=tmp_path)
    assert resumed.returncode == 0 and "epoch 2/2, batch 22 of 180" in resumed.stderr, resumed.stderr[-2000:]
    reference = torch.load(list_checkpoints(tmp_path / "whole")[-1], weights_only=True)
    assert reference["progress"]["global_step"] == 90
    assert_same_result(torch.load(list_checkpoints(tmp_path / "stopped")[-1], weights_only=True), reference)


def evaluate_cli(cwd, *args: str):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "runner.evaluate", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def printed_scores(stdout: str) -> dict[str, float]:
    return {key: float(value) for key, value in (line.split() for line in stdout.splitlines()[1:])}


def test_the_best_checkpoint_is_scored_on_the_test_split_once_and_runner_evaluate_gives_the_same(tmp_path):
    """The LR jumps after epoch 2, so the best epoch is not the last: the test score is best.pt's, as logged to
    MLflow and runner.json, and `python -m runner.evaluate` prints the same from the run directory alone."""
    jumps = ["data.test_fraction=0.1", "scheduler=lambda", "scheduler.lr_lambda='1 if epoch < 2 else 30'"]
    result = launch(tmp_path, *jumps)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "runner.json").read_text())
    history = torch.load(list_checkpoints(tmp_path / "run")[-1], weights_only=True)["history"]["epochs"]
    best_epoch = min(range(4), key=lambda e: history[e]["val_loss"]) + 1
    assert best_epoch < 4, "the test needs a best epoch that is not the last"
    (line,) = [line for line in result.stderr.splitlines() if "test split, best.pt" in line]
    assert f"best.pt (epoch {best_epoch}, val_loss" in line
    client, (logged,) = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "runner")
    assert {key: logged.data.metrics[key] for key in record["test_metrics"]} == record["test_metrics"]
    assert set(record["test_metrics"]) == {"test_loss", "test_accuracy"}
    assert logged.data.metrics["best_epoch"] == best_epoch  # summary columns the runs table sorts on
    assert logged.data.metrics["best_val_loss"] == history[best_epoch - 1]["val_loss"]

    best = evaluate_cli(tmp_path, "run")
    assert best.returncode == 0, best.stderr
    assert f"best.pt (epoch {best_epoch}) on the test split (180 samples)" in best.stdout
    assert printed_scores(best.stdout) == pytest.approx(record["test_metrics"], rel=1e-5)
    last = evaluate_cli(tmp_path, "run", "--checkpoint", "last", "--split", "val")
    assert last.returncode == 0, last.stderr
    assert printed_scores(last.stdout) == pytest.approx(
        {key: history[-1][key] for key in ("val_loss", "val_accuracy")}, rel=1e-5
    )


def test_runner_evaluate_refuses_what_it_cannot_score_in_one_line(tmp_path):
    assert launch(tmp_path, "trainer.epochs=1").returncode == 0  # no test split
    assert launch(tmp_path, "trainer.epochs=1", "optimizer.lr=0.05", run_dir="other").returncode == 0
    other = list_checkpoints(tmp_path / "other")[-1]
    for args, message in [
        (["nowhere"], "error: nowhere is not a run directory (no runner.json and resolved_config.yaml)"),
        (["run", "--split", "test"], "error: --split test: this run's data has no test split; set data.test_fraction"),
        (["run", "--checkpoint", str(other)], "was written by another config (fingerprint"),
        (["run", "--checkpoint", "nope.pt"], "error: --checkpoint nope.pt: no such file; use best, last or"),
    ]:
        result = evaluate_cli(tmp_path, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_a_finished_run_taken_further_continues_in_its_directory_and_mlflow_run_on_the_longer_schedule(tmp_path):
    """`resume=RUN_DIR trainer.epochs=6` on a finished 4-epoch cosine run: epochs 5 and 6 in the same run directory
    and MLflow run, with the LRs of torch's CosineAnnealingLR for 6 epochs, and the LR jump where they meet said.
    A config group beside resume= composes the config from the command instead: the same here, so also taken
    further."""
    cosine = ["scheduler=cosine"]
    assert launch(tmp_path, *cosine).returncode == 0
    # nothing but the new length: the run's own config (scheduler, tracking store, device) comes from the run
    longer = run_runner("resume=run", "trainer.epochs=6", "hydra.run.dir=elsewhere", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-2000:]
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    torch_lrs = []
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
    for _ in range(6):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert (
        "the LR goes from 0.01464 (epoch 4, the 4-epoch schedule) to 0.025 (epoch 5, the schedule for 6"
        in longer.stderr
    )
    assert f"the LR jumps by {abs(torch_lrs[4] / 0.01464466 - 1):.0%} where the runs meet" in longer.stderr
    assert not (tmp_path / "elsewhere" / "runner.json").exists(), "the run stays in its own directory"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, (logged,) = mlflow_runs(uri, "runner")
    assert logged.info.status == "FINISHED" and logged.data.tags["extended"] == "from 4 to 6 epochs"
    lrs = metric_series(client, logged.info.run_id, "lr")
    assert (
        lrs[4:] == pytest.approx(torch_lrs[4:], rel=1e-12)
        and len(metric_series(client, logged.info.run_id, "val_loss")) == 6
    )
    record = json.loads((tmp_path / "run" / "runner.json").read_text())
    assert record["finished"] and record["mlflow_run_id"] == logged.info.run_id

    again = launch(tmp_path, *cosine, "trainer.epochs=6")  # the 6-epoch config: this run, finished
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]
    shorter = run_runner(*BASE, *cosine, "resume=run", "trainer.epochs=5", cwd=tmp_path)
    assert shorter.returncode == 2
    assert "resume=run: that run has trained 6 epoch(s); trainer.epochs=5 adds none." in shorter.stderr
    older = list_checkpoints(tmp_path / "run")[0]  # of the 4-epoch run, before it was taken further
    assert torch.load(older, weights_only=True)["progress"]["epoch"] < 6
    scored = evaluate_cli(tmp_path, "run", "--checkpoint", str(older))
    assert scored.returncode == 0, scored.stderr  # still one of the run's checkpoints
    from_older = run_runner("resume=" + str(older), "trainer.epochs=9", cwd=tmp_path)
    assert (
        from_older.returncode == 2
        and "to take a run further, continue from its newest readable checkpoint" in from_older.stderr
    )
    composed = run_runner(*BASE, *cosine, "resume=run", "trainer.epochs=7", f"tracking.uri={uri}", cwd=tmp_path)
    assert composed.returncode == 0 and "taking run from 6 to 7 epochs" in composed.stderr, composed.stderr[-2000:]
    other = run_runner(*BASE, "scheduler=step", "resume=run", "trainer.epochs=8", cwd=tmp_path)
    assert other.returncode == 2 and "resume=run: that run's config differs (scheduler" in other.stderr
    before = (tmp_path / "run" / "runner.json").read_text()
    forced = run_runner(*BASE, *cosine, "resume=run", "resume_force=true", "trainer.epochs=8", cwd=tmp_path)
    assert forced.returncode == 0 and "taking run" not in forced.stderr, forced.stderr[-2000:]
    assert (tmp_path / "run" / "runner.json").read_text() == before, "forced: a new run, the old one as it was"
    assert len(list(tmp_path.glob("outputs/*/*/runner.json"))) == 1
