"""How much the runner costs over a hand-written PyTorch loop, measured in one process run.

    python bench/overhead.py [--repeats 7] [--json bench/results/overhead.json]

Runner and plain loop are timed alternately, epoch by epoch, so machine noise falls on both; each figure is the
median over repeats. CPU, one thread. Prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
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
from runner.data import DeviceBatcher, epoch_permutation, make_batcher  # noqa: E402
from runner.resume import RunRecord  # noqa: E402
from runner.run import epoch_metrics, state_bundle  # noqa: E402
from runner.tracking import Tracker  # noqa: E402
from runner.train import EpochResult, Loop, Progress, train_one_epoch  # noqa: E402

CPU = torch.device("cpu")


def compose_config(*overrides: str):
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["trainer.device=cpu", "trainer.progress_bar=true", *overrides])


def runner_loop(cfg) -> Loop:
    built = build_everything(cfg, CPU)
    t = cfg.trainer
    return Loop(built.model, built.optimizer, built.scheduler,
                make_batcher(built.data.train, t.batch_size, CPU, t.seed, True, t.num_workers),
                make_batcher(built.data.val, t.batch_size, CPU, t.seed, False, t.num_workers),
                built.data.is_classification, t.epochs, t.progress_bar)


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


def indexed_batches(x, y, batch_size, seed, epoch):
    order = epoch_permutation(len(x), seed, epoch)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runner_vs_plain(overrides: list[str], repeats: int) -> dict:
    cfg = compose_config(*overrides)
    ours = runner_loop(cfg)
    theirs = runner_loop(cfg)  # same model, data, optimizer and scheduler, driven by the plain loop
    progress = Progress()
    in_memory = isinstance(theirs.train_batches, DeviceBatcher)
    if in_memory:
        x, y = theirs.train_batches.x, theirs.train_batches.y
        plain_batches = lambda epoch: indexed_batches(x, y, cfg.trainer.batch_size, cfg.trainer.seed, epoch)  # noqa: E731
    else:
        plain_batches = lambda epoch: theirs.train_batches.epoch(epoch)  # noqa: E731

    def ours_epoch(epoch):
        progress.epoch, progress.batch = epoch, 0
        train_one_epoch(ours, progress, lambda step: False)
        ours.scheduler.step()

    runner_times, plain_times = [], []
    for epoch in range(repeats + 1):  # the first pair warms up
        r = timed(lambda: ours_epoch(epoch))
        p = timed(lambda: plain_epoch(theirs.model, theirs.optimizer, theirs.scheduler, plain_batches(epoch)))
        if epoch:
            runner_times.append(r)
            plain_times.append(p)
    runner_median, plain_median = statistics.median(runner_times), statistics.median(plain_times)
    return {"runner_s": runner_median, "plain_s": plain_median, "ratio": runner_median / plain_median}


def checkpoint_and_mlflow_cost(repeats: int) -> dict:
    cfg = compose_config()
    loop = runner_loop(cfg)
    progress = Progress()
    epoch_times, checkpoint_times, mlflow_times = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        tracker = Tracker(f"sqlite:///{run_dir / 'mlflow.db'}", "bench", "bench")
        record = RunRecord.new(run_dir, "bench")
        config = {"bench": True}
        for epoch in range(repeats + 1):
            progress.epoch, progress.batch = epoch, 0
            e = timed(lambda: train_one_epoch(loop, progress, lambda step: False))
            progress.finish_epoch()
            c = timed(lambda: save_checkpoint(run_dir, state_bundle(loop, progress, [], {}, record, config), keep=2))
            m = timed(lambda: tracker.log_metrics(epoch_metrics(EpochResult(epoch, [0.1], {"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5})), epoch))
            if epoch:
                epoch_times.append(e), checkpoint_times.append(c), mlflow_times.append(m)
    epoch_s = statistics.median(epoch_times)
    return {"epoch_s": epoch_s, "checkpoint_s": statistics.median(checkpoint_times), "mlflow_s": statistics.median(mlflow_times),
            "checkpoint_fraction": statistics.median(checkpoint_times) / epoch_s, "mlflow_fraction": statistics.median(mlflow_times) / epoch_s}


def startup(repeats: int) -> dict:
    def wall(*args: str) -> float:
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cwd:
                start = time.perf_counter()
                subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True)
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"cfg_job_s": wall("-m", "runner", "--cfg", "job"), "import_torch_mlflow_s": wall("-c", "import torch, mlflow"),
            "python_s": wall("-c", "pass")}


def batcher_vs_dataloader(repeats: int, batch_size: int = 32) -> dict:
    x, y = torch.randn(1437, 1, 8, 8), torch.randint(0, 10, (1437,))
    ours = DeviceBatcher(TensorDataset(x, y), batch_size, CPU, 0, True)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    a, b = [], []
    for epoch in range(repeats + 1):
        ta, tb = timed(lambda: [None for _ in ours.epoch(epoch)]), timed(lambda: [None for _ in loader])
        if epoch:
            a.append(ta), b.append(tb)
    return {"device_batcher_s": statistics.median(a), "dataloader_s": statistics.median(b), "speedup": statistics.median(b) / statistics.median(a)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    workloads = {
        "digits MLP, batch 32": ["trainer.batch_size=32"],
        "digits MLP, batch 256": ["trainer.batch_size=256"],
        "FakeData CNN, batch 32": ["model=cnn", "data=fake", "data.size=640", "trainer.batch_size=32"],
        "FakeData CNN, batch 256": ["model=cnn", "data=fake", "data.size=2560", "trainer.batch_size=256"],
    }
    results = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread, torch {torch.__version__}".strip(),
               "loop": {name: runner_vs_plain(o, args.repeats) for name, o in workloads.items()},
               "per_epoch_costs": checkpoint_and_mlflow_cost(args.repeats),
               "startup": startup(3),
               "batcher": batcher_vs_dataloader(args.repeats)}

    print(f"machine: {results['machine']}")
    print(f"{'workload':<26}{'runner s':>10}{'plain s':>10}{'ratio':>8}")
    for name, r in results["loop"].items():
        print(f"{name:<26}{r['runner_s']:>10.4f}{r['plain_s']:>10.4f}{r['ratio']:>8.3f}")
    c = results["per_epoch_costs"]
    print(f"default epoch {c['epoch_s']:.4f}s; checkpoint {c['checkpoint_s']:.4f}s ({c['checkpoint_fraction']:.1%}), "
          f"MLflow logging {c['mlflow_s']:.4f}s ({c['mlflow_fraction']:.1%})")
    s = results["startup"]
    print(f"start-up: --cfg job {s['cfg_job_s']:.2f}s; python -c 'import torch, mlflow' {s['import_torch_mlflow_s']:.2f}s; bare python {s['python_s']:.2f}s")
    b = results["batcher"]
    print(f"digits batch 32: device batcher {b['device_batcher_s'] * 1e3:.2f} ms/epoch vs DataLoader {b['dataloader_s'] * 1e3:.2f} ms/epoch ({b['speedup']:.1f}x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
