"""A user's own experiment from config: tables, image folders, losses, metrics and callbacks."""

from __future__ import annotations

import math
import re
import textwrap

import numpy as np
import pytest
import torch
import torchmetrics.functional as TMF
from conftest import metric_series, mlflow_runs

from runner.build import build_everything
from runner.errors import ConfigError
from runner.run import RunContext, run
from runner.train import Loop, direct_call

CPU = torch.device("cpu")


def write_table(path, rows: int = 120, seed: int = 0, species: bool = True):
    """A small iris-like table: four measurements, a species name and a float target."""
    rng = np.random.default_rng(seed)
    names = ["setosa", "versicolor", "virginica"]
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species,weight"]
    for i in range(rows):
        label = i % 3
        features = rng.normal(loc=[5 + label, 3 - 0.3 * label, 1.5 + 2 * label, 0.2 + label], scale=0.3)
        weight = 2.0 * features[0] - features[2] + rng.normal(scale=0.1)
        lines.append(",".join(f"{v:.3f}" for v in features) + f",{names[label] if species else label},{weight:.4f}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_csv_with_class_names_trains_a_classification_and_keeps_the_names(
    make_config, tracking_uri, experiment, tmp_path
):
    table = write_table(tmp_path / "iris.csv")
    cfg = make_config(
        "data=csv",
        f"data.path={table}",
        "data.target=species",
        "data.features=[sepal_length,sepal_width,petal_length,petal_width]",
        "trainer.epochs=15",
        "metrics=[accuracy,f1]",
    )
    built = build_everything(cfg, CPU)
    assert built.data.task == "classification" and built.data.classes == ["setosa", "versicolor", "virginica"]
    assert built.data.input_shape == (4,) and built.model(torch.zeros(2, 4)).shape == (2, 3)
    x_train = built.data.train.tensors[0]
    assert torch.allclose(x_train.mean(dim=0), torch.zeros(4), atol=1e-5)  # standardised on the training rows
    assert torch.allclose(x_train.std(dim=0, unbiased=False), torch.ones(4), atol=1e-4)
    run(cfg, RunContext(tmp_path / "run"))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert logged.data.tags["data.classes"] == "setosa,versicolor,virginica"
    assert metric_series(client, logged.info.run_id, "val_accuracy")[-1] > 0.9
    assert len(metric_series(client, logged.info.run_id, "val_f1")) == 15
    bundle = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert bundle["data"]["classes"] == ["setosa", "versicolor", "virginica"]
    assert bundle["data"]["fitted"]["features"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert set(bundle["data"]["fitted"]) >= {"mean", "std"}


@pytest.mark.slow
def test_a_csv_with_a_float_target_is_a_regression_with_its_metrics(make_config, tracking_uri, experiment, tmp_path):
    table = write_table(tmp_path / "iris.csv", species=False)
    cfg = make_config(
        "data=csv",
        f"data.path={table}",
        "data.target=weight",
        "model=linear",
        "trainer.epochs=30",
        "metrics=[mae,rmse,r2]",
        "trainer.batch_size=16",
    )
    run(cfg, RunContext(tmp_path / "run"))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert "val_accuracy" not in logged.data.metrics
    assert metric_series(client, logged.info.run_id, "val_r2")[-1] > 0.9
    rmse, mse = (
        metric_series(client, logged.info.run_id, "val_rmse")[-1],
        metric_series(client, logged.info.run_id, "val_loss")[-1],
    )
    assert rmse == pytest.approx(math.sqrt(mse), rel=1e-4)  # the loss is MSE: two routes to one number


def test_integer_labels_are_classes_and_data_task_decides_otherwise(make_config, tmp_path):
    table = write_table(tmp_path / "iris.csv", species=False)
    built = build_everything(make_config("data=csv", f"data.path={table}", "data.target=species"), CPU)
    assert built.data.task == "classification" and built.data.classes == ["0", "1", "2"]
    built = build_everything(
        make_config("data=csv", f"data.path={table}", "data.target=species", "data.task=regression", "model=linear"),
        CPU,
    )
    assert built.data.task == "regression" and built.data.train.tensors[1].dtype == torch.float32


def test_a_validation_file_is_used_as_given(make_config, tmp_path):
    train, val = write_table(tmp_path / "train.csv", rows=90), write_table(tmp_path / "val.csv", rows=30, seed=1)
    built = build_everything(
        make_config(
            "data=csv",
            f"data.path={train}",
            f"data.val_path={val}",
            "data.target=species",
        ),
        CPU,
    )
    assert len(built.data.train) == 90 and len(built.data.val) == 30


@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        ("a,b\n1,2\n", ["data.target=label"], "data.target='label': {path} has no such column; its columns are a, b."),
        (
            "a,b,label\n1,x,0\n2,y,1\n",
            ["data.target=label"],
            "data: feature column 'b' of {path} is not numeric; encode it as numbers, or leave it out by listing the features to use: data.features=[a].",
        ),
        (
            "",
            ["data.target=label"],
            "data.path={path}: the file is empty; it needs a header row and at least one data row.",
        ),
        (
            "a,b,label\n1,2,0\n3,,1\n",
            ["data.target=label"],
            "data: {path} has an empty or NaN cell in column 'b', data row 2 (line 3 of the file); fill it or drop that row.",
        ),
        ("a,b,label\n1,2,0\n3,nan,1\n", ["data.target=label"], "in column 'b', data row 2 (line 3 of the file)"),
        ("a,label\n1,0\n", ["data.target=label", "data.features=[a,c]"], "data.features: {path} has no column 'c'"),
    ],
)
def test_a_bad_table_is_one_line_naming_file_column_and_row(make_config, tmp_path, content, overrides, message):
    path = tmp_path / "table.csv"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        build_everything(make_config("data=csv", f"data.path={path}", *overrides), CPU)
    assert message.format(path=path) in str(caught.value)
    assert "\n" not in str(caught.value)


def make_image_folder(root, classes=("cat", "dog"), per_class=6, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 80 + 120 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_an_image_folder_trains_with_augmentation_on_the_training_split_only(
    make_config, tracking_uri, experiment, tmp_path
):
    root = make_image_folder(tmp_path / "images")
    cfg = make_config(
        "data=image_folder",
        f"data.root={root}",
        "data.image_size=8",
        "model=cnn",
        "trainer.batch_size=4",
        "data.val_fraction=0.25",
        "data.augment=[{_target_: torchvision.transforms.v2.RandomHorizontalFlip, p: 1.0}]",
    )
    built = build_everything(cfg, CPU)
    assert built.data.classes == ["cat", "dog"] and built.data.input_shape == (3, 8, 8)
    assert len(built.data.train) == 9 and len(built.data.val) == 3
    train_item, plain_item = built.data.train.dataset[0][0], built.data.val.dataset[0][0]
    assert torch.equal(train_item, plain_item.flip(-1)), "flipped for training, as it is for validation"
    run(cfg, RunContext(tmp_path / "run"))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    assert len(metric_series(client, logged.info.run_id, "val_accuracy")) == 2


def test_an_image_folder_with_train_and_val_folders_uses_them(make_config, tmp_path):
    make_image_folder(tmp_path / "images" / "train", per_class=4)
    make_image_folder(tmp_path / "images" / "val", per_class=2)
    built = build_everything(
        make_config("data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "model=cnn"), CPU
    )
    assert len(built.data.train) == 8 and len(built.data.val) == 4


def test_an_image_folder_with_a_test_folder_or_a_test_fraction_has_a_test_split(make_config, tmp_path):
    make_image_folder(tmp_path / "images" / "train", per_class=4)
    make_image_folder(tmp_path / "images" / "val", per_class=2)
    make_image_folder(tmp_path / "images" / "test", per_class=3)
    folders = make_config("data=image_folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "model=cnn")
    assert len(build_everything(folders, CPU).data.test) == 6
    root = make_image_folder(tmp_path / "flat", per_class=10)
    flat = ["data=image_folder", f"data.root={root}", "data.image_size=8", "model=cnn", "data.val_fraction=0.25"]
    without, held_out = (
        build_everything(make_config(*flat, *more), CPU).data for more in ([], ["data.test_fraction=0.25"])
    )
    assert without.test is None and len(held_out.test) == 5 and len(held_out.train) == len(without.train) - 5
    assert held_out.val.indices == without.val.indices, "a test split leaves the validation split as it was"
    assert not set(held_out.test.indices) & (set(held_out.train.indices) | set(held_out.val.indices))


def test_a_table_test_split_is_held_out_or_read_and_scaled_with_the_training_rows_statistics(make_config, tmp_path):
    path = write_table(tmp_path / "iris.csv")
    table = ["data=csv", f"data.path={path}", "data.target=species"]
    without = build_everything(make_config(*table), CPU).data
    held_out = build_everything(make_config(*table, "data.test_fraction=0.1"), CPU).data
    assert without.test is None and len(held_out.test) == 12 and len(held_out.train) == len(without.train) - 12
    assert torch.equal(held_out.val.tensors[1], without.val.tensors[1])
    test_path = write_table(tmp_path / "test.csv", rows=30, seed=1)
    read = build_everything(make_config(*table, f"data.test_path={test_path}"), CPU).data
    mean, std = read.fitted["mean"], read.fitted["std"]
    raw = torch.tensor(np.loadtxt(test_path, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3, 5), dtype=np.float32))
    torch.testing.assert_close(read.test.tensors[0], (raw - mean) / std)
    assert read.test.tensors[1].tolist() == [i % 3 for i in range(30)]  # the training table's class labels


def test_a_test_split_that_cannot_work_is_one_line(make_config, tmp_path):
    with pytest.raises(ConfigError, match="data.test_fraction=0.8 leaves no training samples"):
        build_everything(make_config("data.test_fraction=0.8"), CPU)
    with pytest.raises(ConfigError, match=r"data.test_fraction must be between 0 and 1 \(0: no test split\), got -0.1"):
        build_everything(make_config("data.test_fraction=-0.1"), CPU)
    path = write_table(tmp_path / "iris.csv")
    table = ["data=csv", f"data.path={path}", "data.target=species"]
    with pytest.raises(ConfigError, match="data.test_path and data.test_fraction both set"):
        build_everything(make_config(*table, f"data.test_path={path}", "data.test_fraction=0.1"), CPU)
    (tmp_path / "empty.csv").write_text(path.read_text().splitlines()[0] + "\n")
    with pytest.raises(ConfigError, match="data.test_path=.*empty.csv: the file is empty; it needs a header row and"):
        build_everything(make_config(*table, f"data.test_path={tmp_path / 'empty.csv'}"), CPU)


@pytest.mark.parametrize(
    ("classes", "per_class", "message"),
    [
        (("cat",), 2, "only one class folder ('cat'); a classification needs at least two"),
        ((), 0, "no images found"),
    ],
)
def test_an_image_folder_without_images_or_with_one_class_is_one_line(
    make_config, tmp_path, classes, per_class, message
):
    root = make_image_folder(tmp_path / "images", classes, per_class)
    if not classes:
        (root / "empty").mkdir(parents=True)  # a class folder without images
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_everything(make_config("data=image_folder", f"data.root={root}", "model=cnn"), CPU)


LOSSES = {
    "cross_entropy": (["loss.label_smoothing=0.1"], torch.nn.CrossEntropyLoss, {"label_smoothing": 0.1}),
    "mse": ([], torch.nn.MSELoss, {}),
    "l1": ([], torch.nn.L1Loss, {}),
    "huber": (["loss.delta=0.5"], torch.nn.HuberLoss, {"delta": 0.5}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_is_torchs_own_with_its_arguments_and_trains(make_config, tmp_path, name):
    overrides, kind, arguments = LOSSES[name]
    data = [] if name == "cross_entropy" else ["data=regression", "model=linear"]
    cfg = make_config(f"loss={name}", *overrides, *data)
    built = build_everything(cfg, CPU)
    assert type(built.loss) is kind and all(getattr(built.loss, k) == v for k, v in arguments.items())
    x, y = built.data.val.tensors
    outputs = built.model(x)
    assert torch.equal(built.loss(outputs, y), kind(**arguments)(outputs, y))
    assert math.isfinite(run(cfg, RunContext(tmp_path / "run")))


def test_torchs_own_loss_is_called_through_its_forward_and_any_other_as_it_is():
    """runner.train.direct_call skips nn.Module's call only where that changes nothing: a torch loss without hooks."""
    outputs, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    plain = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert direct_call(plain) == plain.forward
    assert torch.equal(Loop(*[None] * 5, loss_fn=plain, epochs=1).loss(outputs, targets), plain(outputs, targets))

    class Scaled(torch.nn.CrossEntropyLoss):  # the user's own subclass: may rely on being called as a module
        pass

    seen = []
    hooked = torch.nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda module, inputs, output: seen.append(output))
    for loss in (Scaled(), hooked, torch.nn.functional.cross_entropy):
        assert direct_call(loss) is loss
    Loop(*[None] * 5, loss_fn=hooked, epochs=1).loss(outputs, targets)
    assert len(seen) == 1  # the hook ran
    with torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None):
        assert direct_call(plain) is plain  # a hook on every module counts too


def test_cross_entropy_takes_class_weights_as_a_list(make_config):
    built = build_everything(make_config("loss=cross_entropy", f"loss.weight=[{','.join(['1.0'] * 9)},5.0]"), CPU)
    assert torch.equal(built.loss.weight, torch.tensor([1.0] * 9 + [5.0]))


@pytest.mark.slow
def test_bce_with_logits_trains_a_multi_label_data_function(make_config, tmp_path, monkeypatch):
    (tmp_path / "labels.py").write_text(
        textwrap.dedent("""
        import torch
        from torch.utils.data import TensorDataset

        def load(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(200, 6, generator=g)
            y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] < -0.5], dim=1).float()
            return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_config(
        "data=custom", "data._target_=labels.load", "+data.task=regression", "loss=bce_with_logits", "trainer.epochs=3"
    )
    built = build_everything(cfg, CPU)
    assert built.data.num_outputs == 3 and type(built.loss) is torch.nn.BCEWithLogitsLoss
    assert math.isfinite(run(cfg, RunContext(tmp_path / "run")))


def test_outputs_that_do_not_fit_the_loss_are_refused_naming_both_shapes(make_config):
    with pytest.raises(ConfigError) as caught:
        build_everything(make_config("loss=mse"), CPU)  # 10 class scores against class labels
    message = str(caught.value)
    assert (
        "loss (torch.nn.modules.loss.MSELoss) does not fit the model's outputs of shape (8, 10) and targets of shape (8,)"
        in message
    )
    assert "\n" not in message


@pytest.mark.slow
def test_a_users_loss_function_and_module_train(make_config, tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(
        textwrap.dedent("""
        import torch

        def smooth_l1(outputs, targets):
            return torch.nn.functional.smooth_l1_loss(outputs, targets)

        class Scaled(torch.nn.Module):
            def __init__(self, scale: float):
                super().__init__()
                self.scale = scale

            def forward(self, outputs, targets):
                return self.scale * torch.nn.functional.cross_entropy(outputs, targets)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    built = build_everything(make_config("data=regression", "model=linear", "loss._target_=my_losses.smooth_l1"), CPU)
    assert built.loss.__name__ == "smooth_l1"
    built = build_everything(make_config("loss._target_=my_losses.Scaled", "+loss.scale=2.0"), CPU)
    assert built.loss.scale == 2.0
    assert math.isfinite(
        run(make_config("loss._target_=my_losses.Scaled", "+loss.scale=2.0"), RunContext(tmp_path / "r"))
    )


NAMED = {
    "accuracy": lambda p, t: TMF.accuracy(p, t, task="multiclass", num_classes=10),
    "top5_accuracy": lambda p, t: TMF.accuracy(p, t, task="multiclass", num_classes=10, top_k=5),
    "balanced_accuracy": lambda p, t: TMF.accuracy(p, t, task="multiclass", num_classes=10, average="macro"),
    "f1": lambda p, t: TMF.f1_score(p, t, task="multiclass", num_classes=10, average="macro"),
    "precision": lambda p, t: TMF.precision(p, t, task="multiclass", num_classes=10, average="macro"),
    "recall": lambda p, t: TMF.recall(p, t, task="multiclass", num_classes=10, average="macro"),
    "mae": lambda p, t: TMF.mean_absolute_error(p, t),
    "mse": lambda p, t: TMF.mean_squared_error(p, t),
    "rmse": lambda p, t: TMF.mean_squared_error(p, t, squared=False),
    "r2": lambda p, t: TMF.r2_score(p, t),
}


def test_every_named_metric_is_covered():
    from runner.metrics import METRICS

    assert set(NAMED) == {name for name, m in METRICS.items() if m.torchmetric}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_each_named_metric_equals_torchmetrics_on_the_whole_split(make_config, name):
    """The runner's batched, on-device evaluation against one torchmetrics call on every output at once."""
    from runner.distributed import Distributed
    from runner.session import make_loop
    from runner.train import evaluate

    regression = name in ("mae", "mse", "rmse", "r2")
    data = ["data=regression", "model=linear"] if regression else []
    built = build_everything(make_config(f"metrics=[{name}]", *data), CPU)
    loop = make_loop(make_config(f"metrics=[{name}]", *data), built, Distributed(CPU))
    logged = evaluate(loop)
    x, y = built.data.val.tensors
    with torch.no_grad():
        outputs = built.model.eval()(x)
    if regression:
        outputs, y = outputs.squeeze(1), y.squeeze(1)
    assert logged[f"val_{name}"] == pytest.approx(float(NAMED[name](outputs, y)), rel=1e-5, abs=1e-7)
    assert set(logged) == {"val_loss", f"val_{name}"}


@pytest.mark.parametrize(
    ("overrides", "eval_batch", "val_batches"),
    [([], 128, 3), (["trainer.eval_batch_size=7"], 7, 52), (["trainer.eval_batch_size=500"], 500, 1)],
)
def test_validation_and_test_batches_are_eval_batch_size_and_the_scores_do_not_depend_on_it(
    make_config, overrides, eval_batch, val_batches
):
    """Four times the training batch by default (digits' 360 validation samples: 3 batches of 128, not 12 of 32);
    the loss and accuracy are those of the whole split at once, whatever the batches."""
    from runner.distributed import Distributed
    from runner.session import make_loop
    from runner.train import evaluate

    cfg = make_config("data.test_fraction=0.05", *overrides)
    built = build_everything(cfg, CPU)
    loop = make_loop(cfg, built, Distributed(CPU))
    assert (len(loop.train_batches), len(loop.val_batches), len(loop.test_batches)) == (
        math.ceil(len(built.data.train) / 32),
        val_batches,
        math.ceil(len(built.data.test) / eval_batch),
    )
    x, y = built.data.val.tensors
    with torch.no_grad():
        outputs = built.model.eval()(x)
    scores = evaluate(loop)
    assert scores["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(outputs, y)), rel=1e-6)
    assert scores["val_accuracy"] == pytest.approx(float((outputs.argmax(1) == y).float().mean()), abs=1e-7)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        (
            "[acuracy]",
            "metrics[0]='acuracy' is not a metric the runner knows; use one of loss, accuracy, top5_accuracy",
        ),
        ("[mae]", "metrics[0]=mae: not a metric for classification; use one of accuracy, top5_accuracy"),
        ("[accuracy,accuracy]", "metrics[1]: the metric 'accuracy' is listed twice."),
    ],
)
def test_an_unknown_or_misplaced_metric_is_one_line_listing_the_known_ones(make_config, metrics, message):
    with pytest.raises(ConfigError) as caught:
        build_everything(make_config(f"metrics={metrics}"), CPU)
    assert message in str(caught.value)


@pytest.mark.slow
def test_a_users_metric_function_and_torchmetrics_class_are_logged_with_their_direction(
    make_config, tracking_uri, experiment, tmp_path, monkeypatch
):
    (tmp_path / "my_metrics.py").write_text(
        textwrap.dedent("""
        def error_rate(outputs, targets):
            return (outputs.argmax(dim=1) != targets).float().mean()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = (
        "metrics=[accuracy,{name: error_rate, higher_is_better: false, _target_: my_metrics.error_rate},"
        "{name: kappa, _target_: torchmetrics.classification.MulticlassCohenKappa}]"
    )
    cfg = make_config(
        metrics, "scheduler=plateau", "scheduler.monitor=val_kappa", "scheduler.mode=max", "trainer.epochs=3"
    )
    built = build_everything(cfg, CPU)
    assert built.metrics.find("val_error_rate").higher_is_better is False
    assert built.metrics.find("val_kappa").higher_is_better is True  # the class's own higher_is_better
    run(cfg, RunContext(tmp_path / "run"))
    client, (logged,) = mlflow_runs(tracking_uri, experiment)
    accuracy = metric_series(client, logged.info.run_id, "val_accuracy")
    errors = metric_series(client, logged.info.run_id, "val_error_rate")
    assert errors == pytest.approx([1 - a for a in accuracy], abs=1e-6)
    assert len(metric_series(client, logged.info.run_id, "val_kappa")) == 3
    with pytest.raises(
        ConfigError, match="scheduler.monitor=val_kappa with scheduler.mode=min: .* set scheduler.mode=max"
    ):
        build_everything(make_config(metrics, "scheduler=plateau", "scheduler.monitor=val_kappa"), CPU)


@pytest.mark.slow
def test_the_readmes_own_data_example_runs_as_written(tmp_path):
    """The README's "Bring your own data": its file and its command, through bash, in an empty folder."""
    import subprocess

    from conftest import ROOT

    section = (ROOT / "README.md").read_text().split("### Bring your own data", 1)[1].split("\n### ", 1)[0]
    code, after = section.split("```python\n", 1)[1].split("```\n", 1)
    command = after.split("```\n", 2)[1].strip()
    assert code.startswith("# my_data.py\n") and command.startswith("python -m runner data=custom")
    (tmp_path / "my_data.py").write_text(code)
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if "epoch 30/30" in line]
    assert len(last) == 1 and float(last[0].split("val_accuracy ")[1].split()[0]) > 0.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data=csv"],
            "error: data.path, data.target must be set (??? in the config); add data.path=... data.target=... to the command.",
        ),
        (
            ["data=csv", "data.path=nowhere.csv", "data.target=y"],
            "error: data.path=nowhere.csv: no such file (relative paths are from where you run the command).",
        ),
        (["metrics=[acuracy]"], "error: metrics[0]='acuracy' is not a metric the runner knows; use one of"),
        (
            ["data=custom"],
            "error: data._target_ must be set (??? in the config); add data._target_=... to the command.",
        ),
        (["loss=mse"], "error: loss (torch.nn.modules.loss.MSELoss) does not fit the model's outputs of shape (8, 10)"),
    ],
)
@pytest.mark.slow
def test_bad_experiment_input_is_one_line_and_exit_2_before_training(tmp_path, overrides, message):
    from conftest import run_runner

    result = run_runner(
        *overrides, "trainer.progress_bar=false", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert message in error and "Traceback" not in result.stderr and "epoch 1/" not in result.stderr
