"""Checkpoints: atomic writes of the state bundle, keep-last-K, and the newest checkpoint that loads.

A write goes to a temporary file in the same folder, is flushed and fsynced, renamed into place, and the folder
is fsynced: a kill at any instant leaves the old newest checkpoint or the new one, never a half file taken for
whole. Loading uses ``torch.load(weights_only=True)``: the bundle holds only tensors and plain Python values.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from runner.errors import CheckpointError, CheckpointNotWritten

log = logging.getLogger(__name__)

# Raised whenever the layout changes; a checkpoint of another format is refused in one line, never guessed at.
CHECKPOINT_FORMAT = 2
CHECKPOINT_DIR = "checkpoints"
LATEST_MARKER = "LATEST"  # holds the file name of the newest checkpoint, for people and scripts
_NAME = re.compile(r"^epoch-(\d+)-step-(\d+)\.pt$")

# Fault injection for the resume tests: "N" sends SIGKILL to this process while the N-th checkpoint of the
# launch is half written (its temporary file flushed, not yet renamed).
FAULT_DURING_WRITE_ENV = "RUNNER_FAULT_DURING_CHECKPOINT"


class StepCheckpoints:
    """The loop's stop check, writing a checkpoint after every ``every``-th optimizer step on the way.

    The loop asks after every batch; ``mid_epoch`` is true only right after an optimizer step inside the epoch, so
    the batches of an accumulated step that follow it (same global step) do not write it again.

    For long epochs on a cluster: a node that dies without a signal (hardware, the OOM killer, ``kill -9``) loses
    at most ``every`` steps, not the whole epoch. A mid-epoch checkpoint is the one a stop signal writes, so it
    resumes bitwise. None is written at an epoch's last step (the epoch's end writes its own) or when stopping;
    under DDP every rank counts the same steps, so all take part in the same checkpoints.
    """

    def __init__(self, should_stop: Any, every: int, write: Any, mid_epoch: Any):
        self.should_stop, self.every, self.write, self.mid_epoch = should_stop, every, write, mid_epoch

    def __call__(self, global_step: int, epoch_end: bool = False) -> bool:
        stopping = self.should_stop(global_step, epoch_end=epoch_end)
        if not stopping and not epoch_end and global_step % self.every == 0 and self.mid_epoch():
            self.write()
        return stopping

    def __getattr__(self, name: str) -> Any:
        return getattr(self.should_stop, name)  # signal_name, hand_over


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"epoch-{epoch:04d}-step-{global_step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (by epoch, then step).

    Only regular files: a folder or a FIFO with a checkpoint's name is no checkpoint, and opening a FIFO would hang.
    """
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(tuple(map(int, m.groups())), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [path for _, path in sorted(found)]


def _free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def not_written(path: Path, err: BaseException) -> CheckpointNotWritten:
    """The one line for a checkpoint file (or a best file written with it) that could not be written."""
    return CheckpointNotWritten(
        f"could not write checkpoint {path} ({_first_line(err)}); {_free_space(path.parent)} free on that disk. "
        f"Free some space and run the same command again: it resumes from the previous checkpoint."
    )


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``; an EOFError from a zero-byte file has no message at all."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Any) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, fsync it, rename it into place. The temporary
    file is this thread's own: the persist thread saves runner.json while the training thread may save it too."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a half-written file on a full disk keeps it full
        raise
    _fsync_directory(path.parent)


_checkpoints_this_launch = 0


def _maybe_die_mid_write() -> None:
    global _checkpoints_this_launch
    _checkpoints_this_launch += 1
    if os.environ.get(FAULT_DURING_WRITE_ENV) == str(_checkpoints_this_launch):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run_dir: Path, bundle: dict[str, Any], keep: int) -> Path:
    """Write the bundle (the state's parts and what describes them) as the newest checkpoint, update the LATEST
    marker, and keep only the newest ``keep`` of this run (``prune_checkpoints``)."""
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(bundle["progress"]["epoch"], bundle["progress"]["global_step"])

    def write(file) -> None:
        torch.save({**bundle, "format": CHECKPOINT_FORMAT}, file)
        _maybe_die_mid_write()

    try:
        write_atomically(path, write)
        _fingerprints[_identity(path)] = bundle["fingerprint"]
        write_atomically(folder / LATEST_MARKER, lambda file: file.write(f"{path.name}\n".encode()))
    except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError("... file write failed")
        raise not_written(path, err) from err
    prune_checkpoints(run_dir, path, keep, bundle["fingerprint"])
    for stale in folder.glob(".*.tmp-*"):  # left by a launch killed mid-write; this run owns the folder
        stale.unlink(missing_ok=True)
    return path


# What each checkpoint file was found to be, by (path, size, modification time): its fingerprint, or None when it
# does not load. Filled as this process writes, loads or peeks at checkpoints; a file rewritten is looked at anew.
_fingerprints: dict[tuple[str, int, int], str | None] = {}


def _identity(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def checkpoint_fingerprint(path: Path) -> str | None:
    """The config fingerprint of the checkpoint ``path``, or None when it does not load as one of this format.

    Only the header is read: the tensors are memory-mapped, so this is cheap even for a large checkpoint.
    """
    try:
        identity = _identity(path)
        if identity not in _fingerprints:
            bundle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            ok = isinstance(bundle, dict) and bundle.get("format") == CHECKPOINT_FORMAT
            _fingerprints[identity] = str(bundle.get("fingerprint")) if ok else None
        return _fingerprints[identity]
    except Exception:  # noqa: BLE001 - whatever the reason, it cannot be resumed from
        return None


def prune_checkpoints(run_dir: Path, newest: Path, keep: int, fingerprint: str) -> None:
    """Keep ``newest`` (just written) and the readable checkpoints of this run before it, ``keep`` in all; delete
    the older ones of this run.

    An unreadable entry or another config's checkpoint is neither counted nor deleted (it may be someone else's
    file), and entries sorting after ``newest`` are left alone: counting them could delete the one just written.
    """
    older = list_checkpoints(run_dir)
    older = older[: older.index(newest)] if newest in older else older
    kept = 1
    for path in reversed(older):
        if checkpoint_fingerprint(path) != fingerprint:
            continue
        if kept < keep:
            kept += 1
        else:
            path.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True`` onto the CPU (``load_state_dict`` moves state to the model's
    device).

    Raises:
        CheckpointError: when it was written in another checkpoint format.
    """
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    found = bundle.get("format") if isinstance(bundle, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is in checkpoint format {found}, this runner reads format {CHECKPOINT_FORMAT}; resume it with "
            f"the runner version that wrote it ({bundle.get('runner_version') if isinstance(bundle, dict) else '?'})."
        )
    return bundle


def load_newest_valid(run_dir: Path, fingerprint: str | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads (and, given ``fingerprint``, was written by a run of that config).

    One that does not (truncated, empty, corrupt, or another config's copied in) gets one warning and the previous
    one is tried.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            bundle = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as err:  # truncated zip, empty file, bad pickle opcode, missing record: all mean "unusable"
            log.warning(f"checkpoint {path} is unreadable ({_first_line(err)}); trying the previous one")
            continue
        if fingerprint is not None and bundle.get("fingerprint") != fingerprint:
            log.warning(
                f"checkpoint {path} was written by another config (fingerprint {bundle.get('fingerprint')}, this "
                f"run's is {fingerprint}); skipping it, trying the previous one"
            )
            continue
        return path, bundle
    return None
