"""``python -m runner.compare``: read runs back from MLflow, overlay their curves, rank them.

    python -m runner.compare                      # every run of experiment "runner"
    python -m runner.compare my-experiment
    python -m runner.compare --sweep 80dd6d9cb31c # the jobs of one sweep (tag sweep_id), in any experiment
    python -m runner.compare --runs ID ID ...

Writes PREFIX.png (LR, train_loss, val_loss and val_accuracy per epoch, those the runs logged, one line per run,
labelled by the overrides that set it apart), PREFIX.csv and PREFIX.md (the ranking), and prints the ranking.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from runner.errors import ConfigError, RunnerError, full_traceback_wanted, report_error
from runner.metrics import METRICS, metric
from runner.tracking import PARENT_TAG

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class Curve(NamedTuple):
    """A panel of the PNG: one metric logged per epoch (MLflow step = epoch index)."""

    key: str
    title: str
    ylabel: str
    log: bool  # LRs and losses span decades: Adam's 1e-3 beside SGD's 0.1, a loss falling 100-fold


CURVES = (
    Curve("lr", "learning rate", "learning rate (log scale)", True),
    Curve("train_loss", "training loss", "loss (log scale)", True),
    Curve("val_loss", "validation loss", "loss (log scale)", True),
    Curve("val_accuracy", "validation accuracy", "accuracy", False),
)
# Colours repeat after ten; markers (seven: coprime with ten) and a dash pattern per ten runs keep every run's
# (colour, line style, marker) distinct, and hollow markers at staggered epochs keep coinciding curves visible.
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
SORT_KEYS = tuple(f"{kind}_{name}" for name in METRICS if name.startswith("val_") for kind in ("final", "best"))


@dataclass
class RunCurves:
    """One MLflow run as the comparison needs it."""

    run_id: str
    name: str
    overrides: list[str]
    scheduler: str
    optimizer: str
    status: str
    curves: dict[str, list[float]] = field(default_factory=dict)  # metric -> value per epoch
    label: str = ""
    lr_per_batch: bool = False  # the schedule steps every batch: `lr` is sampled at each epoch's start, not held

    def final(self, key: str) -> float:
        values = self.curves.get(key)
        return values[-1] if values else math.nan

    def best(self, key: str) -> float:
        values = [v for v in self.curves.get(key, []) if not math.isnan(v)]
        if not values:
            return math.nan
        return max(values) if metric(key).higher_is_better else min(values)

    def best_epoch(self, key: str) -> int | None:
        values = self.curves.get(key, [])
        best = self.best(key)
        return values.index(best) + 1 if values and not math.isnan(best) else None

    def row(self) -> dict[str, object]:
        return {
            "run": self.label,
            "scheduler": self.scheduler,
            "optimizer": self.optimizer,
            "final_val_loss": self.final("val_loss"),
            "best_val_loss": self.best("val_loss"),
            "best_epoch": self.best_epoch("val_loss"),
            "final_val_accuracy": self.final("val_accuracy"),
            "best_val_accuracy": self.best("val_accuracy"),
            "epochs": len(self.curves.get("val_loss", [])),
            "status": self.status,
            "run_id": self.run_id,
        }


def select_runs(client, experiment: str | None, sweep: str | None, run_ids: list[str] | None) -> list:
    """The MLflow runs asked for, or ConfigError in one line when there are none."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException:
                raise ConfigError(f"no MLflow run {run_id} in {client.tracking_uri}.") from None
        for run in runs:
            if PARENT_TAG in run.data.tags:
                sweep = run.data.tags[PARENT_TAG]
                raise ConfigError(
                    f"MLflow run {run.info.run_id} stands for sweep {sweep}, not one training run: compare its "
                    f"jobs with --sweep {sweep}."
                )
        return runs
    if sweep:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(experiment_ids, filter_string=f"tags.sweep_id = '{sweep}'", max_results=5000)
            if experiment_ids
            else []
        )
        if not runs:
            raise ConfigError(
                f"no runs tagged sweep_id={sweep} in {client.tracking_uri}; the tag is in each run's MLflow tags."
            )
        return runs
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ConfigError(f"no MLflow experiment {experiment!r} in {client.tracking_uri} (experiments there: {names}).")
    runs = client.search_runs([found.experiment_id], max_results=5000)
    runs = [run for run in runs if PARENT_TAG not in run.data.tags]  # a sweep's own run: its jobs are its children
    if not runs:
        raise ConfigError(f"MLflow experiment {experiment!r} in {client.tracking_uri} has no runs.")
    return runs


def read_curves(client, run) -> RunCurves:
    tags, params = run.data.tags, run.data.params
    overrides = tags.get("overrides", "")
    result = RunCurves(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        overrides=[] if overrides in ("", "(none)") else overrides.split(" "),
        scheduler=tags.get("scheduler") or params.get("scheduler._target_", "?").rsplit(".", 1)[-1],
        optimizer=tags.get("optimizer") or params.get("optimizer._target_", "?").rsplit(".", 1)[-1],
        status=run.info.status,
        lr_per_batch=params.get("scheduler.interval") == "step",
    )
    # Not `lr_step` (logged with tracking.log_every_n_steps): its steps are optimizer steps, and MLflow holds
    # nothing that maps them onto epochs exactly (batches per epoch, gradient accumulation, resumed runs).
    for curve in CURVES:
        if curve.key in run.data.metrics:
            history = sorted(client.get_metric_history(run.info.run_id, curve.key), key=lambda m: m.step)
            result.curves[curve.key] = [m.value for m in history]
    return result


def distinguishing_overrides(override_lists: list[list[str]]) -> list[str]:
    """For each list, the overrides that set it apart, joined ("" when none): those all share say nothing in a
    legend."""
    shared = set.intersection(*(set(overrides) for overrides in override_lists)) if override_lists else set()
    return [" ".join(o for o in overrides if o not in shared) for overrides in override_lists]


def label_runs(runs: list[RunCurves]) -> None:
    for run, own in zip(runs, distinguishing_overrides([r.overrides for r in runs]), strict=True):
        run.label = own or run.name


def rank(runs: list[RunCurves], sort_key: str) -> list[RunCurves]:
    descending = metric(sort_key.split("_", 1)[1]).higher_is_better  # final_val_loss -> val_loss

    def key(run: RunCurves) -> tuple[bool, float]:
        value = run.row()[sort_key]
        missing = value is None or math.isnan(value)
        return missing, 0.0 if missing else (-value if descending else value)

    return sorted(runs, key=key)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def table_rows(runs: list[RunCurves]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", *runs[0].row().keys()]
    return header, [[str(i), *(format_value(v) for v in run.row().values())] for i, run in enumerate(runs, start=1)]


def as_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def as_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def style(index: int) -> dict[str, object]:
    """The index-th run's colour, line style and marker: a triple no other run of the first 70 has."""
    return {
        "color": f"C{index % 10}",
        "linestyle": LINE_STYLES[index // 10 % len(LINE_STYLES)],
        "marker": MARKERS[index % len(MARKERS)],
        "fillstyle": "none",  # hollow: a marker on top leaves the one beneath it visible
    }


def legend_columns(labels: list[str], width: float) -> tuple[int, float]:
    """Columns of a legend below a figure ``width`` inches wide, and the width (grown if one column is wider)."""
    column = 0.8 + 0.065 * max(len(label) for label in labels)  # handle and gaps, then ~0.065" a character
    fit = max(1, min(len(labels), int(width // column)))
    rows = -(-len(labels) // fit)
    return -(-len(labels) // rows), max(width, column + 0.5)  # as many columns as the rows need: balanced


def draw(runs: list[RunCurves], path: Path, title: str) -> Figure:
    """Draw one panel per metric any run logged, save it to ``path`` and return the matplotlib Figure."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure to close
    from matplotlib.lines import Line2D

    shown = [curve for curve in CURVES if any(curve.key in r.curves for r in runs)]
    if not shown:
        raise ConfigError(f"none of the {len(runs)} run(s) logged {', '.join(c.key for c in CURVES)}: nothing to draw.")
    labels = [run.label for run in runs]
    columns, width = legend_columns(labels, 4.6 * len(shown))
    rows = -(-len(labels) // columns)
    # layout="constrained" makes room for a legend placed "outside": the panels keep their height as it grows
    figure = Figure(figsize=(width, 4.0 + 0.22 * rows), dpi=110, layout="constrained")
    for axis, curve in zip(figure.subplots(1, len(shown), squeeze=False)[0], shown, strict=True):
        for index, run in enumerate(runs):
            values = run.curves.get(curve.key)
            if not values:
                continue
            epochs = list(range(1, len(values) + 1))
            held = curve.key == "lr" and not run.lr_per_batch
            if held:  # one LR for the whole epoch: a step from its start to the next, the last epoch's included
                epochs, values = [*epochs, epochs[-1] + 1], [*values, values[-1]]
            every = max(1, len(values) // 10)
            axis.plot(
                epochs,
                values,
                drawstyle="steps-post" if held else "default",
                markevery=(index % every, every),  # staggered: coinciding runs show their markers side by side
                markersize=5,
                linewidth=1.5,
                zorder=3 - index / len(runs),  # the best-ranked on top
                label=run.label,
                **style(index),
            )
        axis.set(title=curve.title, xlabel="epoch", ylabel=curve.ylabel, yscale="log" if curve.log else "linear")
        axis.grid(alpha=0.3)
    # Proxy handles: every run is listed even where a panel lacks it, without the plotted lines' markevery
    handles = [Line2D([], [], linewidth=1.5, markersize=5, **style(i)) for i in range(len(runs))]
    figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small", frameon=False)
    figure.suptitle(title)
    figure.savefig(path, dpi=110, bbox_inches="tight")  # tight: a label longer than guessed is not cut off
    return figure


def compare(
    uri: str | None, experiment: str | None, sweep: str | None, run_ids: list[str] | None, out: Path, sort_key: str
) -> str:
    """Write out.png, out.csv and out.md; return the ranking as text."""
    from runner.tracking import open_client

    client = open_client(uri)
    runs = [read_curves(client, run) for run in select_runs(client, experiment, sweep, run_ids)]
    label_runs(runs)
    runs = rank(runs, sort_key)
    header, rows = table_rows(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[i, *run.row().values()] for i, run in enumerate(runs, start=1)])
    out.with_suffix(".md").write_text(as_markdown(header, rows), encoding="utf-8")
    title = f"sweep {sweep}" if sweep else f"experiment {experiment}" if not run_ids else f"{len(runs)} runs"
    draw(runs, out.with_suffix(".png"), title)
    return as_text(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", default="runner", help="MLflow experiment name (default: runner)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep", help="the sweep_id tag of a multirun's jobs")
    which.add_argument("--runs", nargs="+", metavar="RUN_ID", help="these MLflow run ids")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("comparison"), help="path prefix of the .png/.csv/.md (default: comparison)"
    )
    parser.add_argument(
        "--sort", choices=SORT_KEYS, default="final_val_loss", help="ranking order (default: final_val_loss)"
    )
    args = parser.parse_args(argv)
    try:
        text = compare(args.tracking_uri, args.experiment, args.sweep, args.runs, args.out, args.sort)
    except RunnerError as err:
        if full_traceback_wanted():
            raise
        return report_error(err)
    print(text)
    print(f"\nwrote {args.out.with_suffix('.png')}, {args.out.with_suffix('.csv')}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
