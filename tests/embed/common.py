"""Shared by the embedding-job tests: a small corpus, the CLI in a subprocess, and the job's worker processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHO = ("A man", "A woman", "The dog", "Two girls", "Three boys", "The child")
DOING = ("is playing", "is running", "is eating", "sits", "walks")
WHERE = ("on the beach", "in the snow", "near the car", "with a red ball")
SENTENCES = [f"{w} {d} {p}." for w in WHO for d in DOING for p in WHERE]  # 120 distinct
DEADLINE_S = 120
BIG_ROWS = 3000  # a CLI job on this many rows runs for seconds: time to kill it, or a worker, in the middle
BIG_SHARD_ROWS = 100


def cli(*args) -> subprocess.Popen:
    """`python -m flowkern ARGS` (XDG_CACHE_HOME and the rest of the environment inherited)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "flowkern", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, timeout: float = DEADLINE_S, poll: float = 0.02):
    """Poll until condition() is truthy (returned); fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def done_shards(out: Path) -> int:
    return len(list(out.glob("shard-*.done.json")))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def worker_pids(parent: int) -> list[int]:
    """The multiprocessing (spawn) children of `parent` that are alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if spawned and alive(int(entry.name)):
            found.append(int(entry.name))
    return found
