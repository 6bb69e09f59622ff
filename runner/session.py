"""One launch's training of a run: the loop over the built objects, the state a checkpoint holds, what happens at
each epoch's end (a checkpoint when due, then MLflow on the persist thread), and how the launch ends.

Under DDP every rank has a session; rank 0 alone writes checkpoints (holding every rank's RNG streams), the run
record and MLflow, and every rank takes part in the collectives (the stop agreement, the gather of RNG streams).
"""

from __future__ import annotations

import copy
import logging
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from runner import __version__
from runner.best import BestCheckpoints, best_file
from runner.build import Built, sample_batch
from runner.checkpoint import CHECKPOINT_DIR, StepCheckpoints, not_written, save_checkpoint
from runner.config import eval_batch_size
from runner.data import make_batcher
from runner.device import precision_settings
from runner.distributed import AgreedStop, Distributed
from runner.errors import CheckpointError, Diverged, NotFinished, Stopped, TrackingBehind, first_line
from runner.launch import Launch, RunContext, RunSettings
from runner.metrics import monitor_direction
from runner.model_logging import export_program
from runner.persist import Persister
from runner.resume import RunRecord, split_settings
from runner.signals import StopFlag
from runner.state import History, RankStreams, TrainingState
from runner.tracking import Tracker, current_user, flatten, git_commit, mlflow_params, runs_table_url
from runner.tracking_process import TrackerProcess, prestarted
from runner.train import EpochResult, Loop, Progress, check_finite, current_lrs, evaluate, train

log = logging.getLogger(__name__)

SCHEDULED = ("lr", "momentum", "betas")  # what torch's schedulers set in a param group (OneCycle: all three)


def make_loop(cfg: DictConfig, built: Built, ranks: Distributed) -> Loop:
    """The loop over the built objects: this rank's batchers, the model wrapped in DDP and compiled if asked."""
    trainer = cfg.trainer
    wrapped = ranks.wrap(built.model) if ranks.enabled else None
    compiled = torch.compile(wrapped or built.model) if trainer.compile else None

    def batcher(dataset, shuffle: bool):
        return make_batcher(
            dataset,
            trainer.batch_size if shuffle else eval_batch_size(trainer),  # shuffled: the training batches
            ranks.device,
            trainer.seed,
            shuffle,
            trainer.num_workers,
            ranks.rank,
            ranks.world_size,
        )

    return Loop(
        model=built.model,
        optimizer=built.optimizer,
        scheduler=built.scheduler,
        train_batches=batcher(built.data.train, shuffle=True),
        val_batches=batcher(built.data.val, shuffle=False),
        test_batches=batcher(built.data.test, shuffle=False) if built.data.test is not None else None,
        loss_fn=built.loss,
        epochs=trainer.epochs,
        metrics={name: metric.to(ranks.device) for name, metric in built.metrics.computers.items()},
        progress_bar=trainer.progress_bar and ranks.is_main,
        **precision_settings(trainer.precision, ranks.device),
        forward=None if ranks.enabled else compiled,  # under DDP validation runs the plain model: no collectives
        train_forward=(compiled or wrapped) if ranks.enabled else None,
        ranks=ranks if ranks.enabled else None,
        scheduler_per_batch=built.plan.stepped_per_batch,
        monitor=built.plan.monitor,
        log_lr_every=cfg.tracking.log_every_n_steps,
        detect_nonfinite=trainer.detect_nonfinite,
        clip_value=trainer.gradient_clip_val,
        clip_by_norm=trainer.gradient_clip_algorithm == "norm",
        accumulate=trainer.accumulate_grad_batches,
        no_sync=wrapped.no_sync if wrapped is not None else None,
    )


def epoch_metrics(result: EpochResult) -> dict[str, float]:
    """What MLflow gets for one epoch: ``lr`` (group 0), ``lr/group{i}`` when there are several, the losses."""
    metrics = {"lr": result.lrs[0]}
    if len(result.lrs) > 1:
        metrics.update({f"lr/group{i}": lr for i, lr in enumerate(result.lrs)})
    metrics.update(result.metrics)
    return metrics


def _standard_tags(device: torch.device) -> dict[str, str | None]:
    """MLflow's own source and user tags, which its UI shows, and the versions a result depends on."""
    return {
        "mlflow.source.name": "python -m runner",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": current_user(),
        "runner.version": __version__,
        "torch.version": str(torch.__version__),
        "cuda.version": torch.version.cuda if device.type == "cuda" else None,  # None: no tag
        "python.version": platform.python_version(),
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrainingSession:
    """The state of one run in this process, trained from where its checkpoint left it to the end or a stop."""

    def __init__(self, cfg: DictConfig, built: Built, record: RunRecord, settings: RunSettings, ranks: Distributed):
        self.trainer, self.record, self.settings, self.ranks = cfg.trainer, record, settings, ranks
        self.loop = make_loop(cfg, built, ranks)
        self.progress, self.history = Progress(), History()
        self.state = TrainingState()
        self.state.register("model", built.model)
        self.state.register("optimizer", built.optimizer)
        self.state.register("scheduler", built.scheduler)  # its base LRs and last_epoch: no initial_lr pitfall
        if self.loop.scaler is not None:
            self.state.register("grad_scaler", self.loop.scaler, optional=True)
        self.state.register("progress", self.progress)
        self.state.register(
            "ranks", RankStreams(self.progress, ranks, self.loop)
        )  # after progress: it sets the running loss
        self.state.register("history", self.history)
        self.state.register("callbacks", built.callbacks)
        higher = monitor_direction(cfg.trainer.monitor, cfg.trainer.monitor_mode, built.metrics)
        self.best = BestCheckpoints(cfg.trainer.monitor, higher, cfg.trainer.keep_best, record.run_dir)
        self.state.register("best", self.best, optional=True)  # optional: checkpoints from before it existed
        self.state.register("data", built.data)  # its classes and what was fitted on the training split
        self.state.register("tracking", record)
        self.callbacks, self.data, self.model = built.callbacks, built.data, built.model
        self.stopped_by: str | None = None  # the callback that ended training early
        self.finished_early = False  # resumed from the final checkpoint of a run a callback ended
        self.tracking = cfg.tracking
        # rank 0 logs, from MLflow's own process if one was started for it (runner.tracking_process); the other
        # ranks never open theirs
        tracker = TrackerProcess if ranks.is_main and prestarted() else Tracker
        self.tracker = tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.wait_s)
        self.tracking_wait_s = cfg.tracking.wait_s
        self.persister = Persister()
        # (epoch, metrics, lr_steps, when the epoch ended in ms): MLflow gets each epoch's own time
        self.unlogged: list[tuple[int, dict[str, float], dict[int, float], int]] = []
        self.ended_ms: int | None = None  # when training ended, for the MLflow run
        self.last_checkpoint = time.monotonic()
        # when a checkpoint is due, read after every epoch: as plain numbers, not DictConfig lookups (~30 µs each)
        self.checkpoint_every = int(cfg.trainer.checkpoint_every)
        self.checkpoint_min_seconds = float(cfg.trainer.checkpoint_min_seconds)

    def resume(self, launch: Launch) -> None:
        """Load the launch's checkpoint into every part. A forced start from another run's checkpoint keeps its own
        MLflow run and its own data (which may differ: that is what forcing allows).

        Raises:
            CheckpointError: the checkpoint does not fit this config (a forced resume across configs).
        """
        bundle = launch.checkpoint_bundle()
        leave_out = ("tracking", "data", "best") if launch.forced_from else ()
        replanned = launch.extended_from is not None and self.loop.monitor is None  # not ReduceLROnPlateau's state
        if replanned:
            scheduled = self._schedule_at(bundle["progress"])
            leave_out += ("scheduler",)  # its state holds the old length (T_max, total_steps): the new one is built
        try:
            self.state.load_state_dict(bundle, leave_out=leave_out)
        except CheckpointError as err:
            raise CheckpointError(f"{launch.checkpoint} {err}") from None
        if launch.extended_from is not None:
            self._continue_longer(launch, scheduled if replanned else None)
            return
        if bundle.get("finished") and self.progress.epoch < self.loop.epochs:  # ended by a callback, not marked yet
            self.finished_early, self.stopped_by = True, self.callbacks.stopping()
            log.info(
                f"resuming {self.record.run_dir} from {launch.checkpoint.name}: stopped early after epoch "
                f"{self.progress.epoch}; logging what MLflow lacks"
            )
            return
        if self.progress.epoch >= self.loop.epochs:  # trained to the end, but MLflow was not told everything
            log.info(
                f"resuming {self.record.run_dir} from {launch.checkpoint.name}: trained; logging what MLflow lacks"
            )
            return
        log.info(
            f"resuming {self.record.run_dir} from {launch.checkpoint.name}: epoch {self.progress.epoch + 1}/"
            f"{self.loop.epochs}, batch {self.progress.batch} of {len(self.loop.train_batches)}"
        )

    def _schedule_at(self, progress: dict[str, Any]) -> list[dict[str, Any]]:
        """Step the schedule just built for ``trainer.epochs`` to where the checkpoint's training stands (on the
        optimizer's initial LRs, before its state is loaded); what it sets in each param group from there."""
        steps = progress["global_step"] if self.loop.scheduler_per_batch else progress["epoch"]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no training happens here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(steps):
                self.loop.scheduler.step()
        return [{key: group[key] for key in SCHEDULED if key in group} for group in self.loop.optimizer.param_groups]

    def _continue_longer(self, launch: Launch, scheduled: list[dict[str, Any]] | None) -> None:
        """A run taken from ``launch.extended_from`` to ``trainer.epochs`` epochs: the schedule is the one for the
        new length, at the step training reached (ReduceLROnPlateau's state is kept: it knows no length); the LR
        where the two meet is said, and warned about when it jumps (a cosine that had decayed to its end starts
        climbing from its middle)."""
        old_lrs = current_lrs(self.loop.optimizer)  # what the old schedule would give next (the checkpoint's)
        if scheduled is not None and not self.loop.scheduler_per_batch and self.history.epochs:
            old_lrs = [self.history.epochs[-1]["lr"]] + old_lrs[1:]  # ...but its last epoch's LR says it better
        for group, values in zip(self.loop.optimizer.param_groups, scheduled or [], strict=False):
            group.update(values)  # the LR, and OneCycle's momentum or betas
        new_lrs = current_lrs(self.loop.optimizer)
        epoch = self.progress.epoch
        log.info(
            f"taking {self.record.run_dir} from {launch.extended_from} to {self.loop.epochs} epochs, from "
            f"{launch.checkpoint.name}: the LR goes from {old_lrs[0]:.4g} (epoch {epoch}, the {launch.extended_from}-"
            f"epoch schedule) to {new_lrs[0]:.4g} (epoch {epoch + 1}, the schedule for {self.loop.epochs} epochs)"
        )
        jump = abs(new_lrs[0] - old_lrs[0]) / max(abs(old_lrs[0]), 1e-12)
        if jump > 0.01:
            log.warning(
                f"the LR jumps by {jump:.0%} where the runs meet ({old_lrs[0]:.4g} -> {new_lrs[0]:.4g}): the "
                f"schedule for {self.loop.epochs} epochs is not the {launch.extended_from}-epoch one continued; "
                f"see python -m runner.preview with trainer.epochs={self.loop.epochs}"
            )

    def start_tracking(self, context: RunContext, launch: Launch, resolved_config: Path) -> None:
        """Open MLflow on the persist thread (rank 0), while the first steps run: importing it and opening its
        store take seconds. It is that thread's first job, so every metric is logged after it."""
        if not self.ranks.is_main:
            return
        logged_before = History(list(self.history.epochs), dict(self.history.lr_steps))
        started = _now_ms()  # training begins now; the run is created on the persist thread a little later

        def open_tracking() -> None:
            tracker, record = self.tracker, self.record
            tracker.open(
                context.run_name,
                record.mlflow_run_id,
                run_dir=str(record.run_dir.resolve()),
                start_time=started,
                parent_run_id=context.sweep.get("mlflow.parentRunId"),
            )
            record.save_run_id(tracker.run_id)
            if not tracker.resumed:
                whole = split_settings(flatten(self.settings.config, limit=None))[0]  # uncut: split if too long
                tracker.log_params(mlflow_params(whole))
                tracker.log_artifact(resolved_config)
                hydra_files = record.run_dir / ".hydra"  # the first launch's: its overrides and composed config
                if hydra_files.is_dir():
                    tracker.log_artifact(hydra_files, "hydra")
            if self.tracking.system_metrics:
                tracker.start_system_metrics()
            tracker.set_tags(self._tags(context, launch))  # runs `git`: off the training thread
            # Epochs checkpointed but not logged when the last launch died:
            tracker.log_epochs(list(enumerate(logged_before.epochs)))
            tracker.log_series("lr_step", logged_before.lr_steps)
            log.info(f"MLflow run {tracker.run_id} in {tracker.uri} (experiment {tracker.experiment!r})")

        self.persister.submit(open_tracking)

    def _tags(self, context: RunContext, launch: Launch) -> dict[str, str]:
        """Tags may change between launches (device, number of processes, tracking settings); params may not."""
        tags = {
            "run_dir": str(self.record.run_dir.resolve()),
            "overrides": " ".join(context.overrides) or "(none)",
            "device": str(self.ranks.device),
            "world_size": str(self.ranks.world_size),
            "config_fingerprint": self.record.fingerprint,
            **context.choices,
            **context.sweep,
            **self.settings.operational,
            **_standard_tags(self.ranks.device),
        }
        if launch.forced_from is not None:
            tags["started_from"] = str(launch.forced_from)
        if launch.extended_from is not None:  # its params keep the first length: MLflow's params cannot change
            tags["extended"] = f"from {launch.extended_from} to {self.loop.epochs} epochs"
        if self.data.classes:
            tags["data.classes"] = ",".join(self.data.classes)
        commit = git_commit(Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags

    def run(self) -> float:
        """Train to the end and return the final validation loss.

        Raises:
            Stopped: a stop signal ended the launch after a checkpoint.
        """
        flag = StopFlag().install()
        stop = AgreedStop(flag, self.ranks) if self.ranks.enabled else flag
        if self.trainer.checkpoint_every_steps:
            # right after an optimizer step, inside the epoch: not between the batches of an accumulated step
            mid_epoch = lambda: (  # noqa: E731
                0 < self.progress.batch < len(self.loop.train_batches)
                and not self.loop.accumulating(self.progress.batch)
            )
            stop = StepCheckpoints(stop, self.trainer.checkpoint_every_steps, self.checkpoint, mid_epoch)
        try:
            self.callbacks.on_train_start()
            completed = self.finished_early or train(self.loop, self.progress, self.end_epoch, stop)
            self.ended_ms = _now_ms()  # the test split's scoring is after training, not part of it
            if completed:
                self.callbacks.on_train_end(self.history.epochs[-1])
                self._log_summary(self._score_test())
            path = None if completed else self.checkpoint()
            lost = self._wait_for_tracking()  # every epoch logged before the run is called stopped or finished
        except BaseException as err:
            flag.uninstall()
            if isinstance(err, Diverged):
                self._record_divergence(err)
            if (lost := self._wait_for_tracking()) is not None:
                log.warning(f"while stopping on an error, logging to MLflow also failed: {lost}")
            elif self.tracker.opened:  # KILLED: stopped, to be resumed (a Ctrl-C at once, a checkpoint not written)
                self._end_tracking("KILLED" if isinstance(err, KeyboardInterrupt | NotFinished) else "FAILED")
            raise
        try:
            self.ranks.share(lambda: self._raise_if_behind(lost))  # on every rank, so all leave their group together
        except NotFinished:
            flag.uninstall()
            raise
        if not completed:
            flag.uninstall()
            if self.tracker.opened:
                self._end_tracking("KILLED")
            self.ranks.barrier()  # no rank exits before rank 0 has written: torchrun stops the others when one exits
            raise Stopped(
                f"stopped by {stop.signal_name} at epoch {self.progress.epoch + 1}, batch {self.progress.batch}; "
                f"checkpoint {path}. Run the same command again to resume.",
                hand_over=stop.hand_over,  # by __main__, once the stop is logged and the ranks have left their group
            )
        final_val_loss = self.history.epochs[-1]["val_loss"]
        stopped_early = None
        if self.stopped_by is not None or self.finished_early:
            by = f"callbacks.{self.stopped_by}" if self.stopped_by else "a callback"
            reason = self.callbacks.reason(self.stopped_by) if self.stopped_by else None
            stopped_early = f"by {by} after epoch {self.progress.epoch}/{self.loop.epochs}"
            stopped_early += f": {reason}" if reason else ""
            log.info(f"stopped early {stopped_early}")
        if self.ranks.is_main:
            self.record.finished, self.record.final_val_loss = True, final_val_loss
            self.record.stopped_early = stopped_early
            self.record.save()
            if stopped_early is not None:
                self.tracker.set_tags({"stopped_early": stopped_early})
            self._end_tracking("FINISHED", end_time=self.ended_ms)
        # Only now: a stop signal until the run is marked finished, in runner.json and in MLflow, is ignored. Handed
        # on, submitit's handler would requeue the job and exit between the two, leaving the MLflow run RUNNING.
        flag.uninstall()
        if flag.signal_name is not None:  # its handler said "stopping after this step": say what happened instead
            log.info(f"{flag.signal_name} came during the last step or after it: the run is complete, so it finished")
        if self.ranks.is_main:
            self._log_model()
            self._say_where_runs_are()
        return final_val_loss

    def end_epoch(self, result: EpochResult) -> bool:
        """Record the epoch's metrics, call the callbacks, and write a checkpoint when one is due; True when a
        callback ended training.

        A checkpoint is due every ``trainer.checkpoint_every`` epochs, but not sooner than
        ``trainer.checkpoint_min_seconds`` after the last one (and always after the last epoch): a 15 ms epoch
        would otherwise spend a fifth of its time writing. Checkpoints are written here, on the training thread, so
        one is on disk when the epoch ends; MLflow logs only epochs a checkpoint already holds, so it never shows
        an epoch a restart would train again. Under DDP rank 0's decision is shared.
        """
        metrics = epoch_metrics(result)
        self.history.record(metrics, result.lr_steps)
        self.unlogged.append((result.epoch, metrics, result.lr_steps, _now_ms()))
        if self.ranks.is_main and self.best.offer(result.epoch + 1, metrics, self._best_snapshot) == 1:
            result.note = f"best {self.best.monitor} so far"
        asked = self.callbacks.on_epoch_end(result.epoch, metrics)  # before the checkpoint, which holds their state
        self.stopped_by = self.ranks.share(lambda: asked)  # rank 0's callbacks decide for all
        epoch = self.progress.epoch
        due = (
            epoch == self.loop.epochs
            or self.stopped_by is not None
            or self.ranks.share(
                lambda: (
                    epoch % self.checkpoint_every == 0
                    and time.monotonic() - self.last_checkpoint >= self.checkpoint_min_seconds
                )
            )
        )
        if due:
            self.checkpoint()
        return self.stopped_by is not None

    def checkpoint(self) -> Path:
        """Write a checkpoint of where training stands, then have the epochs it holds logged (on rank 0).

        Under DDP every rank gets the path, or rank 0's failure to write (a full disk): all stop at the same step.
        """
        if self.progress.batch:  # mid-epoch (a stop, checkpoint_every_steps): never a checkpoint of a diverged model
            loss_sum, samples = self.ranks.sum([self.progress.loss_sum, self.progress.samples])
            check_finite(self.loop, self.progress, loss_sum / max(samples, 1))
        state = self.state.state_dict()  # every rank: the RNG streams are gathered
        return self.ranks.share(lambda: self._write_checkpoint(state))

    def _write_checkpoint(self, state: dict[str, Any]) -> Path:
        self._write_best()
        path = save_checkpoint(
            self.record.run_dir, {**state, **self.checkpoint_header()}, self.trainer.keep_checkpoints
        )
        self.last_checkpoint = time.monotonic()
        epochs, self.unlogged = self.unlogged, []
        partial = dict(self.progress.lr_steps)  # a stopped epoch's steps so far; its checkpoint holds them too
        self.persister.submit(lambda: self._log(epochs, partial))
        return path

    def _write_best(self) -> None:
        """The best files the checkpoint about to be written names, first: if they cannot be written, neither is
        it, and a resume trains those epochs again and writes them."""
        try:
            self.best.write()
        except OSError as err:  # linking best.pt, removing a file that fell out: the files are written already
            raise not_written(self.record.run_dir / CHECKPOINT_DIR / "best.pt", err) from err

    def _best_snapshot(self) -> dict[str, Any]:
        """A best file's contents: the model (copied to host memory) and the data's fitted state, described like a
        checkpoint (runner.best)."""
        model = {key: tensor.detach().to("cpu", copy=True) for key, tensor in self.model.state_dict().items()}
        value = self.history.epochs[-1][self.best.monitor]
        return {
            "model": model,
            "data": self.data.state_dict(),
            "epoch": self.progress.epoch,
            "monitor": {"name": self.best.monitor, "value": value},
            **self.checkpoint_header(),
        }

    def checkpoint_header(self) -> dict[str, Any]:
        """What a checkpoint says about itself besides the parts' state (runner.state.CHECKPOINT_KEYS)."""
        return {
            "fingerprint": self.record.fingerprint,
            "config": self.settings.config,
            "finished": self.progress.epoch >= self.loop.epochs or self.stopped_by is not None,
            "torch_version": str(torch.__version__),
            "runner_version": __version__,
        }

    def _score_test(self) -> dict[str, float]:
        """The test split's scores, once, at the end: ``trainer.test_with``'s checkpoint (best.pt, or the model as
        trained) evaluated on it, into the log and runner.json. The final checkpoint is written already: loading
        the best weights changes nothing on disk."""
        if self.loop.test_batches is None:
            return {}
        tested = "the last epoch"
        path = best_file(self.record.run_dir)
        if self.trainer.test_with == "best" and self.ranks.share(path.is_file):  # rank 0's file, read by every rank
            best = torch.load(path, map_location=self.ranks.device, weights_only=True)
            self.model.load_state_dict(best["model"])
            tested = f"best.pt (epoch {best['epoch']}, {best['monitor']['name']} {best['monitor']['value']:.4g})"
        metrics = evaluate(self.loop, "test")
        log.info(f"test split, {tested}: " + " ".join(f"{key} {value:.4g}" for key, value in metrics.items()))
        self.record.test_metrics = metrics
        return metrics

    def _log_summary(self, test_metrics: dict[str, float]) -> None:
        """Columns a runs table can sort on, at the last epoch's step: ``best_<monitor>``, ``best_epoch`` (1-based)
        and the test scores."""
        if not self.ranks.is_main:
            return
        summary = dict(test_metrics)
        if self.best.best is not None:
            value, epoch = self.best.best
            summary.update({f"best_{self.best.monitor}": value, "best_epoch": epoch})
        step = len(self.history.epochs) - 1
        self.persister.submit(lambda: self.tracker.log_metrics(summary, step))

    def _log_model(self) -> None:
        """The trained model as the MLflow run's model (``tracking.log_model``): best.pt's weights when there is
        one, else the last epoch's, on the CPU.

        Only once the run is marked finished, in runner.json and in MLflow: a stop signal now (its handler is put
        back) ends a finished run, so a resume never trains or logs it again, and a model that takes long to upload
        never holds up the run's record. A failure is a warning: the checkpoints hold the model."""
        if not self.tracking.log_model or not self.tracker.opened:
            return
        try:
            model, weights = self._model_to_log()
            example = sample_batch(self.data, torch.device("cpu"), size=2)[0]
            example = example.float() if example.is_floating_point() else example  # token ids stay integers
            name = self.tracking.registered_model_name
            # Traced here, where torch is imported already, into a folder of the run's own (removed after)
            with tempfile.TemporaryDirectory(prefix=".mlflow-model-", dir=self.record.run_dir) as folder:
                exported = export_program(model, example, Path(folder))
                if exported is not None:
                    uri = self.tracker.log_exported_model(exported, name)
                else:
                    uri = self.tracker.log_pickled_model(model, example, name)
        except Exception as err:  # noqa: BLE001 - said in one line; the run's metrics are all logged
            reason = first_line(err)
            log.warning(f"the model was not logged to MLflow ({reason}); the checkpoints hold it")
            return
        log.info(f"MLflow model {uri}: {weights} weights" + (f", registered as {name!r}" if name else ""))

    def _model_to_log(self) -> tuple[torch.nn.Module, str]:
        """A copy of the model on the CPU in float32 and eval mode, with best.pt's weights if there is one; and which
        weights. A copy: the trained model itself is left as training left it."""
        model = copy.deepcopy(self.model).to("cpu").float().eval()
        path = best_file(self.record.run_dir)
        if not path.is_file():
            return model, "the last epoch's"
        best = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(best["model"])
        return model, f"best.pt's (epoch {best['epoch']})"

    def _end_tracking(self, status: str, end_time: int | None = None) -> None:
        """End the MLflow run with runner.log uploaded as it stands (the end of training, or the stop)."""
        run_log = self.record.run_dir / "runner.log"
        try:
            if run_log.is_file():
                self.tracker.log_artifact(run_log)
        except Exception as err:  # noqa: BLE001 - the run's status matters more than its log
            log.warning(f"runner.log was not uploaded to MLflow ({str(err).strip()[:200]})")
        self.tracker.finish(status, end_time=end_time)

    def _say_where_runs_are(self) -> None:
        """Where to see the run: the runs table's address on a server, or the command that serves a local store."""
        url = self.tracker.runs_table_url()
        if url is not None:
            log.info(f"MLflow runs table: {url}")
        elif str(self.tracker.uri).startswith("sqlite:///"):
            table = runs_table_url("http://127.0.0.1:5000", self.tracker.experiment_id)
            log.info(f"see the runs: mlflow ui --backend-store-uri {self.tracker.uri}, then open {table}")

    def _record_divergence(self, err: Diverged) -> None:
        """runner.json says the run diverged, so the same command refuses instead of resuming into it. Every rank
        raised it at the same step, from losses summed over the ranks: they leave their group together."""
        self.ranks.raised_together = True
        if self.ranks.is_main:
            self.record.diverged = str(err).split(". Checkpoints written before")[0]
            self.record.save()

    def _log(
        self, epochs: list[tuple[int, dict[str, float], dict[int, float], int]], partial: dict[int, float]
    ) -> None:
        self.tracker.log_epochs([(epoch, metrics, ended) for epoch, metrics, _, ended in epochs])
        steps = {step: lr for _, _, epoch_steps, _ in epochs for step, lr in epoch_steps.items()}
        self.tracker.log_series("lr_step", {**steps, **partial})

    def _wait_for_tracking(self) -> Exception | None:
        """Let the persist thread log what it has; its failure, if any.

        MLflow's client gives up on a server that stops answering after about ``tracking.wait_s`` (Tracker), and
        after that first failure the thread asks MLflow nothing more: a lost server costs one bounded wait per run.
        The timeout here is a last resort (importing MLflow alone can take seconds on a busy machine).
        """
        try:
            self.persister.close(timeout=2 * self.tracking_wait_s + 60)
        except Exception as err:  # noqa: BLE001 - reported by the caller in one line
            return err
        return None

    def _raise_if_behind(self, err: Exception | None) -> None:
        """Raise the one line for a run whose checkpoint holds epochs MLflow lacks, if it does; runner.json stays
        unfinished, so the same command resumes from the last checkpoint, trains nothing more and logs them."""
        if err is None:
            return
        missing = len(self.history.epochs) - self.tracker.logged_epochs
        reason = first_line(err)
        uri = self.tracker.uri
        if str(uri).startswith(("http://", "https://")):
            what, fix = f"MLflow at {uri} stopped answering", "with the tracking server up"
        else:  # a local store: a full disk, a locked or unwritable database, not a server gone away
            what, fix = f"logging to MLflow at {uri} failed", "once the store is writable again"
        raise TrackingBehind(
            f"{what} ({reason}); {missing} epoch(s) of {self.record.run_dir} are not in MLflow yet, though "
            f"checkpointed. Run the same command again, {fix}, to log them."
        )
