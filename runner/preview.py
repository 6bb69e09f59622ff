"""``python -m runner.preview overrides…``: the LR of every epoch, as a table and a plot, without training.

    python -m runner.preview scheduler=cosine optimizer.lr=0.1
    python -m runner.preview -m scheduler=constant,linear,cosine,warmup_cosine trainer.epochs=30
    python -m runner.preview scheduler=onecycle --steps-per-epoch 100 --out onecycle.png

The config is composed from conf/ exactly as ``python -m runner`` composes it (``-m`` sweeps the same way) and
the schedule is driven through the whole run on a throw-away parameter, so what is previewed is what trains,
and a schedule that would fail at some epoch fails here, in one line. No data is built unless the schedule
counts batches (``interval: step`` or ``step`` in a lambda) and ``--steps-per-epoch`` is not given.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RunnerError, full_traceback_wanted, is_config_error, report_error

log = logging.getLogger("runner.preview")
CONF = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class Preview:
    overrides: list[str]
    epoch_lrs: list[float]  # group 0, at the start of each epoch
    step_lrs: list[float]  # group 0, at every scheduler step (== epoch_lrs when stepped per epoch)
    steps_per_epoch: int
    label: str = ""
    note: str = ""  # ReduceLROnPlateau depends on the metric: the preview shows its fastest decay


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """``a=1,2 b=x`` -> ``[[a=1, b=x], [a=2, b=x]]``: Hydra's own override grammar, as ``-m`` expands it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                raise RunnerError(f"{key}: only lists of values (a,b,c) can be previewed, not ranges or intervals.")
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices)]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from runner.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def counts_batches(cfg) -> bool:
    expression = str(cfg.scheduler.get("lr_lambda", ""))
    return cfg.scheduler.get("interval", "epoch") == "step" or "step" in expression


def preview(overrides: list[str], steps_per_epoch: int | None) -> Preview:
    """Run the configured schedule through every epoch (and batch) of the configured run."""
    from runner.build import build_data, check_before_data, optimizer_builder
    from runner.config import check_settings
    from runner.data import steps_per_epoch as count_steps
    from runner.schedules import check_schedule, plan_schedule

    cfg = compose(overrides)
    check_settings(cfg)
    check_before_data(cfg)
    if steps_per_epoch is None and counts_batches(cfg):
        trainer = cfg.trainer
        steps_per_epoch = count_steps(
            len(build_data(cfg).train), trainer.batch_size, 1, trainer.accumulate_grad_batches
        )
        log.info(f"{steps_per_epoch} steps per epoch, counted from the data (--steps-per-epoch N skips that)")
    plan = plan_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch or 1)
    step_lrs: list[float] = []
    epoch_lrs = [lrs[0] for lrs in check_schedule(plan, optimizer_builder(cfg), step_lrs)]
    result = Preview(overrides, epoch_lrs, step_lrs, plan.steps_per_epoch if plan.stepped_per_batch else 1)
    result.note = f" (if {plan.monitor} never improves)" if plan.monitor else ""
    return result


def label_previews(previews: list[Preview]) -> None:
    from runner.compare import distinguishing_overrides

    for p, own in zip(previews, distinguishing_overrides([p.overrides for p in previews]), strict=True):
        p.label = (own or " ".join(p.overrides) or "defaults") + p.note


def table(previews: list[Preview]) -> str:
    header = ["epoch", *(p.label if len(previews) > 1 else "lr" for p in previews)]
    epochs = max(len(p.epoch_lrs) for p in previews)
    rows = [
        [str(e + 1), *(f"{p.epoch_lrs[e]:.6g}" if e < len(p.epoch_lrs) else "" for p in previews)]
        for e in range(epochs)
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in [header, *rows]
    )


def draw(previews: list[Preview], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10 if len(previews) > 1 else 8, 4.5))
    for p in previews:
        xs = [1 + i / p.steps_per_epoch for i in range(len(p.step_lrs))]  # epoch 1 starts at x=1
        ys = list(p.step_lrs)
        if p.steps_per_epoch == 1:  # one LR per epoch: draw it across the whole epoch, the last one included
            xs, ys = [*xs, xs[-1] + 1], [*ys, ys[-1]]
        axis.plot(xs, ys, label=p.label, linewidth=1.8, drawstyle="steps-post" if p.steps_per_epoch == 1 else "default")
    axis.set_xlabel("epoch")
    axis.set_ylabel("learning rate")
    axis.set_title("learning-rate schedule" + ("s" if len(previews) > 1 else f": {previews[0].label}"))
    axis.grid(alpha=0.3)
    if len(previews) > 1:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m runner")
    parser.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated values, one curve each")
    parser.add_argument(
        "--out", type=Path, default=Path("schedule.png"), help="the PNG to write (default: schedule.png)"
    )
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help="batches per epoch, for schedules that count them"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        jobs = expand_sweep(args.overrides)
        if len(jobs) > 1 and not args.multirun:
            raise RunnerError("comma-separated values sweep: add -m to preview every combination.")
        previews = [preview(job, args.steps_per_epoch) for job in jobs]
    except Exception as err:  # ours, and Hydra's own config errors (unknown group option, bad override)
        if not is_config_error(err) or full_traceback_wanted():
            raise
        return report_error(err)
    label_previews(previews)
    draw(previews, args.out)
    print(table(previews))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
