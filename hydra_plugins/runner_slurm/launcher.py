"""hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml): the submitit plugin's SLURM launcher, where a job sbatch
refuses, and a job that ends without a result (cancelled outright), are one line each instead of a traceback, and
a job cancelled outright is noticed without SLURM accounting too (``runner.cluster``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


class RunnerSlurmLauncher(SlurmLauncher):
    """The plugin's launcher; a job sbatch refuses ends the sweep in one line."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.utils import FailedJobError, UncompletedJobError
        from submitit.slurm.slurm import SlurmJob

        from runner.cluster import ended_without_result, sbatch_refusal, squeue_watcher
        from runner.errors import ConfigError, NotFinished, report_error

        # submitit's jobs share one watcher, a class attribute; this one also works without SLURM accounting.
        SlurmJob.watcher = squeue_watcher()
        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as err:  # submitit has printed sbatch's own stderr just before
            called = err.__cause__
            if not (isinstance(called, subprocess.CalledProcessError) and called.cmd and called.cmd[0] == "sbatch"):
                raise
            sys.exit(report_error(ConfigError(sbatch_refusal(str(err)))))
        except UncompletedJobError as err:
            message = ended_without_result(str(err))
            if message is None:
                raise
            sys.exit(report_error(NotFinished(message)))
