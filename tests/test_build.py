"""Every config option builds, and bad constructor arguments are refused with the class, key and valid keys."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CONF

from runner.build import build_everything
from runner.errors import ConfigError
from runner.models import MLP
from runner.schedules import RESERVED
from runner.targets import check_arguments

CPU = torch.device("cpu")
COMBINATIONS = [
    ("mlp", "digits"),
    ("cnn", "digits"),
    ("resnet18", "digits"),
    ("linear", "regression"),
    ("mlp", "regression"),
    ("cnn", "fake"),
    ("resnet18", "fake"),
    ("mlp", "fake"),
]


def test_every_model_and_data_option_is_covered():
    covered_models, covered_data = {m for m, _ in COMBINATIONS}, {d for _, d in COMBINATIONS}
    assert covered_models == {p.stem for p in (CONF / "model").glob("*.yaml")}
    # mnist, fashion_mnist and cifar10 need files (test_data.py builds MNIST from files it writes); csv,
    # image_folder and custom need the user's files and functions (test_experiment.py writes them).
    needs_files = {"mnist", "fashion_mnist", "cifar10", "csv", "image_folder", "custom"}
    assert covered_data | needs_files == {p.stem for p in (CONF / "data").glob("*.yaml")}


@pytest.mark.parametrize(("model", "data"), COMBINATIONS)
def test_model_and_data_build_and_run_forward(make_config, model, data):
    overrides = [f"model={model}", f"data={data}"]
    if data == "fake":
        overrides += ["data.size=16", "data.image_size=[3,16,16]"]
    built = build_everything(make_config(*overrides), CPU)
    x, _ = built.data.train[0]
    out = built.model.eval()(x.unsqueeze(0))
    assert out.shape == (1, built.data.num_classes or 1)


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (64,)])
def test_the_mlp_computes_what_its_layers_in_turn_compute_and_keeps_their_numbers(input_shape):
    """MLP.forward flattens by itself rather than through its Flatten layer, which stays for the state dict's
    numbering: outputs and gradients are those of the plain Sequential, its state dict loads as it is, and it
    traces."""
    torch.manual_seed(0)
    mlp = MLP(input_shape, 10, hidden_sizes=[16, 12])
    sequential = torch.nn.Sequential(*[copy.deepcopy(layer) for layer in mlp])  # runs every layer, Flatten too
    x = torch.randn(5, *input_shape)
    ours, theirs = mlp(x), sequential(x)
    assert torch.equal(ours, theirs)
    ours.square().sum().backward(), theirs.square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(mlp.parameters(), sequential.parameters(), strict=True))
    assert list(mlp.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"]
    MLP(input_shape, 10, hidden_sizes=[16, 12]).load_state_dict(sequential.state_dict())  # strict
    # what tools built on torch.fx (quantization, feature extractors), TorchScript and torch.export need
    for traced in (torch.fx.symbolic_trace(mlp), torch.jit.script(mlp), torch.export.export(mlp, (x,)).module()):
        assert torch.equal(traced(x), theirs)


@pytest.mark.parametrize("optimizer", sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml")))
def test_optimizer_yaml_lists_real_arguments_with_torchs_defaults(make_config, optimizer):
    import inspect

    from hydra.utils import get_class

    cfg = make_config(f"optimizer={optimizer}").optimizer
    signature = inspect.signature(get_class(cfg._target_)).parameters
    for key, value in cfg.items():
        if key in ("_target_", "lr"):
            continue
        default = signature[key].default
        assert (list(default) if isinstance(default, tuple) else default) == value, f"{optimizer}.{key}"


def test_all_argument_problems_come_in_one_message():
    with pytest.raises(ConfigError) as caught:
        check_arguments("scheduler", torch.optim.lr_scheduler.StepLR, {"gama": 0.1, "optimizer": 1}, RESERVED)
    message = str(caught.value)
    assert "unknown argument gama" in message
    assert "optimizer is set by the runner" in message
    assert "missing required step_size" in message
    assert "Valid arguments: step_size, gamma." in message


def test_unimportable_target_is_a_clear_error(make_config):
    with pytest.raises(ConfigError, match=r"optimizer._target_='torch.optim.Nope' cannot be imported"):
        build_everything(make_config("optimizer._target_=torch.optim.Nope"), CPU)


def test_torch_refusing_an_argument_is_one_line(make_config):
    with pytest.raises(
        ConfigError,
        match=r"optimizer: torch.optim.adam.Adam refused its arguments: Invalid beta parameter at index 0: 1.5",
    ):
        build_everything(make_config("optimizer=adam", "optimizer.betas=[1.5,0.9]"), CPU)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scheduler=cosine", "scheduler.interval=batch"], "scheduler.interval='batch': use epoch"),
        (
            ["scheduler=plateau", "scheduler.monitor=val_acc"],
            "scheduler.monitor='val_acc': ReduceLROnPlateau can watch train_loss, val_loss, val_accuracy.",
        ),
        (
            ["scheduler=plateau", "scheduler.monitor=val_accuracy"],
            "scheduler.monitor=val_accuracy with scheduler.mode=min: the LR would be cut while val_accuracy improves; set scheduler.mode=max.",
        ),
        (
            ["scheduler=plateau", "+scheduler.interval=step"],
            "ReduceLROnPlateau steps on a validation metric, once per epoch",
        ),
        (["scheduler=cosine", "+scheduler.monitor=val_loss"], "scheduler.monitor is for ReduceLROnPlateau"),
        (
            ["scheduler=plateau", "scheduler.factor=1.5"],
            "scheduler.factor=1.5: ReduceLROnPlateau factor must be between 0 and 1.",
        ),
        (
            ["scheduler=cosine", "scheduler.warmup=5", "trainer.epochs=5"],
            "scheduler.warmup=5: the warm-up must be at least 1 step and shorter than the run (5 scheduler steps).",
        ),
        (["scheduler=onecycle", "+scheduler.total_steps=10"], "total_steps is set by the runner"),
        (
            [
                "scheduler=lambda",
                "scheduler.interval=step",
                "scheduler.lr_lambda='1 / (100 - step)'",
                "trainer.epochs=3",
            ],
            "fails at epoch=2, step=100",
        ),
    ],
)
def test_schedule_settings_are_refused_before_training(make_config, overrides, message):
    with pytest.raises(ConfigError) as caught:
        build_everything(make_config(*overrides), CPU)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "fingerprint"),
    [([], "e87d43c4cb6d435f"), (["scheduler=cosine", "optimizer=adam", "metrics=[accuracy,f1]"], "bb08aa4ed8dfe9a4")],
)
def test_settings_added_later_leave_the_fingerprints_of_earlier_runs_as_they_were(overrides, fingerprint):
    """Fingerprints of runner d41b8c5 (before trainer.monitor, early_stopping and gradient clipping): at their
    defaults the new settings stay out, so an unfinished run of the earlier version still resumes."""
    from hydra import compose, initialize_config_dir

    from runner.launch import RunSettings

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert RunSettings.of(compose("config", overrides=overrides)).fingerprint == fingerprint
        changed = RunSettings.of(compose("config", overrides=[*overrides, "trainer.early_stopping.patience=3"]))
    assert changed.fingerprint != fingerprint


def test_a_users_data_function_that_raises_is_their_error_not_refused_arguments(make_config, tmp_path, monkeypatch):
    """Hydra wraps whatever the target raises; an error inside the user's own function keeps its frames."""
    from runner.build import build_data
    from runner.errors import ConfigError, UserCodeError

    (tmp_path / "broken_data.py").write_text(
        "def load(seed):\n    return 1 / 0\n\n\ndef strict(seed, rows):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserCodeError, match="data: broken_data.load raised ZeroDivisionError: division by zero") as err:
        build_data(make_config("data=custom", "data._target_=broken_data.load"))
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    with pytest.raises(ConfigError, match=r"data \(broken_data.strict\): missing required rows"):
        build_data(make_config("data=custom", "data._target_=broken_data.strict"))
