"""Tables as data: ``data=csv data.path=table.csv data.target=label`` (CSV, or Parquet by its suffix).

Features are the other columns (or ``data.features``), all numeric; a target of strings or integers is a
classification (the class names kept, sorted), a float target a regression; ``data.task`` decides where the
user wants to. Features are standardised with the mean and deviation of the training rows only; those, the
column names and the classes travel in the checkpoint (the ``data`` part), so evaluating a checkpoint uses the
same. Every problem with the file is one line naming the file, the column and, for a bad cell, the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from runner.data import TASKS, DataSplits, hold_out_test, split_indices
from runner.errors import ConfigError


def read_table(path: str, key: str = "data.path"):
    """The file as a pandas DataFrame: Parquet by its suffix, CSV otherwise."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={path}: no such file (relative paths are from where you run the command).")
    empty = ConfigError(f"{key}={path}: the file is empty; it needs a header row and at least one data row.")
    try:
        if file.suffix.lower() in (".parquet", ".pq"):
            table = pd.read_parquet(file)
        else:
            table = pd.read_csv(file, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise empty from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as err:
        message = str(err).strip().splitlines()[0]
        raise ConfigError(f"{key}={path}: cannot be read as a table ({message}).") from None
    if table.empty:  # a header and no rows
        raise empty
    return table


def _check_cells(table, path: str, columns: list[str]) -> None:
    """Refuse an empty or NaN cell, naming the column and the row (the file's line, for a CSV)."""
    missing = table[columns].isna()
    if missing.to_numpy().any():
        column = next(c for c in columns if missing[c].any())
        row = int(missing[column].to_numpy().nonzero()[0][0])
        line = f" (line {row + 2} of the file)" if not str(path).lower().endswith((".parquet", ".pq")) else ""
        raise ConfigError(
            f"data: {path} has an empty or NaN cell in column {column!r}, data row {row + 1}{line}; fill it or drop "
            f"that row."
        )


def _feature_columns(table, path: str, target: str, features: list[str] | None) -> list[str]:
    import pandas as pd

    if target not in table.columns:
        raise ConfigError(
            f"data.target={target!r}: {path} has no such column; its columns are {', '.join(map(str, table.columns))}."
        )
    columns = list(features) if features else [c for c in table.columns if c != target]
    unknown = [c for c in columns if c not in table.columns]
    if unknown:
        raise ConfigError(
            f"data.features: {path} has no column {', '.join(map(repr, unknown))}; its columns are "
            f"{', '.join(map(str, table.columns))}."
        )
    if not columns:
        raise ConfigError(f"data: {path} has no feature column besides the target {target!r}.")
    text = [c for c in columns if not pd.api.types.is_numeric_dtype(table[c]) or pd.api.types.is_bool_dtype(table[c])]
    if text:
        raise ConfigError(
            f"data: feature column {text[0]!r} of {path} is not numeric; encode it as numbers, or leave it out by "
            f"listing the features to use: data.features=[{','.join(c for c in columns if c not in text)}]."
        )
    return columns


def _targets(
    values, task: str, classes: list[str] | None, path: str, target: str
) -> tuple[torch.Tensor, list[str] | None]:
    if task == "regression":
        try:
            return torch.tensor(values.astype("float32").to_numpy()).unsqueeze(1), None
        except (TypeError, ValueError):
            raise ConfigError(
                f"data.target={target!r}: {path} has non-numeric values there; a regression needs "
                f"numbers (or set data.task=classification)."
            ) from None
    names = [str(v) for v in values.to_numpy()]
    if classes is None:
        classes = _sorted_labels(set(names))
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - index.keys())
    if unknown:
        raise ConfigError(f"data: {path} has classes in {target!r} the training file lacks: {', '.join(unknown[:5])}.")
    return torch.tensor([index[name] for name in names], dtype=torch.long), classes


def _other_table(
    path: str, key: str, columns: list[str], target: str, task: str, classes: list[str] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A validation or test table's rows, with the training table's columns and classes."""
    table = read_table(path, key)
    _feature_columns(table, path, target, columns)
    _check_cells(table, path, [*columns, target])
    y, _ = _targets(table[target], task, classes, path, target)
    return torch.tensor(table[columns].astype("float32").to_numpy()), y


def _sorted_labels(labels: set[str]) -> list[str]:
    """Class names in label order: by value when they are all integers (2 before 10), else alphabetically."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def infer_task(values) -> str:
    """Strings, integers and booleans are class labels; floats are quantities."""
    import pandas as pd

    return "regression" if pd.api.types.is_float_dtype(values) else "classification"


def load_csv(
    seed: int,
    path: str,
    target: str,
    features: list[str] | None = None,
    task: str | None = None,
    val_path: str | None = None,
    val_fraction: float = 0.2,
    standardize: bool = True,
    test_path: str | None = None,
    test_fraction: float = 0.0,
) -> DataSplits:
    """A table's rows as samples: ``target`` is what to predict, the other (or the listed) columns the input."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"data.task={task!r}: use classification or regression (or leave it out to infer it).")
    if test_path is not None and test_fraction:
        raise ConfigError("data.test_path and data.test_fraction both set: give the test split one way.")
    table = read_table(path)
    columns = _feature_columns(table, path, target, features)
    _check_cells(table, path, [*columns, target])
    task = task or infer_task(table[target])
    y, classes = _targets(table[target], task, None, path, target)
    x = torch.tensor(table[columns].astype("float32").to_numpy())
    if val_path is None:
        train_idx, val_idx = split_indices(len(x), val_fraction, seed)
        val = x[val_idx], y[val_idx]
    else:
        val = _other_table(val_path, "data.val_path", columns, target, task, classes)
        train_idx = torch.arange(len(x))  # every row trains, in the file's order...
        if test_fraction:  # ...but a test split is taken from them shuffled by the seed, not from the file's top
            train_idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if test_path is None:
        train_idx, test_idx = hold_out_test(train_idx, len(x), test_fraction)
        test = (x[test_idx], y[test_idx]) if test_idx is not None else None
    else:
        test = _other_table(test_path, "data.test_path", columns, target, task, classes)
    x_train, y_train = x[train_idx], y[train_idx]
    fitted: dict[str, Any] = {"features": [str(c) for c in columns], "target": target}
    if standardize:  # with the training rows' statistics alone: validation and test rows are unseen data
        mean, std = x_train.mean(dim=0), x_train.std(dim=0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays as it is, centred
        x_train, val = (x_train - mean) / std, ((val[0] - mean) / std, val[1])
        test = ((test[0] - mean) / std, test[1]) if test is not None else None
        fitted.update(mean=mean, std=std)
    return DataSplits(
        TensorDataset(x_train, y_train),
        TensorDataset(*val),
        TensorDataset(*test) if test is not None else None,
        input_shape=(len(columns),),
        num_classes=len(classes) if classes else None,
        classes=classes,
        task=task,
        fitted=fitted,
    )
