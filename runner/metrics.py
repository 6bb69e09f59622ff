"""The metrics a run can log, in one table: how each is computed, which way is better, how ranks combine it.

Everything that needs a direction (a plateau scheduler's ``mode``, ``runner.compare``'s ranking, a callback
watching a metric) reads it here instead of guessing from a name. The named metrics are torchmetrics classes:
they accumulate on the device with ``update()`` (no host sync per batch) and sum their states over the DDP
ranks in ``compute()``. Each is logged per split: ``val_accuracy``, ``test_f1``. The table itself imports
neither torch nor torchmetrics, so ``runner.compare`` reads it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runner.errors import ConfigError

# How a value is combined over DDP ranks.
SAMPLE_MEAN = "mean over samples (sums and counts added over the ranks)"
FROM_SUMMED_COUNTS = "computed from counts added over the ranks"
FROM_SUMMED_MOMENTS = "computed from sums and sums of squares added over the ranks"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    reduction: str
    description: str
    task: str | None = None  # classification | regression | None: any
    torchmetric: str | None = None  # the torchmetrics class that computes it (None: the runner's own, the losses)
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        """``max`` or ``min``: the word torch's ReduceLROnPlateau and most tools use for the direction."""
        return "max" if self.higher_is_better else "min"

    def build(self, num_classes: int | None):
        """The torchmetrics object for one evaluation pass.

        Classification metrics are built with ``validate_args=False``: their input checks sync with the host on
        every batch.
        """
        if self.torchmetric == COUNTED_ACCURACY:
            return CountedAccuracy()
        from hydra.utils import get_class

        arguments = dict(self.arguments)
        if self.task == "classification":
            arguments.update(num_classes=num_classes, validate_args=False)
        return get_class(self.torchmetric)(**arguments)


_CLASSIFICATION = "torchmetrics.classification."
# The default metric, counted by the runner itself: the same number as torchmetrics' MulticlassAccuracy (micro),
# without importing torchmetrics (about a second at start-up) or a sync of its own per evaluation.
COUNTED_ACCURACY = "runner.metrics.CountedAccuracy"
_REGRESSION = "torchmetrics.regression."
METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("loss", False, SAMPLE_MEAN, "the loss, averaged over the split's samples (train_loss, val_loss)"),
        Metric(
            "accuracy",
            True,
            FROM_SUMMED_COUNTS,
            "share of samples whose top class is right",
            "classification",
            COUNTED_ACCURACY,
        ),
        Metric(
            "top5_accuracy",
            True,
            FROM_SUMMED_COUNTS,
            "share of samples whose class is among the top 5",
            "classification",
            _CLASSIFICATION + "MulticlassAccuracy",
            {"average": "micro", "top_k": 5},
        ),
        Metric(
            "balanced_accuracy",
            True,
            FROM_SUMMED_COUNTS,
            "recall averaged over classes",
            "classification",
            _CLASSIFICATION + "MulticlassAccuracy",
            {"average": "macro"},
        ),
        Metric(
            "f1",
            True,
            FROM_SUMMED_COUNTS,
            "F1 score, macro-averaged over classes",
            "classification",
            _CLASSIFICATION + "MulticlassF1Score",
            {"average": "macro"},
        ),
        Metric(
            "precision",
            True,
            FROM_SUMMED_COUNTS,
            "precision, macro-averaged over classes",
            "classification",
            _CLASSIFICATION + "MulticlassPrecision",
            {"average": "macro"},
        ),
        Metric(
            "recall",
            True,
            FROM_SUMMED_COUNTS,
            "recall, macro-averaged over classes",
            "classification",
            _CLASSIFICATION + "MulticlassRecall",
            {"average": "macro"},
        ),
        Metric("mae", False, SAMPLE_MEAN, "mean absolute error", "regression", _REGRESSION + "MeanAbsoluteError"),
        Metric("mse", False, SAMPLE_MEAN, "mean squared error", "regression", _REGRESSION + "MeanSquaredError"),
        Metric(
            "rmse",
            False,
            SAMPLE_MEAN,
            "root mean squared error",
            "regression",
            _REGRESSION + "MeanSquaredError",
            {"squared": False},
        ),
        Metric("r2", True, FROM_SUMMED_MOMENTS, "coefficient of determination", "regression", _REGRESSION + "R2Score"),
    )
}
# What a run logs when the config names no metrics (metrics: null), by task.
DEFAULT_METRICS = {"classification": ["accuracy"], "regression": []}


def split_and_metric(logged: str) -> tuple[str | None, str]:
    """``val_accuracy`` -> (``val``, ``accuracy``); a name without a split prefix -> (None, name)."""
    split, _, rest = logged.partition("_")
    return (split, rest) if split in SPLITS and rest else (None, logged)


def metric(name: str, key: str = "metric", known: dict[str, Metric] | None = None) -> Metric:
    """The table's entry for ``name`` (``accuracy`` or a logged name such as ``val_accuracy``).

    Raises:
        ConfigError: an unknown name, listing the known ones; ``key`` is the config key that named it.
    """
    table = METRICS | (known or {})
    found = table.get(name) or table.get(split_and_metric(name)[1])
    if found is None:
        raise ConfigError(f"{key}={name!r} is not a metric the runner knows; use one of {', '.join(table)}.")
    return found


def logged_names(metrics: list[Metric], split: str = "val") -> list[str]:
    """What a run logs every epoch for these metrics, the losses first."""
    return ["train_loss", f"{split}_loss", *(f"{split}_{m.name}" for m in metrics)]


@dataclass
class RunMetrics:
    """The metrics one run computes on its evaluation splits: their entries (the table's, or the user's own, with
    the direction they were given) and the torchmetrics objects that compute them."""

    entries: dict[str, Metric]
    computers: dict[str, Any]  # name -> torchmetrics.Metric

    def logged(self, split: str = "val") -> list[str]:
        return logged_names(list(self.entries.values()), split)

    def find(self, logged: str, key: str = "metric") -> Metric:
        """The entry for a logged name (``val_f1``, ``train_loss``), the user's own metrics included."""
        return metric(logged, key, known=self.entries)


def monitor_direction(monitor: str, mode: str | None, metrics: RunMetrics) -> bool:
    """Whether higher is better for ``trainer.monitor``.

    Raises:
        ConfigError: the monitor is not a value the run logs each epoch, or the mode is neither min nor max.
    """
    logged = metrics.logged("val")
    if monitor not in logged:
        raise ConfigError(f"trainer.monitor={monitor!r} is not logged by this run; use one of {', '.join(logged)}.")
    if mode is None:
        return metrics.find(monitor, "trainer.monitor").higher_is_better
    if mode not in ("min", "max"):
        raise ConfigError(f"trainer.monitor_mode={mode!r}: use min, max, or null (the metric's own direction).")
    return mode == "max"


def build_run_metrics(nodes: Any, task: str, num_classes: int | None) -> RunMetrics:
    """The metrics the config asks for (``metrics``: null for the task's defaults, or a list of table names and
    ``_target_`` nodes), checked against the data's task.

    Raises:
        ConfigError: an unknown name (listing the known ones), a metric for the other task, a user metric without
            a name or a direction.
    """
    entries, computers = {}, {}
    for i, node in enumerate(DEFAULT_METRICS[task] if nodes is None else nodes):
        key = f"metrics[{i}]"
        if isinstance(node, str):
            entry = metric(node, key)
            if entry.torchmetric is None or entry.task not in (None, task):
                usable = [m.name for m in METRICS.values() if m.torchmetric and m.task in (None, task)]
                raise ConfigError(f"{key}={node}: not a metric for {task}; use one of {', '.join(usable)}.")
            top_k = entry.arguments.get("top_k")
            if top_k is not None and top_k > (num_classes or 0):
                raise ConfigError(f"{key}={node}: needs at least {top_k} classes, the data has {num_classes}.")
            computer = entry.build(num_classes)
        else:
            entry, computer = _users_metric(node, key, num_classes)
        if entry.name in entries:
            raise ConfigError(f"{key}: the metric {entry.name!r} is listed twice.")
        entries[entry.name], computers[entry.name] = entry, computer
    return RunMetrics(entries, computers)


def _users_metric(node: Any, key: str, num_classes: int | None) -> tuple[Metric, Any]:
    """A ``{_target_, name, higher_is_better, ...}`` node: a torchmetrics.Metric, or a function of (outputs,
    targets) giving one number per batch (averaged over the split's samples)."""
    import torchmetrics
    from omegaconf import OmegaConf

    from runner.targets import build_node, node_arguments, resolve_target

    node = OmegaConf.create(node) if not OmegaConf.is_config(node) else node
    target = resolve_target(key, node)
    settings = ("name", "higher_is_better")
    arguments = node_arguments(node, settings)
    if callable(target) and not isinstance(target, type) and not arguments:
        computer, default_name, higher = _batch_mean(target), getattr(target, "__name__", ""), None
    else:
        computer = build_node(key, node, leave_out=settings, num_classes=num_classes)
        if not isinstance(computer, torchmetrics.Metric):
            raise ConfigError(
                f"{key}: {node._target_} built a {type(computer).__name__}; give a torchmetrics.Metric "
                f"class or a function of (outputs, targets)."
            )
        default_name, higher = type(computer).__name__.lower(), computer.higher_is_better
    name = node.get("name") or default_name
    higher = node.get("higher_is_better", higher)
    if not name or higher is None:
        raise ConfigError(
            f"{key}: give the metric a name and a direction, e.g. {{name: my_score, "
            f"higher_is_better: true, _target_: {node._target_}}}."
        )
    return Metric(
        str(name), bool(higher), SAMPLE_MEAN, f"the user's {node._target_}", torchmetric=node._target_
    ), computer


def _batch_mean(function: Any):
    """A torchmetrics.MeanMetric fed ``function(outputs, targets)`` once per batch, weighted by the batch's size."""
    from torchmetrics import MeanMetric

    from runner.errors import UserCodeError

    class BatchMean(MeanMetric):
        def update(self, outputs, targets) -> None:  # type: ignore[override]
            try:
                value = function(outputs, targets)
            except Exception as err:
                raise UserCodeError(f"the metric {function.__qualname__} raised {type(err).__name__}: {err}") from err
            super().update(value, weight=len(targets))

    return BatchMean()


class CountedAccuracy:
    """``accuracy``: right answers counted on the device, summed over the ranks with the loss (runner.train).

    It has the few methods of a torchmetrics.Metric the runner calls (``to``, ``reset``, ``update``); in place of
    ``compute``, ``totals``/``from_totals``: the evaluation sums its counts itself, in the same host sync as the loss.
    """

    def __init__(self) -> None:
        self.reset()

    def to(self, device: Any) -> CountedAccuracy:
        return self

    def reset(self) -> None:
        self.right: Any = 0
        self.samples = 0

    def update(self, outputs: Any, targets: Any) -> None:
        predicted = outputs.argmax(1) if outputs.ndim > 1 else outputs
        right = (predicted == targets).sum()
        self.right = right if self.samples == 0 else self.right + right  # no 0 + tensor: a slow path in torch
        self.samples += len(targets)

    def totals(self) -> list[Any]:
        return [self.right, self.samples]

    @staticmethod
    def from_totals(right: float, samples: float) -> float:
        return right / max(samples, 1)
