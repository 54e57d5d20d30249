"""flowkern.bench.timer.Timer, the one timer of `flowkern bench` and bench/*.py, on the CPU (its GPU path runs in
bench/gpu_check.sh)."""
import time

import pytest

from flowkern.bench.timer import Timer


class Calls:
    """A callable that sleeps `ms` and records when each call started."""

    def __init__(self, ms: float):
        self.ms, self.starts = ms, []

    @property
    def count(self) -> int:
        return len(self.starts)

    def __call__(self):
        self.starts.append(time.perf_counter())
        time.sleep(self.ms / 1e3)


def test_fixed_repetitions_after_one_warm_up_call():
    fn = Calls(2)
    median = Timer("cpu", warmup_ms=0, min_reps=5, max_reps=5).median_ms(fn)
    assert fn.count == 1 + 5 and median >= 2.0


def test_repetitions_follow_rep_ms_within_the_bounds():
    fn = Calls(5)
    Timer("cpu", warmup_ms=0, rep_ms=20, min_reps=2, max_reps=100).median_ms(fn)
    assert 1 + 2 <= fn.count <= 1 + 4   # about 20 ms of 5 ms calls
    fn = Calls(5)
    Timer("cpu", warmup_ms=0, rep_ms=1000, min_reps=2, max_reps=3).median_ms(fn)
    assert fn.count == 1 + 3


def test_warm_up_runs_for_warmup_ms():
    fn = Calls(2)
    Timer("cpu", warmup_ms=20, min_reps=1, max_reps=1).median_ms(fn)
    assert fn.count >= 3 and fn.starts[-1] - fn.starts[0] >= 0.020   # warm-up calls for 20 ms, then one timed


def test_past_the_deadline_one_sample_is_kept():
    timer = Timer("cpu", warmup_ms=0, min_reps=10, max_reps=10)
    timer.deadline = time.monotonic() - 1
    fn = Calls(1)
    assert timer.median_ms(fn) >= 1.0 and fn.count == 2


def test_first_call_counts_and_description_on_cpu():
    timer = Timer("cpu", warmup_ms=10, min_reps=3, max_reps=3)
    result, ms = timer.first_call(lambda: time.sleep(0.003) or "done")
    assert result == "done" and ms >= 3.0
    assert timer.counts(Calls(0)) == {}   # the profiler counts are a GPU's
    assert timer.describe() == "median of 3 calls after a 10 ms warm-up; wall clock (perf_counter)"


def test_bad_bounds_are_named():
    with pytest.raises(ValueError, match="min_reps <= max_reps"):
        Timer("cpu", min_reps=5, max_reps=2)
