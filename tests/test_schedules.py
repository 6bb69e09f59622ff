"""Schedules: the expression LambdaLR keeps its state, and every configured scheduler gives torch's own LRs."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from runner.errors import ConfigError
from runner.expr import ExpressionError
from runner.schedules import ExpressionLambdaLR, simulate_schedule


def sgd(lr=0.1):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def lrs_over(scheduler, epochs):
    out = []
    for _ in range(epochs):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_expression_lambda_matches_torch_lambdalr_with_the_same_function():
    ours = ExpressionLambdaLR(sgd(), "0.5 ** (epoch // 3)")
    theirs = LambdaLR(sgd(), lambda epoch: 0.5 ** (epoch // 3))
    assert lrs_over(ours, 9) == lrs_over(theirs, 9)


def test_state_dict_holds_the_expression_and_restores_the_position():
    scheduler = ExpressionLambdaLR(sgd(), "0.5 ** (epoch // 3)")
    lrs_over(scheduler, 4)
    state = scheduler.state_dict()
    assert state["lr_lambdas"] == [
        {
            "expression": "0.5 ** (epoch // 3)",
            "steps_per_epoch": 1,
            "stepped_per_batch": False,
            "constants": {},
            "epochs": None,
        }
    ]
    assert state["mode"] == "factor"

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no pickled code needed

    optimizer = sgd()
    restored = ExpressionLambdaLR(optimizer, "1.0")  # a different expression is replaced by the saved one
    restored.load_state_dict(loaded)
    optimizer.param_groups[0]["lr"] = scheduler.optimizer.param_groups[0]["lr"]
    assert lrs_over(restored, 5) == lrs_over(scheduler, 5)


def test_pickles():
    scheduler = ExpressionLambdaLR(sgd(), "0.9 ** epoch")
    copy = pickle.loads(pickle.dumps(scheduler))
    assert copy.lr_lambdas[0](3) == pytest.approx(0.729)


def test_a_bad_expression_fails_at_construction():
    with pytest.raises(ExpressionError, match="scheduler.lr_lambda: the unknown name `x`"):
        ExpressionLambdaLR(sgd(), "x ** epoch")


def test_simulation_names_the_epoch_where_the_schedule_breaks():
    with pytest.raises(ConfigError, match="fails at epoch=4"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1 / (4 - epoch)"), 10)
    with pytest.raises(ConfigError, match="lr=-0.1 at epoch 2"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1 - epoch"), 10)
    with pytest.raises(ConfigError, match="lr=inf at epoch 0"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), lambda o: ExpressionLambdaLR(o, "1e308 * 10"), 3)


def test_per_step_simulation_names_the_epoch_and_the_step():
    def build(o):
        return ExpressionLambdaLR(o, "1 / (100 - step)", steps_per_epoch=45, stepped_per_batch=True)

    with pytest.raises(ConfigError, match=r"fails at epoch=2, step=100"):
        simulate_schedule(lambda p: torch.optim.SGD(p, lr=0.1), build, 5, steps_per_epoch=45, stepped_per_batch=True)
    with pytest.raises(ConfigError, match=r"lr=-0.01 at epoch 3 \(step 140\)"):
        simulate_schedule(
            lambda p: torch.optim.SGD(p, lr=0.1),
            lambda o: ExpressionLambdaLR(o, "(139 - step) / 10", steps_per_epoch=45, stepped_per_batch=True),
            5,
            steps_per_epoch=45,
            stepped_per_batch=True,
        )


def test_a_lambda_in_epoch_steps_sees_the_global_step_of_the_epoch_start():
    scheduler = ExpressionLambdaLR(sgd(), "step / 1000", steps_per_epoch=45)
    assert lrs_over(scheduler, 3) == pytest.approx([0.0, 0.1 * 0.045, 0.1 * 0.090])


def test_absolute_mode_is_the_lr_itself_and_survives_a_weights_only_checkpoint():
    scheduler = ExpressionLambdaLR(sgd(0.5), "0.01 * 0.5 ** epoch", mode="absolute")
    assert lrs_over(scheduler, 3) == pytest.approx([0.01, 0.005, 0.0025], rel=1e-15)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    restored = ExpressionLambdaLR(sgd(0.5), "1.0")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.optimizer.param_groups[0]["lr"] = scheduler.optimizer.param_groups[0]["lr"]  # the optimizer's own state
    assert restored.mode == "absolute" and lrs_over(restored, 2) == pytest.approx([0.00125, 0.000625], rel=1e-15)


def test_an_unknown_lambda_mode_names_both():
    with pytest.raises(ConfigError, match="scheduler.mode='keras': use factor .* or absolute"):
        ExpressionLambdaLR(sgd(), "1.0", mode="keras")


def test_compositions_refuse_what_torch_would_get_wrong():
    from runner.schedules import sequential

    parts = [
        {"_target_": "torch.optim.lr_scheduler.ConstantLR"},
        {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2},
    ]
    with pytest.raises(ConfigError, match="2 schedulers need 1 milestones, not 2"):
        sequential(sgd(), parts, [2, 3])
    with pytest.raises(ConfigError, match="milestones must be increasing"):
        sequential(sgd(), [*parts, parts[0]], [3, 2])
    with pytest.raises(
        ConfigError, match=r"scheduler.schedulers\[1\] \(torch.optim.lr_scheduler.StepLR\): unknown argument gama"
    ):
        sequential(sgd(), [parts[0], {**parts[1], "gama": 0.5}], [2])


WARMUP_PRESETS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml") if "warmup:" in p.read_text())


def test_every_preset_but_the_compositions_and_plateau_takes_a_warmup():
    presets = {p.stem for p in (CONF / "scheduler").glob("*.yaml")}
    assert set(WARMUP_PRESETS) == presets - {"plateau", "sequential", "chained", "onecycle"}


@pytest.mark.parametrize("interval", ["epoch", "step"])
@pytest.mark.parametrize("preset", WARMUP_PRESETS)
def test_a_warmup_before_any_preset_is_torchs_sequentiallr_of_linearlr_and_that_preset(make_config, preset, interval):
    from test_run import torch_scheduler

    from runner.build import optimizer_builder
    from runner.schedules import check_schedule, plan_schedule

    epochs, steps_per_epoch = 8, 5 if interval == "step" else 1
    warmup = 3 * steps_per_epoch
    cfg = make_config(
        f"scheduler={preset}",
        f"scheduler.warmup={warmup}",
        f"scheduler.interval={interval}",
        f"trainer.epochs={epochs}",
        "scheduler.warmup_start_factor=0.25",
    )
    step_lrs: list[float] = []
    check_schedule(plan_schedule(cfg.scheduler, epochs, steps_per_epoch), optimizer_builder(cfg), step_lrs)

    node = OmegaConf.to_container(cfg.scheduler, resolve=True)
    optimizer = sgd()
    scheduler = torch_scheduler(optimizer, node, epochs * steps_per_epoch, steps_per_epoch)
    expected = []
    for _ in range(epochs * steps_per_epoch):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert step_lrs == pytest.approx(expected, rel=1e-12)
    assert step_lrs[0] == pytest.approx(0.025) and max(step_lrs) <= 0.1 + 1e-12


@pytest.mark.parametrize("preset", ["plateau", "sequential", "chained", "onecycle"])
def test_a_warmup_where_torch_cannot_put_one_is_refused_naming_the_fix(make_config, preset):
    from runner.build import build_everything

    with pytest.raises(
        ConfigError, match=r"scheduler.warmup=2: \w+ cannot follow a warm-up \(.*\); leave scheduler.warmup at 0"
    ):
        build_everything(make_config(f"scheduler={preset}", "+scheduler.warmup=2"), torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["scheduler.warmup=10", "trainer.epochs=10"],
            "scheduler.warmup=10: the warm-up must be at least 1 step and shorter than the run (10 scheduler steps).",
        ),
        (
            ["scheduler.warmup=2", "scheduler.warmup_start_factor=0", "trainer.epochs=5"],
            "scheduler.warmup_start_factor=0.0: the warm-up starts at this fraction",
        ),
    ],
)
def test_a_warmup_that_does_not_fit_is_refused(make_config, overrides, message):
    from runner.build import build_everything

    with pytest.raises(ConfigError) as caught:
        build_everything(make_config("scheduler=cosine", *overrides), torch.device("cpu"))
    assert message in str(caught.value)
