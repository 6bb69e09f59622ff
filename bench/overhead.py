"""How much the runner costs over a hand-written PyTorch loop, measured in one process run.

    python bench/overhead.py [--repeats 7] [--json bench/results/overhead.json]

Runner and plain loop are timed alternately, epoch by epoch, so machine noise falls on both; each figure is the
median over repeats. CPU, one thread. Prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.build import build_everything  # noqa: E402
from runner.checkpoint import save_checkpoint  # noqa: E402
from runner.config import register_schemas  # noqa: E402
from runner.data import DeviceBatcher, epoch_permutation  # noqa: E402
from runner.distributed import Distributed  # noqa: E402
from runner.launch import RunSettings  # noqa: E402
from runner.resume import RunRecord  # noqa: E402
from runner.session import TrainingSession, make_loop  # noqa: E402
from runner.tracking import Tracker  # noqa: E402
from runner.tracking_process import prestart  # noqa: E402
from runner.train import Loop, Progress, evaluate, train, train_one_epoch  # noqa: E402

CPU = torch.device("cpu")


def compose_config(*overrides: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["trainer.device=cpu", "trainer.progress_bar=true", *overrides])


def runner_loop(cfg) -> Loop:
    return make_loop(cfg, build_everything(cfg, CPU), Distributed(CPU))


def plain_epoch(model, optimizer, scheduler, batches) -> float:
    """The textbook loop: forward, loss, zero_grad, backward, step; scheduler.step per epoch."""
    model.train()
    total = 0.0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.detach()
    scheduler.step()
    return float(total)


def plain_validation(model, batches, metrics: dict) -> dict[str, float]:
    """The textbook validation: eval mode, no grad, the mean loss, each torchmetrics metric updated every batch."""
    model.eval()
    loss_sum, samples = 0.0, 0
    for metric in metrics.values():
        metric.reset()
    with torch.no_grad():
        for x, y in batches:
            outputs = model(x)
            loss_sum += F.cross_entropy(outputs, y, reduction="sum")
            samples += len(y)
            for metric in metrics.values():
                metric.update(outputs, y)
    return {"val_loss": float(loss_sum) / samples} | {name: float(m.compute()) for name, m in metrics.items()}


def plain_metrics(loop: Loop) -> dict:
    """What a user would write for accuracy, f1 and top5_accuracy: torchmetrics' classes, fresh."""
    from torchmetrics.classification import MulticlassAccuracy

    classes = loop.metrics["f1"].num_classes
    return {
        "accuracy": MulticlassAccuracy(num_classes=classes, average="micro"),
        "f1": copy.deepcopy(loop.metrics["f1"]),
        "top5_accuracy": MulticlassAccuracy(num_classes=classes, top_k=5, average="micro"),
    }


def indexed_batches(x, y, batch_size, seed, epoch):
    order = epoch_permutation(len(x), seed, epoch)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runner_vs_plain(overrides: list[str], repeats: int, validate: bool = False) -> dict:
    """``validate``: each epoch also validates, the runner with its ``metrics=[...]``, the plain loop with the same
    torchmetrics classes updated every batch."""
    cfg = compose_config(*overrides)
    # One model, optimizer, scheduler and data, trained in turn by the runner's loop and by the plain loop: two
    # separately built copies can differ in speed by themselves (1.5% measured between two copies of the CNN).
    loop = runner_loop(cfg)
    progress = Progress()
    in_memory = isinstance(loop.train_batches, DeviceBatcher)
    if in_memory:
        x, y = loop.train_batches.x, loop.train_batches.y
        plain_batches = lambda epoch: indexed_batches(x, y, cfg.trainer.batch_size, cfg.trainer.seed, epoch)  # noqa: E731
    else:
        plain_batches = lambda epoch: loop.train_batches.epoch(epoch)  # noqa: E731

    never = lambda step, epoch_end=False: False  # noqa: E731
    metrics = plain_metrics(loop) if validate else {}

    def plain(epoch: int) -> None:
        plain_epoch(loop.model, loop.optimizer, loop.scheduler, plain_batches(epoch))
        if validate:
            plain_validation(loop.model, loop.val_batches.epoch(0), metrics)

    def ours(epoch: int) -> None:
        train_one_epoch(loop, progress, never)
        loop.scheduler.step()
        if validate:
            evaluate(loop)

    runner_times, plain_times = [], []
    for epoch in range(repeats + 1):  # the first pair warms up
        progress.epoch, progress.batch = epoch, 0
        # Both loops run from frames of the same depth: FakeData reseeds torch for every image, and a CUDA build
        # of torch without a GPU formats the caller's stack each time, so one extra frame costs 3% of a CNN epoch.
        # Which of the two goes first alternates (ABBA), so an effect of going first or second cancels too.
        if epoch % 2:
            r, p = timed(lambda: ours(epoch)), timed(lambda: plain(epoch))
        else:
            p, r = timed(lambda: plain(epoch)), timed(lambda: ours(epoch))
        if epoch:
            runner_times.append(r)
            plain_times.append(p)
    runner_median, plain_median = statistics.median(runner_times), statistics.median(plain_times)
    # The ratio is the median of each adjacent pair's ratio: a pair shares the machine's state of the moment.
    paired = statistics.median(r / p for r, p in zip(runner_times, plain_times, strict=True))
    return {"runner_s": runner_median, "plain_s": plain_median, "ratio": paired}


def persistence_cost(repeats: int, own_process: bool, block: int = 200) -> dict:
    """What checkpointing and MLflow logging add to the default config's epochs, as the runner does them.

    Blocks of ``block`` epochs through the runner's own ``train`` with its own end-of-epoch handler (a checkpoint
    every epoch but at least trainer.checkpoint_min_seconds apart, then the MLflow logging of its epochs from the
    persist thread, waited for at the end of the block) alternate with blocks without it. ``own_process``: MLflow
    in a process of its own, as a single run (``python -m runner``) has it; else in this process, as a sweep's job
    or DDP's rank 0 has it. Also reported: one checkpoint write and one epoch's MLflow logging on their own (in this
    process), for scale.
    """
    with_times, without_times, checkpoint_times, mlflow_times = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        cfg = compose_config(f"trainer.epochs={block}", f"tracking.uri={uri}", "tracking.experiment=bench")
        built, settings, ranks = build_everything(cfg, CPU), RunSettings.of(cfg), Distributed(CPU)

        def run_block(persist: bool) -> float:
            if persist and own_process:
                prestart()  # taken by the session's tracker, as in `python -m runner`
            session = TrainingSession(cfg, built, RunRecord.new(run_dir, "bench"), settings, ranks)
            if persist:
                session.tracker.open("bench")  # a fresh MLflow run: every step is new
            start = time.perf_counter()
            train(session.loop, session.progress, session.end_epoch if persist else lambda result: None)
            if persist:
                session.persister.close()
            elapsed = time.perf_counter() - start
            session.tracker.close()
            return elapsed / block

        for repeat in range(repeats + 1):  # the first pair warms up
            if repeat % 2:  # ABBA, as for the loops
                w, wo = run_block(True), run_block(False)
            else:
                wo, w = run_block(False), run_block(True)
            if repeat:
                with_times.append(w), without_times.append(wo)
        session = TrainingSession(cfg, built, RunRecord.new(run_dir, "bench"), settings, ranks)
        session.progress.epoch = 1
        tracker = Tracker(uri, "bench").open("sync")
        for epoch in range(repeats):
            header = session.checkpoint_header()
            checkpoint_times.append(
                timed(lambda: save_checkpoint(run_dir, {**session.state.state_dict(), **header}, 2))
            )
            metrics = {"lr": 0.1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5}
            mlflow_times.append(timed(lambda: tracker.log_metrics(metrics, epoch)))
    with_s, without_s = statistics.median(with_times), statistics.median(without_times)
    fraction = statistics.median(
        w / wo - 1 for w, wo in zip(with_times, without_times, strict=True)
    )  # paired, as for the loops
    return {
        "epoch_s": without_s,
        "epoch_with_persistence_s": with_s,
        "persistence_fraction": fraction,
        "sync_checkpoint_s": statistics.median(checkpoint_times),
        "sync_mlflow_s": statistics.median(mlflow_times),
    }


EXTRA_METRICS = "metrics=[accuracy,f1,top5_accuracy]"  # the default's accuracy and two more


def metrics_cost(repeats: int) -> dict:
    """What two more validation metrics (f1, top5_accuracy) add to a whole default epoch (training + validation).

    One model trained in turn with the default metrics and with the extra ones, ABBA, median of paired ratios.
    The metrics run only in validation and accumulate on the device: no host sync per step or per batch.
    """
    loop = runner_loop(compose_config(EXTRA_METRICS))
    extra, default = loop.metrics, {"accuracy": loop.metrics["accuracy"]}
    progress, never = Progress(), lambda step, epoch_end=False: False  # noqa: E731

    def epoch_with(metrics: dict) -> float:
        loop.metrics = metrics
        progress.batch = 0
        return timed(lambda: (train_one_epoch(loop, progress, never), evaluate(loop)))

    with_times, without_times = [], []
    for repeat in range(repeats + 1):
        if repeat % 2:
            w, wo = epoch_with(extra), epoch_with(default)
        else:
            wo, w = epoch_with(default), epoch_with(extra)
        if repeat:
            with_times.append(w), without_times.append(wo)
    fraction = statistics.median(w / wo - 1 for w, wo in zip(with_times, without_times, strict=True))
    return {
        "epoch_s": statistics.median(without_times),
        "epoch_with_extra_metrics_s": statistics.median(with_times),
        "extra_metrics_fraction": fraction,
    }


def startup(repeats: int) -> dict:
    def wall(*args: str) -> float:
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cwd:
                start = time.perf_counter()
                subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {
        "cfg_job_s": wall("-m", "runner", "--cfg", "job"),
        "import_torch_mlflow_s": wall("-c", "import torch, mlflow"),
        "python_s": wall("-c", "pass"),
        "first_step_s": launch_to_first_step(repeats),
    }


def launch_to_first_step(repeats: int) -> float:
    """Seconds from starting ``python -m runner`` to its "training on …" line, logged just before the first step.

    In one folder with an existing MLflow store, as for every launch but a project's first.
    """
    times = []
    with tempfile.TemporaryDirectory() as cwd:
        for attempt in range(repeats + 1):  # the first launch creates the store
            start = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "runner", "trainer.epochs=1", "trainer.progress_bar=false", "resume=never"],
                cwd=cwd,
                stderr=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                text=True,
            )
            for line in process.stderr:
                if "] - training on " in line:
                    if attempt:
                        times.append(time.perf_counter() - start)
                    break
            process.stderr.close()
            process.wait()
    return statistics.median(times)


def batcher_vs_dataloader(repeats: int, batch_size: int = 32) -> dict:
    x, y = torch.randn(1437, 1, 8, 8), torch.randint(0, 10, (1437,))
    ours = DeviceBatcher(TensorDataset(x, y), batch_size, CPU, 0, True)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    a, b = [], []
    for epoch in range(repeats + 1):
        ta, tb = timed(lambda: [None for _ in ours.epoch(epoch)]), timed(lambda: [None for _ in loader])
        if epoch:
            a.append(ta), b.append(tb)
    return {
        "device_batcher_s": statistics.median(a),
        "dataloader_s": statistics.median(b),
        "speedup": statistics.median(b) / statistics.median(a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    workloads = {
        "digits MLP, batch 32": ["trainer.batch_size=32"],
        "digits MLP, batch 256": ["trainer.batch_size=256"],
        "FakeData CNN, batch 32": ["model=cnn", "data=fake", "data.size=640", "trainer.batch_size=32"],
        "FakeData CNN, batch 256": ["model=cnn", "data=fake", "data.size=2560", "trainer.batch_size=256"],
    }
    validated = {"digits MLP, batch 32, validated with accuracy, f1, top5": [EXTRA_METRICS]}
    results = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread, "
        f"torch {torch.__version__}".strip(),
        "loop": {name: runner_vs_plain(o, args.repeats) for name, o in workloads.items()}
        | {name: runner_vs_plain(o, args.repeats, validate=True) for name, o in validated.items()},
        "per_epoch_costs": persistence_cost(args.repeats, own_process=True),
        "per_epoch_costs_mlflow_in_process": persistence_cost(args.repeats, own_process=False),
        "extra_metrics": metrics_cost(args.repeats),
        "startup": startup(3),
        "batcher": batcher_vs_dataloader(args.repeats),
    }

    print(f"machine: {results['machine']}")
    print(f"{'workload':<56}{'runner s':>10}{'plain s':>10}{'ratio':>8}")
    for name, r in results["loop"].items():
        print(f"{name:<56}{r['runner_s']:>10.4f}{r['plain_s']:>10.4f}{r['ratio']:>8.3f}")
    c, t = results["per_epoch_costs"], results["per_epoch_costs_mlflow_in_process"]
    print(
        f"default epoch {c['epoch_s'] * 1e3:.1f} ms; with checkpoint + MLflow logging "
        f"{c['epoch_with_persistence_s'] * 1e3:.1f} ms (+{c['persistence_fraction']:.1%}, target 5%; MLflow in a "
        f"process of its own, as for python -m runner); with MLflow in this process, as for a sweep's job, "
        f"{t['epoch_with_persistence_s'] * 1e3:.1f} ms against {t['epoch_s'] * 1e3:.1f} ms "
        f"(+{t['persistence_fraction']:.1%}); done synchronously they would take {c['sync_checkpoint_s'] * 1e3:.1f} "
        f"ms + {c['sync_mlflow_s'] * 1e3:.1f} ms (blocks of 200 epochs; trainer.checkpoint_min_seconds=1)"
    )
    m = results["extra_metrics"]
    print(
        f"default epoch with validation {m['epoch_s'] * 1e3:.1f} ms; with f1 and top5_accuracy as well "
        f"{m['epoch_with_extra_metrics_s'] * 1e3:.1f} ms (+{m['extra_metrics_fraction']:.1%})"
    )
    s = results["startup"]
    print(
        f"start-up: --cfg job {s['cfg_job_s']:.2f}s; launch to first step {s['first_step_s']:.2f}s; "
        f"python -c 'import torch, mlflow' {s['import_torch_mlflow_s']:.2f}s; bare python {s['python_s']:.2f}s"
    )
    b = results["batcher"]
    print(
        f"digits batch 32: device batcher {b['device_batcher_s'] * 1e3:.2f} ms/epoch vs DataLoader "
        f"{b['dataloader_s'] * 1e3:.2f} ms/epoch ({b['speedup']:.1f}x)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
