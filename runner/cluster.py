"""``hydra/launcher=slurm``: what the runner adds to hydra-submitit-launcher's SLURM launcher.

The preset asks for a GPU per job; on a partition without GPUs (or with a wrong partition, account, QOS) sbatch
refuses the job, and the plugin lets submitit's error out of Hydra as a traceback. Here it is sbatch's own line
(submitit prints it) and one line naming the setting to change, exit code 2, before any job runs. Nothing here
imports torch.

With SLURM accounting off, submitit cannot tell that a job cancelled outright has ended; ``squeue_watcher``
asks ``squeue`` instead, and such a job ends the sweep in one line too.

The launcher class itself is ``hydra_plugins.runner_slurm.launcher.RunnerSlurmLauncher``: Hydra instantiates
plugins from the ``hydra_plugins`` package only.
"""

from __future__ import annotations

import re
import subprocess

# sbatch's words for a request the partition cannot meet, and the setting that asked for it.
HINTS = {
    "gres": "this partition has no GPUs (or not that many): set hydra.launcher.gpus_per_node=null, or pick a "
    "partition with GPUs (hydra.launcher.partition=...)",
    "partition": "set hydra.launcher.partition to one `sinfo` lists",
    "memory": "ask for less: hydra.launcher.mem_gb=...",
    "node configuration": "ask for fewer CPUs, GPUs or memory per node (hydra.launcher.cpus_per_task, gpus_per_node, "
    "tasks_per_node, mem_gb)",
}


def sbatch_refusal(stderr: str) -> str:
    """One sentence: what sbatch said and which launcher setting to change."""
    said = " ".join(line.strip() for line in stderr.splitlines() if line.strip()) or "no reason given"
    hint = next(
        (fix for word, fix in HINTS.items() if word in said.lower()),
        "see `man sbatch` and hydra.launcher.*",
    )
    return f"sbatch refused the job ({said}); {hint}."


NOT_LISTED = "NOT_IN_SQUEUE"  # the state of a job squeue no longer lists: it has ended


def ended_without_result(message: str) -> str | None:
    """One line for submitit's "Job ID (task: N) with path ... has not produced any output (state: STATE)", the
    error of a job that ended without writing its result; None for any other error."""
    found = re.search(r"^Job (\S+) .*?has not produced any output \(state: ([^)]*)\)", message, re.DOTALL)
    if found is None:
        return None
    job, state = found.groups()
    return (
        f"SLURM job {job} ended without a result (state {state}): cancelled (scancel) or its node failed. Its run "
        f"directory keeps the last checkpoint; start the same command again to resume it."
    )


def squeue_watcher() -> object:
    """submitit's SLURM job watcher, asking ``squeue`` where ``sacct`` cannot answer (SLURM accounting off).

    The launching process learns that a job ended from the job's result file or, for a job that wrote none (one
    cancelled outright, or whose node died), from ``sacct``. Without accounting ``sacct`` fails, submitit takes
    every job for still running, and the launching process waits forever. ``squeue`` lists a job while it is
    queued, running or requeued, and for ``MinJobAge`` seconds (300 by default) after it ends: one it no longer
    lists, or lists as ended, has ended.
    """
    import getpass

    from submitit.slurm.slurm import SlurmInfoWatcher

    class SqueueWhenNoAccounting(SlurmInfoWatcher):
        def __init__(self, delay_s: int) -> None:
            super().__init__(delay_s=delay_s)
            self._accounting: bool | None = None  # asked once, at the first update

        def _make_command(self) -> list[str] | None:
            command = super()._make_command()
            if command is None:
                return None
            if self._accounting is None:
                self._accounting = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True).returncode == 0
            if self._accounting:
                return command
            return ["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if self._accounting:
                return super().read_info(string)
            text = string.decode() if isinstance(string, bytes) else string
            listed = dict(line.split("|", 1) for line in text.splitlines() if "|" in line)
            return {job: {"State": listed.get(job, NOT_LISTED)} for job in self._registered - self._finished}

    return SqueueWhenNoAccounting(delay_s=600)
