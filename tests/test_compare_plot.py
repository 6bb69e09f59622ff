"""``runner.compare``'s PNG: the real matplotlib Figure that ``draw`` saves, inspected panel by panel, and the curves
``read_curves`` reads back from a real SQLite MLflow store."""

from __future__ import annotations

import math

import matplotlib.colors
import matplotlib.image
import pytest
from conftest import seed_store

from runner.compare import RunCurves, draw, read_curves, style

EPOCHS = 30


def make_runs(count: int, epochs: int = EPOCHS, accuracy: bool = True, label: str = "") -> list[RunCurves]:
    """SGD (lr 0.1) and Adam (lr 1e-3) alternating, a step schedule (x0.1 every 10 epochs) on every third run;
    runs i and i+6 have the same losses, so their curves coincide."""
    runs = []
    for i in range(count):
        lr = 0.1 if i % 2 == 0 else 1e-3
        loss = [2.3 * math.exp(-(e + 1) * (0.05 + 0.02 * (i % 6))) + 0.05 for e in range(epochs)]
        run = RunCurves(str(i), f"run{i}", [f"seed={i}"], "step", "sgd" if i % 2 == 0 else "adam", "FINISHED")
        run.label = f"seed={i}{label}"
        run.curves = {
            "lr": [lr * (0.1 ** (e // 10) if i % 3 == 0 else 1) for e in range(epochs)],
            "train_loss": [0.9 * v for v in loss],
            "val_loss": loss,
        }
        if accuracy:
            run.curves["val_accuracy"] = [1 - v / 2.4 for v in loss]
        runs.append(run)
    return runs


def panel(figure, title: str):
    found = [axis for axis in figure.axes if axis.get_title() == title]
    assert len(found) == 1, [axis.get_title() for axis in figure.axes]
    return found[0]


def triple(line) -> tuple[str, str, str]:
    return matplotlib.colors.to_hex(line.get_color()), line.get_linestyle(), str(line.get_marker())


def test_the_png_is_written_with_one_panel_per_logged_metric(tmp_path):
    path = tmp_path / "cmp.png"
    figure = draw(make_runs(12), path, "12 runs")

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 2 * height > 600
    assert [axis.get_title() for axis in figure.axes] == [
        "learning rate",
        "training loss",
        "validation loss",
        "validation accuracy",
    ]
    for axis in figure.axes:
        assert axis.get_xlabel() == "epoch"
        assert axis.get_ylabel(), axis.get_title()
        assert len(axis.get_lines()) == 12, axis.get_title()
    training = panel(figure, "training loss")
    assert training.get_ylabel() == "loss (log scale)" and training.get_yscale() == "log"
    assert list(training.get_lines()[0].get_ydata()) == make_runs(1)[0].curves["train_loss"]


def test_a_panel_is_left_out_when_no_run_logged_its_metric(tmp_path):
    figure = draw(make_runs(3, accuracy=False), tmp_path / "regression.png", "regression")
    assert [axis.get_title() for axis in figure.axes] == ["learning rate", "training loss", "validation loss"]


def test_the_lr_is_on_a_log_axis_and_held_through_each_epoch(tmp_path):
    figure = draw(make_runs(12), tmp_path / "cmp.png", "12 runs")
    axis = panel(figure, "learning rate")
    assert axis.get_yscale() == "log"
    assert axis.get_ylabel() == "learning rate (log scale)"

    adam, sgd = axis.get_lines()[1:3]  # constant 1e-3 and constant 0.1
    assert all(line.get_drawstyle() == "steps-post" for line in axis.get_lines())
    # epoch k's LR is held from x=k to x=k+1: the last epoch gets its width too, as in runner.preview
    assert list(sgd.get_xdata()) == list(range(1, EPOCHS + 2))
    assert list(sgd.get_ydata()) == [0.1] * (EPOCHS + 1)
    # Adam's 1e-3 sits two decades below SGD's 0.1, not flat on zero: a third of the panel's height or more apart
    to_pixels = axis.transData.transform
    gap = to_pixels((1, 0.1))[1] - to_pixels((1, 1e-3))[1]
    assert gap > axis.get_window_extent().height / 3
    assert list(adam.get_ydata()) == [1e-3] * (EPOCHS + 1)


def test_an_lr_sampled_per_epoch_from_a_per_batch_schedule_is_joined_not_held(tmp_path):
    runs = make_runs(2)
    runs[1].lr_per_batch = True  # e.g. OneCycleLR: `lr` is each epoch's first step, the LR moves in between
    runs[1].curves["lr"] = [0.004, 0.1, 0.05, 0.001]
    axis = panel(draw(runs, tmp_path / "cmp.png", "two"), "learning rate")
    held, sampled = axis.get_lines()
    assert held.get_drawstyle() == "steps-post"
    assert sampled.get_drawstyle() == "default"
    assert list(sampled.get_xdata()) == [1, 2, 3, 4] and list(sampled.get_ydata()) == [0.004, 0.1, 0.05, 0.001]


@pytest.mark.parametrize("count", [12, 30])
def test_every_run_has_its_own_colour_line_style_and_marker(tmp_path, count):
    runs = make_runs(count)
    figure = draw(runs, tmp_path / "cmp.png", "many")
    for axis in figure.axes:
        styles = [triple(line) for line in axis.get_lines()]
        assert len(set(styles)) == count, axis.get_title()
    lines = figure.axes[0].get_lines()
    assert len({matplotlib.colors.to_hex(line.get_color()) for line in lines}) == 10
    # Runs that share a colour differ in the line itself, not only in markers a few epochs apart
    for a in lines:
        for b in lines:
            if a is not b and a.get_color() == b.get_color():
                assert a.get_linestyle() != b.get_linestyle()
    # The legend shows each run as it is drawn
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [run.label for run in runs]
    assert [triple(handle) for handle in legend.legend_handles] == [triple(line) for line in figure.axes[2].get_lines()]
    assert len({tuple(sorted(style(i).items())) for i in range(70)}) == 70


def test_coinciding_curves_stay_visible(tmp_path):
    runs = make_runs(8)
    runs[1].curves = runs[0].curves  # e.g. two schedules that differ only after the last epoch
    axis = panel(draw(runs, tmp_path / "cmp.png", "eight"), "validation loss")
    first, twin = axis.get_lines()[:2]
    assert first.get_marker() != twin.get_marker()
    assert first.get_fillstyle() == twin.get_fillstyle() == "none", "hollow: the marker beneath shows through"

    def marked_epochs(line) -> set[float]:
        start, every = line.get_markevery()
        return set(line.get_xdata()[start::every])

    assert marked_epochs(first) and marked_epochs(twin)
    assert not marked_epochs(first) & marked_epochs(twin), "their markers fall on different epochs"
    zorders = [line.get_zorder() for line in axis.get_lines()]
    assert zorders == sorted(zorders, reverse=True) and len(set(zorders)) == 8, "the best-ranked run on top"


@pytest.mark.parametrize(("count", "label"), [(4, ""), (30, " optimizer=adam scheduler=cosine"), (3, " x" * 120)])
def test_the_legend_lies_outside_the_panels_and_the_figure_grows_to_hold_it(tmp_path, count, label):
    figure = draw(make_runs(count, label=label), tmp_path / "cmp.png", "legend")
    figure.draw_without_rendering()  # the layout, as savefig made it
    legend = figure.legends[0].get_window_extent()
    whole = figure.bbox
    assert whole.x0 <= legend.x0 and legend.x1 <= whole.x1 and whole.y0 <= legend.y0 and legend.y1 <= whole.y1
    for axis in figure.axes:
        assert not legend.overlaps(axis.get_window_extent()), axis.get_title()
        assert axis.get_window_extent().height > 2.5 * figure.dpi, "the panels keep their height"


def test_the_figure_grows_with_the_legend(tmp_path):
    few = draw(make_runs(2), tmp_path / "few.png", "few").get_size_inches()
    many = draw(make_runs(30, label=" optimizer=adam"), tmp_path / "many.png", "many").get_size_inches()
    long = draw(make_runs(2, label=" x" * 150), tmp_path / "long.png", "long").get_size_inches()
    assert many[1] > few[1] and many[0] == few[0]
    assert long[0] > few[0]


def test_read_curves_reads_each_panel_metric_by_step_from_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seed_store([f"tracking.uri={uri}"])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("plot")).info.run_id
    client.log_param(run_id, "scheduler.interval", "step")
    client.set_tag(run_id, "overrides", "model=linear data=regression")
    for epoch in reversed(range(3)):  # logged out of order: read back by step
        for key, value in {"lr": 0.1 / (epoch + 1), "train_loss": 3.0 - epoch, "val_loss": 4.0 - epoch}.items():
            client.log_metric(run_id, key, value, step=epoch)
    client.log_metric(run_id, "lr_step", 0.05, step=7)

    curves = read_curves(client, client.get_run(run_id))
    assert curves.curves == {"lr": [0.1, 0.05, 0.1 / 3], "train_loss": [3.0, 2.0, 1.0], "val_loss": [4.0, 3.0, 2.0]}
    assert curves.lr_per_batch and curves.overrides == ["model=linear", "data=regression"]
    figure = draw([curves], tmp_path / "one.png", "one")
    assert [axis.get_title() for axis in figure.axes] == ["learning rate", "training loss", "validation loss"]
    assert figure.axes[0].get_lines()[0].get_drawstyle() == "default"
