"""``python -m runner.evaluate RUN_DIR``: score a run's checkpoint on its validation or test split.

The run's own config (``RUN_DIR/resolved_config.yaml``) builds the data, the model, the loss and the metrics, as
training built them; the data is checked against what the checkpoint was trained on (its classes and the statistics
fitted on the training split, a table's standardisation), so the scores are those training would have logged.
Relative data paths are read from where the command runs, as in training.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from runner.errors import CheckpointError, ConfigError, RunnerError, full_traceback_wanted, report_error

log = logging.getLogger("runner.evaluate")


def checkpoint_path(run_dir: Path, which: str) -> Path:
    """``best`` (checkpoints/best.pt), ``last`` (the newest checkpoint), or a file's path.

    Raises:
        CheckpointError: there is no such checkpoint.
    """
    from runner.best import best_file
    from runner.checkpoint import list_checkpoints

    if which == "best":
        path = best_file(run_dir)
        if not path.is_file():
            raise CheckpointError(
                f"{run_dir} has no checkpoints/best.pt yet (it is written with the first checkpoint)."
            )
        return path
    if which == "last":
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"{run_dir} has no checkpoint yet; use --checkpoint best or a checkpoint's path.")
        return found[-1]
    path = Path(which)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {which}: no such file; use best, last or a checkpoint's path.")
    return path


def read_run(run_dir: Path) -> tuple[Any, Any]:
    """The run's record and its resolved config.

    Raises:
        ConfigError: ``run_dir`` is not a run directory.
    """
    from omegaconf import OmegaConf

    from runner.resume import RunRecord

    record = RunRecord.load(run_dir) if run_dir.is_dir() else None
    config = run_dir / "resolved_config.yaml"
    if record is None or not config.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no runner.json and resolved_config.yaml); give one, "
            f"e.g. outputs/2026-12-03/10-00-00."
        )
    return record, OmegaConf.load(config)


def load_model_checkpoint(path: Path, fingerprints: list[str]) -> dict[str, Any]:
    """A checkpoint or best file of this run's config (or of its config before it was taken further).

    Raises:
        CheckpointError: unreadable, or written by another config.
    """
    from runner.checkpoint import load_checkpoint

    try:
        bundle = load_checkpoint(path)  # another checkpoint format: its own one line
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated, not a checkpoint at all: one line either way
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({str(err).splitlines()[0][:200]}).") from None
    if "model" not in bundle:
        raise CheckpointError(f"{path} holds no model; give a checkpoint or best file of this run.")
    if bundle.get("fingerprint") not in fingerprints:
        raise CheckpointError(
            f"{path} was written by another config (fingerprint {bundle.get('fingerprint')}, the run's is "
            f"{fingerprints[0]}); give a checkpoint of this run."
        )
    return bundle


def evaluate_run(run_dir: Path, which: str, split: str | None, device_name: str) -> tuple[dict[str, float], str]:
    """The metrics of ``which`` checkpoint of the run on ``split`` (None: test when the data has one, else val),
    and a line saying what was scored.

    Raises:
        RunnerError: no such run, checkpoint or split, or data that changed since training.
    """
    import torch

    from runner.build import build_data, build_model
    from runner.config import eval_batch_size
    from runner.data import make_batcher
    from runner.device import precision_settings, select_device
    from runner.losses import build_loss
    from runner.metrics import build_run_metrics
    from runner.train import Loop, evaluate

    record, cfg = read_run(run_dir)
    path = checkpoint_path(run_dir, which)
    bundle = load_model_checkpoint(path, [record.fingerprint, *record.earlier_fingerprints])
    data = build_data(cfg)
    try:
        data.load_state_dict(bundle["data"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}.") from None
    split = split or ("test" if data.test is not None else "val")
    if getattr(data, split) is None:
        raise ConfigError(
            "--split test: this run's data has no test split; set data.test_fraction (or data.test_path, an "
            "image folder's test/) for new runs, or use --split val."
        )
    device = select_device(device_name)
    model = build_model(cfg, data).to(device)
    try:
        model.load_state_dict(bundle["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the run's model: {str(err).splitlines()[0]}") from None
    metrics = build_run_metrics(cfg.get("metrics"), data.task, data.num_classes)
    loop = Loop(  # only what evaluation reads: no optimizer, scheduler or training batches
        model=model,
        optimizer=None,
        scheduler=None,
        train_batches=None,
        val_batches=None,
        loss_fn=build_loss(cfg.loss, data.task),
        epochs=0,
        metrics={name: metric.to(device) for name, metric in metrics.computers.items()},
        autocast_dtype=precision_settings(cfg.trainer.precision, device).get("autocast_dtype"),
    )
    trainer = cfg.trainer
    batches = make_batcher(
        getattr(data, split), eval_batch_size(trainer), device, trainer.seed, False, trainer.num_workers
    )
    setattr(loop, f"{split}_batches", batches)
    with torch.no_grad():
        scores = evaluate(loop, split)
    described = f"epoch {bundle['progress']['epoch']}" if "progress" in bundle else f"epoch {bundle.get('epoch')}"
    return scores, f"{path} ({described}) on the {split} split ({len(getattr(data, split))} samples)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run directory (where runner.json is)")
    parser.add_argument(
        "--checkpoint", default="best", help="best (checkpoints/best.pt, the default), last, or a checkpoint's path"
    )
    parser.add_argument(
        "--split", choices=("val", "test"), default=None, help="default: test when the data has one, else val"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N, mps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from runner.config import register_schemas

    register_schemas()
    try:
        scores, what = evaluate_run(args.run_dir, args.checkpoint, args.split, args.device)
    except RunnerError as err:
        if full_traceback_wanted():
            raise
        return report_error(err)
    print(what)
    width = max(len(key) for key in scores)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
