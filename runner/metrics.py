"""The metrics a run logs, in one table: what each measures, which way is better, how ranks combine it.

Everything that needs a direction (a plateau scheduler's ``mode``, ``runner.compare``'s ranking) reads it
here instead of guessing from a name. Nothing here imports torch: ``runner.compare`` reads the table too.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.errors import ConfigError

# How a value is combined over DDP ranks: each rank's sum over its samples is summed over the ranks, then
# divided by the total number of samples (each sample counts once, whichever rank saw it).
SAMPLE_MEAN = "mean over samples"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    reduction: str
    description: str
    classification_only: bool = False

    @property
    def mode(self) -> str:
        """``max`` or ``min``: the word torch's ReduceLROnPlateau and most tools use for the direction."""
        return "max" if self.higher_is_better else "min"


METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("train_loss", False, SAMPLE_MEAN, "mean training loss over the epoch's steps"),
        Metric("val_loss", False, SAMPLE_MEAN, "mean loss over the validation split"),
        Metric(
            "val_accuracy", True, SAMPLE_MEAN, "share of validation samples whose top class is right", True
        ),
    )
}


def logged_metrics(classification: bool) -> list[str]:
    """The names a run of this kind logs every epoch (besides ``lr``)."""
    return [name for name, metric in METRICS.items() if classification or not metric.classification_only]


def metric(name: str, key: str = "metric") -> Metric:
    """The table's entry for ``name``.

    Raises:
        ConfigError: an unknown name, listing the known ones; ``key`` is the config key that named it.
    """
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"{key}={name!r} is not a metric the runner logs; use one of {', '.join(METRICS)}.") from None
