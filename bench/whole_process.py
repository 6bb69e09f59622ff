"""What a run costs as a user lives it: whole processes, the runner's default job (checkpoints and MLflow on)
against bench/plain_script.py, the same model, data, optimizer, schedule and seed written by hand.

    python bench/whole_process.py [--repeats 3] [--short 5] [--long 1005] [--sweep] [OVERRIDE ...]

OVERRIDEs go to the runner's command (``tracking.log_model=false``: the cost without the model logged at the end).

Each figure is the median over repeats; runner and plain script alternate (ABBA) so machine noise falls on both.
One thread each (OMP_NUM_THREADS=1), a warm MLflow store (created by an untimed first run, as a user's second run
finds it). Prints:
- fixed cost: t_runner(short) - t_plain(short), the seconds a run costs beyond the script;
- per epoch: (t_runner(long) - t_runner(short)) / (t_plain(long) - t_plain(short)), and the same from the times the
  long runs print their epoch lines (epoch 5 to the last), which leaves out start-up and end and their noise;
- with --sweep, a 4-job joblib sweep of short runs against the 4 plain scripts run as many at a time as joblib
  runs jobs (one per core), and from the two the cost per job.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "bench" / "plain_script.py"


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) ")  # the line both print after each epoch
EPOCH_SECONDS: dict[tuple[str, int], list[float]] = {}  # (runner or plain, epochs): seconds an epoch, by its lines


def wall(command: list[str], cwd: Path) -> float:
    """Wall seconds of ``command``; also the seconds between its epoch lines, from the 5th to the last, into
    EPOCH_SECONDS: an epoch's cost without the start-up and the end, whose noise the per-epoch figure divides."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    tail: list[str] = []
    for line in process.stderr:
        if match := EPOCH_LINE.search(line):
            seen[int(match[1])] = time.perf_counter()
        tail = (tail + [line])[-40:]
    process.wait()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{''.join(tail)}")
    last = max(seen, default=0)
    if last > 5:
        side = "plain" if str(PLAIN) in command else "runner"
        EPOCH_SECONDS.setdefault((side, last), []).append((seen[last] - seen[5]) / (last - 5))
    return elapsed


OVERRIDES: list[str] = []  # from the command line


def runner(epochs: int) -> list[str]:
    return [sys.executable, "-m", "runner", f"trainer.epochs={epochs}", "resume=never", *OVERRIDES]


def plain(epochs: int) -> list[str]:
    return [sys.executable, str(PLAIN), str(epochs)]


def paired(repeats: int, epochs: int, cwd: Path) -> tuple[float, float]:
    """Median wall seconds of the runner and of the plain script for ``epochs``, in ABBA order."""
    times: dict[str, list[float]] = {"runner": [], "plain": []}
    for i in range(repeats):
        order = ("runner", "plain") if i % 2 == 0 else ("plain", "runner")
        for side in order:
            times[side].append(wall(runner(epochs) if side == "runner" else plain(epochs), cwd))
    return statistics.median(times["runner"]), statistics.median(times["plain"])


def sweep_cost(cwd: Path, epochs: int, repeats: int) -> tuple[float, float, int]:
    """Median wall seconds of a 4-job joblib sweep of ``epochs``-epoch runs and of the same 4 plain scripts run as
    many at a time as joblib runs jobs (one per core), in ABBA order; and that number of lanes."""
    sweep = [
        sys.executable,
        "-m",
        "runner",
        "-m",
        "hydra/launcher=joblib",
        f"trainer.epochs={epochs}",
        "resume=never",
        "trainer.seed=0,1,2,3",
        *OVERRIDES,
    ]
    lanes = min(4, os.cpu_count() or 1)  # joblib's n_jobs=-1: a worker per core

    def four_plain_scripts() -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lambda _: wall(plain(epochs), cwd), range(4)))
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"sweep": [], "plain": []}
    for i in range(repeats):
        order = ("sweep", "plain") if i % 2 == 0 else ("plain", "sweep")
        for side in order:
            times[side].append(wall(sweep, cwd) if side == "sweep" else four_plain_scripts())
    return statistics.median(times["sweep"]), statistics.median(times["plain"]), lanes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=5)
    # Per epoch from SHORT to LONG: 1000 epochs apart, so that the machine's noise (±0.3 s a process here, ±1 s
    # at times) moves the ratio less: 5 against 205 epochs moved it by ±30%, 405 against 805 from 0.96 to 1.28.
    parser.add_argument("--long", type=int, default=1005)
    parser.add_argument("--sweep", action="store_true", help="also time a 4-job joblib sweep")
    parser.add_argument("overrides", nargs="*", help="for the runner's command, e.g. tracking.log_model=false")
    args = parser.parse_args()
    if args.long <= max(args.short, 5):  # per epoch divides by the difference; the epoch lines count from the 5th
        parser.error(f"--long must be above --short and above 5, got --short {args.short} --long {args.long}")
    OVERRIDES.extend(args.overrides)
    print(f"runner: python -m runner {' '.join(runner(args.short)[3:])}")
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        wall(runner(1), cwd)  # creates the MLflow store, as a user's first run does
        times = {epochs: paired(args.repeats, epochs, cwd) for epochs in dict.fromkeys([args.short, args.long])}
        for epochs, (by_runner, by_plain) in times.items():
            print(f"{epochs} epochs: runner {by_runner:.2f} s, plain script {by_plain:.2f} s")
        (short_runner, short_plain), (long_runner, long_plain) = times[args.short], times[args.long]
        per_epoch = (long_runner - short_runner) / (long_plain - short_plain)
        print(f"fixed cost: {short_runner - short_plain:+.2f} s (target <= 1.5 s)")
        print(f"per epoch, {args.short} to {args.long} epochs: runner/plain {per_epoch:.3f} (target <= 1.05)")
        by_lines = {side: statistics.median(EPOCH_SECONDS[(side, args.long)]) for side in ("runner", "plain")}
        print(
            f"per epoch, from the epoch lines of the {args.long}-epoch runs (epoch 5 to the last): runner "
            f"{by_lines['runner'] * 1000:.2f} ms, plain script {by_lines['plain'] * 1000:.2f} ms: "
            f"{by_lines['runner'] / by_lines['plain']:.3f}"
        )
        if args.sweep:
            swept, plain_total, lanes = sweep_cost(cwd, args.short, args.repeats)
            # Each lane runs 4 / lanes jobs, so a lane's extra seconds divided by its jobs is the cost of one job.
            print(
                f"4-job joblib sweep of {args.short}-epoch runs: {swept:.2f} s; the 4 plain scripts, {lanes} at a "
                f"time: {plain_total:.2f} s; per job {(swept - plain_total) * lanes / 4:+.2f} s"
            )


if __name__ == "__main__":
    main()
