"""Worker processes that live and die with the job, watched by it.

Each worker asks Linux for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so a `kill -9` of the job
leaves no worker writing into the output directory; the parent waits on every worker's result pipe and process
sentinel at once, so a worker that dies (the out-of-memory killer, a `kill -9`) fails the job at once, with the
cause, instead of leaving it waiting.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import wait
from typing import Callable, Sequence

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have this process killed when its parent dies; exit now if the parent is already gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    exit_if_orphaned(parent_pid)


def exit_if_orphaned(parent_pid: int) -> None:
    """Where no death signal exists, the worker also checks between shards whether its parent is gone."""
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_main(connection, parent_pid: int, target: Callable, task) -> None:
    die_with_parent(parent_pid)
    try:
        result = ("ok", target(task))
    except BaseException as error:  # handed to the parent, raised there
        # The traceback does not travel with the exception: a note carries it (tracebacks show notes, the
        # command line's one-line errors do not).
        error.add_note("in the worker process:\n" + "".join(traceback.format_exception(error)).rstrip())
        try:
            pickle.loads(pickle.dumps(error))
            result = ("error", error)
        except Exception:
            result = ("error", RuntimeError(f"{type(error).__name__}: {error}"))
    connection.send(result)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"was killed by {name}" + (" (kill -9, or the out-of-memory killer)" if name == "SIGKILL" else "")
    return f"exited with status {exitcode} before reporting"


def run_workers(target: Callable, tasks: Sequence, names: Sequence[str]) -> list:
    """target(task) in one spawned process per task; their results in task order. The first worker to fail
    or die stops the others and raises: its exception, or ChildProcessError naming how it died."""
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for task in tasks:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_worker_main, args=(writer, os.getpid(), target, task), daemon=True)
            process.start()
            writer.close()  # the worker holds the only write end: its death reads as end of file
            workers.append((process, reader))
        results: list = [None] * len(workers)
        pending = set(range(len(workers)))
        while pending:
            wait([workers[i][1] for i in pending] + [workers[i][0].sentinel for i in pending])
            for i in sorted(pending):
                process, reader = workers[i]
                status, payload = None, None
                if reader.poll():
                    try:
                        status, payload = reader.recv()
                    except EOFError:  # the worker died without a word
                        pass
                elif process.is_alive():
                    continue
                if status is None:
                    process.join(timeout=10)
                    raise ChildProcessError(f"embedding worker {i} ({names[i]}, pid {process.pid}) "
                                            f"{_death(process.exitcode)}; the shards done so far are kept: run "
                                            f"again with --resume") from None
                if status == "error":
                    raise payload
                results[i] = payload
                pending.discard(i)
        return results
    finally:
        for process, reader in workers:
            if process.is_alive():
                process.kill()
            process.join()
            reader.close()
