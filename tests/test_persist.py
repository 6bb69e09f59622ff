"""The persist thread: jobs run in order, off the caller's thread; a failure reaches the caller."""

from __future__ import annotations

import threading
import time

import pytest

from runner.persist import Persister


def test_jobs_run_in_order_on_another_thread_and_flush_waits_for_them():
    done, threads = [], set()
    persister = Persister()
    for i in range(5):

        def job(i=i):
            time.sleep(0.01)
            threads.add(threading.current_thread().name)
            done.append(i)

        persister.submit(job)
    persister.flush()
    assert done == [0, 1, 2, 3, 4] and threads == {"runner-persist"}
    persister.close()


def test_a_failure_is_raised_in_the_caller_and_later_jobs_are_skipped():
    done = []
    persister = Persister()
    persister.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    persister.submit(lambda: done.append("after"))
    with pytest.raises(OSError, match="disk full"):
        persister.flush()
    persister.submit(lambda: done.append("later"))
    persister.close()
    assert done == [], "nothing is logged after an epoch that was not written"
