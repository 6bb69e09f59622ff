"""Every command line in README.md runs in bash exactly as written, so quoting that works in the README works in a
terminal.

Commands are taken from the README's fenced code blocks: a block whose first line is a command (``python``,
``torchrun``, ``mlflow``, ``pip``, ``pytest``, ``mkdir``, ``printf``) holds one command per line (a line ending in
``\\`` continues on the next; ``#`` lines are comments); in a transcript block only the lines after a ``$ `` prompt
are commands, and the lines below each are its output. They run in the README's order through ``bash -c``, in one
temporary folder (so a sweep's ``mlflow.db`` is there for ``runner.compare`` after it, as for a user), and must exit
0, or 2 where the README shows them as bad input (the "Bad input" section, or a transcript whose output is an
``error:`` line). A command neither run nor listed in EXCLUDED with its reason fails the test, so a new README line
is covered the day it is written.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# The commands run in README order in one folder (a later one resumes what an earlier one trained), so all in one
# pytest-xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND_WORDS = ("python", "torchrun", "mlflow", "pip", "pytest", "mkdir", "printf")

# Commands that cannot run here, each with why. Matched on the whole command, or on a part where a family is meant.
EXCLUDED: dict[str, str] = {
    "pip install": "installs into the environment under test; CI runs the set-up itself (.ci/run)",
    "pytest": "this is the test suite itself",
    "ruff format --check": "checks this repository's code, not the user's folder; .ci/run runs it on the checkout",
    "mlflow ui": "a server that runs until stopped; tests/test_sweeps.py runs a real `mlflow server` and checks it answers",
    "hydra/launcher=slurm": "needs a real SLURM cluster (sbatch); the submitit path is tested with the local executor",
    "--nnodes=2": "several machines (--master_addr=HOST0)",
    "torchrun --standalone --nproc_per_node=4": "four GPUs; two-process torchrun on the CPU runs below and in "
    "tests/test_distributed.py",
    "tail -f": "follows a running SLURM job's log until Ctrl-C; tests/test_slurm.py reads those logs",
    "echo $?": "a transcript line that prints the exit status of the command before it in the same terminal",
}
# Commands the README shows failing on purpose, outside the "Bad input" section, and what they exit with.
EXPECTED_EXIT = {
    "python -m runner tracking.uri=http://127.0.0.1:5000 tracking.experiment=schedules": 2,  # no server here: refused
    "python -m runner optimizer.lr=1e30": 1,  # diverges: the "What the runner promises" example
}
# torchrun reports a worker's failure with its own exit status, 1.
TORCHRUN_FAILURE = 1


@dataclass
class Command:
    text: str
    line: int
    section: str
    shows_error: bool = False

    @property
    def excluded(self) -> str | None:
        return next((why for key, why in EXCLUDED.items() if key in self.text), None)

    @property
    def expected_exit(self) -> int:
        if self.text in EXPECTED_EXIT:
            return EXPECTED_EXIT[self.text]
        bad = self.section == "Bad input" or self.shows_error
        if bad and self.text.startswith("torchrun"):
            return TORCHRUN_FAILURE
        return 2 if bad else 0


def readme_commands(text: str) -> list[Command]:
    """The command lines of the README's fenced blocks, continuation lines joined."""
    commands: list[Command] = []
    section, block, block_start = "", None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if block is None and line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            if block is None:
                block, block_start = [], number + 1
            else:
                commands += _block_commands(block, block_start, section)
                block = None
        elif block is not None:
            block.append(line)
    return commands


def _block_commands(lines: list[str], start: int, section: str) -> list[Command]:
    first = next((line for line in lines if line.strip()), "")
    transcript = first.startswith("$ ")
    if not transcript and not first.startswith(COMMAND_WORDS):
        return []  # output, a file layout, a diagram
    commands: list[Command] = []
    pending = ""
    for offset, line in enumerate(lines):
        if transcript and not pending:
            if not line.startswith("$ "):
                if commands and "[ERROR] - error:" in line:
                    commands[-1].shows_error = True
                continue
            line = line[2:]
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line + "\n"
            continue
        commands.append(Command(pending + line, start + offset, section))
        pending = ""
    return commands


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands_and_every_exclusion_is_still_used():
    assert len(COMMANDS) > 20
    used = {key for key in EXCLUDED for command in COMMANDS if key in command.text}
    assert used == set(EXCLUDED), f"exclusions no README command needs any more: {set(EXCLUDED) - used}"
    assert set(EXPECTED_EXIT) <= {command.text for command in COMMANDS}


def test_a_new_readme_command_is_run_or_excluded_with_a_reason():
    """The same rule the run below applies, stated on its own: nothing in the README escapes the check."""
    for command in COMMANDS:
        assert command.excluded or command.text.split()[0] in COMMAND_WORDS, command


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory) -> Path:
    """The user's folder: with the files the README's commands name (a table, a Parquet file, photos, my_data.py)."""
    import numpy as np
    import pandas as pd
    from test_experiment import make_image_folder, write_table

    folder = tmp_path_factory.mktemp("readme")
    write_table(folder / "iris.csv")
    rng = np.random.default_rng(0)
    area = rng.uniform(30, 200, 300)
    pd.DataFrame({"area": area, "rooms": np.round(area / 30), "price": 3.0 * area + rng.normal(0, 20, 300)}).to_parquet(
        folder / "houses.parquet"
    )
    make_image_folder(folder / "photos", per_class=8, size=16)
    own_data = README.read_text().split("### Bring your own data", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    (folder / "my_data.py").write_text(own_data)
    return folder


@pytest.mark.parametrize("command", COMMANDS, ids=[f"README:{c.line}" for c in COMMANDS])
def test_the_readme_command_runs_in_bash_as_written(command: Command, readme_folder: Path):
    if command.excluded:
        pytest.skip(f"{command.text.splitlines()[0]}: {command.excluded}")
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    done = subprocess.run(
        ["bash", "-c", command.text],
        check=False,
        cwd=readme_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == command.expected_exit, f"README line {command.line}: {command.text}\n{output}"
    if command.expected_exit == 2 and not command.text.startswith("torchrun"):
        errors = [line for line in output.splitlines() if "[runner][ERROR] - error:" in line]
        assert errors, output  # bad input is one line naming the problem, never a traceback
        assert "Traceback" not in output


def test_the_lambda_sections_commands_are_all_run():
    lambda_commands = [c for c in COMMANDS if "lr_lambda" in c.text or "decay" in c.text]
    assert len(lambda_commands) >= 6
    assert not [c for c in lambda_commands if c.excluded]
    assert re.search(r"-m scheduler=lambda 'scheduler\.lr_lambda=\"[^']+\",\"", "\n".join(c.text for c in COMMANDS))
