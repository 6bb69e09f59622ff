"""The best models of a run, kept apart from the newest checkpoints and never pruned by
``trainer.keep_checkpoints``: ``checkpoints/best-epoch-EEEE.pt`` for each of the ``trainer.keep_best`` best epochs,
and ``checkpoints/best.pt``, the best of them (a hard link to its file).

``trainer.monitor`` names the logged metric that decides (default ``val_loss``); its direction comes from the
metrics table (runner.metrics), or ``trainer.monitor_mode``. The ranking so far is a checkpoint part, so a run
killed and resumed keeps the same best as an uninterrupted one: best files are written with the checkpoint whose
ranking names them, and named by epoch, so a resumed run writes the same files as an uninterrupted one. A best
file holds the
model, the data's fitted state and what describes the run (config, fingerprint, epoch, the monitored value):
enough to evaluate the model, not to resume training.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runner.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FORMAT, not_written, write_atomically
from runner.errors import ConfigError

_BEST_NAME = re.compile(r"^best-epoch-(\d+)\.pt$")


def best_file(run_dir: Path, epoch: int | None = None) -> Path:
    """``best.pt`` (epoch None), or the file of one of the best epochs."""
    name = "best.pt" if epoch is None else f"best-epoch-{epoch:04d}.pt"
    return run_dir / CHECKPOINT_DIR / name


def best_files(run_dir: Path) -> dict[int, Path]:
    """The best-epoch files in ``run_dir``, by epoch."""
    folder = run_dir / CHECKPOINT_DIR
    found = {int(m.group(1)): p for p in folder.glob("best-epoch-*.pt") if (m := _BEST_NAME.match(p.name))}
    return dict(sorted(found.items()))


class BestCheckpoints:
    """The ``keep`` best epochs so far by the monitored value, and their files.

    An epoch that places is snapshotted (its model copied to host memory) and written with the next checkpoint,
    which holds the ranking that names it: best files are never newer than the checkpoint a resume starts from,
    and a converging run, improving every epoch, does not write a file every epoch. Only rank 0 offers.
    """

    def __init__(self, monitor: str, higher_is_better: bool, keep: int, run_dir: Path):
        if keep < 1:
            raise ConfigError(f"trainer.keep_best={keep}: keep at least 1 best checkpoint.")
        self.monitor, self.higher_is_better, self.keep, self.run_dir = monitor, higher_is_better, keep, run_dir
        self.ranking: list[tuple[float, int]] = []  # (value, epoch), best first
        self.pending: dict[int, dict[str, Any]] = {}  # epoch -> its best file's contents, not yet written

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than

    def place(self, value: float) -> int | None:
        """The 1-based place ``value`` would take among the best so far, or None if it takes none (a tie keeps the
        earlier epoch ahead; a NaN never places)."""
        if math.isnan(value):
            return None
        place = 1 + sum(1 for kept, _ in self.ranking if not self._better(value, kept))
        return place if place <= self.keep else None

    def offer(self, epoch: int, metrics: dict[str, float], snapshot: Callable[[], dict[str, Any]]) -> int | None:
        """Rank this epoch by its monitored value; if it places, keep ``snapshot()`` to write with the next
        checkpoint, and return the place."""
        value = metrics[self.monitor]
        place = self.place(value)
        if place is None:
            return None
        self.ranking.insert(place - 1, (value, epoch))
        del self.ranking[self.keep :]
        self.pending[epoch] = snapshot()
        kept = self.kept_epochs()
        self.pending = {other: bundle for other, bundle in self.pending.items() if other in kept}
        return place

    def kept_epochs(self) -> set[int]:
        return {epoch for _, epoch in self.ranking}

    def write(self) -> None:
        """Write the best files the ranking names and lacks, remove those it no longer names (or that a killed
        launch wrote beyond its last checkpoint), and point ``best.pt`` at the best."""
        for epoch, bundle in self.pending.items():
            path = best_file(self.run_dir, epoch)
            try:
                save_best(path, bundle)
            except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError("... file write failed")
                raise not_written(path, err) from err
        self.pending = {}
        kept = self.kept_epochs()
        for epoch, path in best_files(self.run_dir).items():
            if epoch not in kept:
                path.unlink(missing_ok=True)
        if self.ranking and (top := best_file(self.run_dir, self.ranking[0][1])).exists():
            link_atomically(top, best_file(self.run_dir))

    @property
    def best(self) -> tuple[float, int] | None:
        return self.ranking[0] if self.ranking else None

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "ranking": [list(entry) for entry in self.ranking]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["monitor"] == self.monitor:  # another monitor (an operational change): rank afresh from here
            self.ranking = [(float(value), int(epoch)) for value, epoch in state["ranking"]][: self.keep]


def save_best(path: Path, bundle: dict[str, Any]) -> None:
    """Write a best file atomically (a kill mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: torch.save({**bundle, "format": CHECKPOINT_FORMAT}, file))


def link_atomically(target: Path, link: Path) -> None:
    """Make ``link`` name the same file as ``target`` (a hard link; a copy where links are not possible), replacing
    any older ``link`` in one rename."""
    temporary = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        os.link(target, temporary)
    except OSError:
        import shutil

        shutil.copyfile(target, temporary)
    os.replace(temporary, link)
