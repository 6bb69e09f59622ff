"""Deciding what a launch continues: config fingerprint, run-directory discovery, finished or not.

Each run directory holds ``runner.json`` (fingerprint, MLflow run id, finished or not), written atomically. A
launch with ``resume=auto`` looks for the newest run directory with the same fingerprint under the search roots:
an unfinished one is continued in place, a finished one is reported and not trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runner.checkpoint import list_checkpoints, write_atomically
from runner.errors import ConfigError, RunInUse, first_line
from runner.locks import hold

log = logging.getLogger(__name__)

RUN_RECORD = "runner.json"
RUN_LOCK = ".runner.lock"  # held by the process training in the run directory; holds its process id
# Settings that do not change what is trained: a launch differing only in these still resumes the run, and
# MLflow gets them as tags (which may change) rather than params (which may not).
OPERATIONAL_KEYS = (
    "tracking",
    "resume",
    "resume_force",
    "resume_search",
    "trainer.device",
    "trainer.progress_bar",
    "trainer.num_workers",
    "trainer.checkpoint_every",
    "trainer.checkpoint_min_seconds",
    "trainer.checkpoint_every_steps",
    "trainer.keep_checkpoints",
    "trainer.eval_batch_size",  # validation's batches change its sums' rounding, not what training does
    "trainer.strategy",  # trainer.batch_size is the global batch: one process or N train the same run
    "trainer.backend",
    "trainer.detect_nonfinite",  # changes nothing in a run that stays finite
    "trainer.keep_best",  # how many best epochs are kept (trainer.monitor is not here: early stopping reads it)
    "trainer.test_with",  # which checkpoint the test split scores, after training
)


def _is_operational(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in OPERATIONAL_KEYS)


# Settings added after runs of earlier versions existed, and the value that changes nothing: at it, they stay out
# of the fingerprint, so those runs still resume (and a changed value is listed as a difference from "(unset)").
ADDED_SETTINGS_AT_DEFAULT = {
    "trainer.monitor": "val_loss",
    "trainer.monitor_mode": "None",
    "trainer.early_stopping.patience": "0",
    "trainer.early_stopping.min_delta": "0.0",
    "trainer.gradient_clip_val": "None",
    "trainer.gradient_clip_algorithm": "norm",
    "trainer.accumulate_grad_batches": "1",
    "data.test_fraction": "0.0",
    "data.test_path": "None",
}


def split_settings(flat: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split a flattened config into (what decides the result, operational settings)."""
    result = {
        k: v for k, v in flat.items() if not _is_operational(k) and ADDED_SETTINGS_AT_DEFAULT.get(k, object()) != v
    }
    return result, {k: v for k, v in flat.items() if _is_operational(k)}


def config_fingerprint(result_settings: dict[str, str]) -> str:
    """A short hash of everything that changes the result of training."""
    return hashlib.sha256(json.dumps(result_settings, sort_keys=True).encode()).hexdigest()[:16]


def describe_differences(old: dict[str, str], new: dict[str, str]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    shown = "; ".join(f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in keys[:8])
    return shown + (f"; and {len(keys) - 8} more" if len(keys) > 8 else "")


@dataclass
class RunRecord:
    run_dir: Path
    fingerprint: str
    mlflow_run_id: str | None = None
    finished: bool = False
    final_val_loss: float | None = None
    created: float = 0.0
    diverged: str | None = None  # what the divergence was: the same command then refuses instead of resuming
    stopped_early: str | None = None  # finished before trainer.epochs: when, and which callback said why
    test_metrics: dict | None = None  # the test split's scores at the end (trainer.test_with's checkpoint)
    earlier_fingerprints: list[str] = field(default_factory=list)  # before it was taken further (trainer.epochs)

    def save(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "run_dir"}
        write_atomically(self.run_dir / RUN_RECORD, lambda f: f.write(json.dumps(data, indent=2).encode()))

    def save_run_id(self, run_id: str) -> None:
        """Record which MLflow run logs this run, so that a launch killed from now on finds it. Failing to write
        (a full disk) is not MLflow's failure and stops nothing: the id reaches the disk with the next checkpoint,
        whose state carries it, and the run's ``run_dir`` tag finds it while it is RUNNING. Raised on the persist
        thread, it would stop every later log of the run and leave the run RUNNING when the checkpoint then failed
        on the same full disk."""
        self.mlflow_run_id = run_id
        try:
            self.save()
        except OSError as err:
            log.warning(
                f"{self.run_dir / RUN_RECORD} was not updated with MLflow run {run_id} ({first_line(err)}); "
                "logging goes on, and the next checkpoint carries the id"
            )

    def state_dict(self) -> dict[str, str | None]:
        """The checkpoint's part of the record: which MLflow run logs this run."""
        return {"mlflow_run_id": self.mlflow_run_id}

    def load_state_dict(self, state: dict[str, str | None]) -> None:
        self.mlflow_run_id = self.mlflow_run_id or state["mlflow_run_id"]  # runner.json knows better when it knows

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord | None:
        """The record in ``run_dir``; None when there is none, or (with one warning) when it cannot be read as one.

        Only a regular file is opened (a FIFO would block forever), and every field must have its type: a record
        that says ``"created": "x"`` would otherwise break the comparison of every launch of that config.
        """
        path = run_dir / RUN_RECORD
        if not path.exists() and not path.is_symlink():
            return None
        try:
            if not path.is_file():
                raise ValueError("not a regular file")
            data = json.loads(path.read_text())
            return cls(run_dir=run_dir, **_checked_fields(data))
        except (OSError, ValueError, TypeError) as err:
            why = first_line(err)
            log.warning(f"run record {path} cannot be read ({why}); skipping that run directory")
            return None

    @classmethod
    def new(cls, run_dir: Path, fingerprint: str) -> RunRecord:
        return cls(run_dir=run_dir, fingerprint=fingerprint, created=time.time())


_FIELD_TYPES = {
    "fingerprint": (str,),
    "mlflow_run_id": (str, type(None)),
    "finished": (bool,),
    "final_val_loss": (int, float, type(None)),
    "created": (int, float),
    "diverged": (str, type(None)),
    "stopped_early": (str, type(None)),
    "test_metrics": (dict, type(None)),
    "earlier_fingerprints": (list,),
}


def _checked_fields(data: object) -> dict[str, object]:
    """The fields of a run record read from JSON, each of its type.

    Raises:
        ValueError: a field is missing, unknown or of another type.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown or "fingerprint" not in data:
        raise ValueError(f"unknown fields {unknown}" if unknown else "no fingerprint")
    for key, value in data.items():
        if not isinstance(value, _FIELD_TYPES[key]) or (key != "finished" and isinstance(value, bool)):
            raise ValueError(f"{key} is {value!r}")
    return data


def find_runs(roots: Iterable[Path], fingerprint: str) -> list[RunRecord]:
    """The run directories under ``roots`` with this fingerprint, finished or not, the most recently created first.

    A record that cannot be read is skipped with one warning (``RunRecord.load``).
    """
    candidates = []
    for root in roots:
        if root.is_dir():
            for record_path in root.rglob(RUN_RECORD):
                record = RunRecord.load(record_path.parent)
                if record is not None and record.fingerprint == fingerprint:
                    candidates.append(record)
    return sorted(candidates, key=lambda r: r.created, reverse=True)


def hold_run_dir(run_dir: Path) -> None:
    """Hold ``run_dir`` for the life of this process: no other launch trains in it meanwhile.

    Raises:
        RunInUse: another process holds it (exit 75: the same command, once that one has ended, continues the run).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = hold(run_dir / RUN_LOCK)
    if holder is not None:
        raise RunInUse(
            f"{run_dir} is being trained by process {holder} (it holds {run_dir / RUN_LOCK}); this launch trains "
            f"nothing. Run the same command again once that process has ended to continue the run."
        )


def run_dir_of(path: Path) -> Path:
    """The run directory of ``resume=PATH``: the directory itself, or the one a checkpoint file is in."""
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def record_for_path(path: Path) -> tuple[RunRecord | None, Path | None]:
    """``resume=PATH``: the run directory's record and the checkpoint to start from (a file, or the newest)."""
    path = path.expanduser()
    if path.is_file():
        return RunRecord.load(run_dir_of(path)), path
    if not path.is_dir():
        raise ConfigError(f"resume={path}: no such run directory or checkpoint file.")
    if not list_checkpoints(path):
        raise ConfigError(
            f"resume={path}: that run directory has no checkpoint to resume from (no {path}/checkpoints/*.pt)."
        )
    return RunRecord.load(path), None


def adopt_run_dir(launch_dir: Path, run_dir: Path, keep_log: bool = True) -> None:
    """Continue logging in ``run_dir`` instead of this launch's new, still empty Hydra directory, then remove that.

    One training run stays one directory however many times it is restarted. ``keep_log=False`` (the DDP ranks
    other than 0) stops the log file altogether: rank 0 writes the run's.
    """
    same = launch_dir.resolve() == run_dir.resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(
            launch_dir.resolve()
        ):
            if same and keep_log:
                continue
            root.removeHandler(handler)
            handler.close()
            if keep_log:
                replacement = logging.FileHandler(run_dir / Path(handler.baseFilename).name, mode="a")
                replacement.setFormatter(handler.formatter)
                replacement.setLevel(handler.level)
                root.addHandler(replacement)
    if same:
        return
    leftovers = {p.name for p in launch_dir.iterdir()} if launch_dir.is_dir() else set()
    if leftovers <= {".hydra", "runner.log"}:  # only what Hydra made for this launch
        shutil.rmtree(launch_dir, ignore_errors=True)
