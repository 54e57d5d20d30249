"""Slow external work of a test run (compilers) started as soon as the run knows it will need it, one job at a
time on a background thread: pytest runs the tests in one process, which leaves a second core idle for them.

A test module that defines start_in_background(item) is called with each of its collected tests at the start of
the run (tests/conftest.py); it queues that test's job with BACKGROUND.submit, and the test collects the result
with BACKGROUND.result (which runs the job first if the run did not queue it, e.g. in a pytest-xdist worker)."""
from __future__ import annotations

import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


def run_in_order(commands: list[list[str]], timeout: float) -> tuple[list[str], subprocess.CompletedProcess]:
    """Runs the commands one after the other, stopping at the first that fails; returns the last one run and its
    CompletedProcess (subprocess.TimeoutExpired if one ran too long)."""
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            break
    return command, done


class BackgroundJobs:
    """Named jobs (callables without arguments), each run once per test run, one at a time."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background-job")
        self._jobs: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, name: str, job: Callable[[], Any]) -> Future:
        with self._lock:
            if name not in self._jobs:
                self._jobs[name] = self._pool.submit(job)
            return self._jobs[name]

    def result(self, name: str, job: Callable[[], Any]) -> Any:
        """The job's return value (or its exception), once it has run."""
        return self.submit(name, job).result()

    def cancel_pending(self) -> None:
        """Drops the jobs not yet started (a run that stopped early); the one running finishes."""
        self._pool.shutdown(wait=False, cancel_futures=True)


BACKGROUND = BackgroundJobs()
