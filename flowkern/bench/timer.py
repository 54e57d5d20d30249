"""The one timer of flowkern's benchmarks (`flowkern bench` and the scripts in bench/), on CPU and GPU alike.

A call is timed by the device's own clock: CUDA events around it on a GPU (the L2 cache flushed before each
timed call, so a small case does not run from the previous call's cache), time.perf_counter on the CPU. The first
call is timed apart (it compiles, autotunes, allocates); then the timer warms up for `warmup_ms`, times about
`rep_ms` worth of calls (at least `min_reps`, at most `max_reps`) and reports their median. On a GPU `counts(fn)`
adds what one call costs the host: GPU operations launched (kernels, copies, memsets; graph replays included), host
calls that wait for the device, and the GPU busy time.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

# Host calls that wait for the device (cudaMemcpy without Async blocks the host as well).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Larger than the L2 cache of any current GPU: zeroing it evicts the previous call's data (as triton's do_bench).
L2_FLUSH_BYTES = 256 * 2**20
ESTIMATE_CALLS = 5   # calls that estimate the time per call on a GPU (where one call may be microseconds)


class Timer:
    """Median time per call of a callable on `device` (see the module doc).

    deadline: a time.monotonic() after which timing stops at the samples it has (at least one), so that a
    benchmark's time budget also bounds a slow case.
    """

    def __init__(self, device: torch.device | str, warmup_ms: float = 10, rep_ms: float = 40, min_reps: int = 1,
                 max_reps: int | None = None):
        if min_reps < 1 or (max_reps is not None and max_reps < min_reps):
            raise ValueError(f"Timer: need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
        self.device = torch.device(device)
        self.warmup_ms, self.rep_ms, self.min_reps, self.max_reps = warmup_ms, rep_ms, min_reps, max_reps
        self.deadline = math.inf
        self._flush_buffer: torch.Tensor | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        """How a median is measured, for a report's header."""
        reps = (f"{self.min_reps} calls" if self.min_reps == self.max_reps else
                f"about {self.rep_ms:g} ms of calls (at least {self.min_reps}"
                + (f", at most {self.max_reps})" if self.max_reps else ")"))
        clock = "CUDA events, L2 flushed before each call" if self.on_gpu else "wall clock (perf_counter)"
        return f"median of {reps} after a {self.warmup_ms:g} ms warm-up; {clock}"

    def synchronize(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)

    def wall_s(self, fn: Callable[[], object]) -> float:
        """Seconds of one call, the device's queued work included."""
        return self.first_call(fn)[1] / 1e3

    def first_call(self, fn: Callable[[], object]) -> tuple[object, float]:
        """(fn's result, ms) of one call from an idle device to its work done: for a first call, compilation."""
        self.synchronize()
        start = time.perf_counter()
        result = fn()
        self.synchronize()
        return result, (time.perf_counter() - start) * 1e3

    def median_ms(self, fn: Callable[[], object]) -> float:
        """Median ms per call of fn after a warm-up (fn has been called once before, or pays that here)."""
        warmup_started = time.perf_counter()
        per_call_ms = self._estimate_ms(fn)
        if self.on_gpu:   # the host runs ahead of the device: warm up for the estimated number of calls
            for _ in range(max(0, math.ceil(self.warmup_ms / per_call_ms) - 1)):
                fn()
        else:
            while (time.perf_counter() - warmup_started) * 1e3 < self.warmup_ms:
                fn()
        reps = max(self.min_reps, round(self.rep_ms / per_call_ms))
        reps = min(reps, self.max_reps) if self.max_reps else reps
        return statistics.median(self._gpu_samples(fn, reps) if self.on_gpu else self._cpu_samples(fn, reps))

    def counts(self, fn: Callable[[], object]) -> dict:
        """One call under torch.profiler on a GPU: gpu_ops launched, host_syncs, gpu_busy_ms; {} on a CPU."""
        if not self.on_gpu:
            return {}
        from torch.profiler import ProfilerActivity, profile
        self.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
        events = prof.events()
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        syncs = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name in SYNC_CALLS)
        return dict(gpu_ops=len(gpu), host_syncs=syncs, gpu_busy_ms=sum(e.device_time for e in gpu) / 1e3)

    def _estimate_ms(self, fn: Callable[[], object]) -> float:
        if not self.on_gpu:
            return max(self.first_call(fn)[1], 1e-6)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.synchronize()
        start.record()
        for _ in range(ESTIMATE_CALLS):
            self._flush_l2()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return max(start.elapsed_time(end) / ESTIMATE_CALLS, 1e-6)

    def _cpu_samples(self, fn: Callable[[], object], reps: int) -> list[float]:
        samples = []
        for _ in range(reps):
            if samples and time.monotonic() > self.deadline:
                break
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return samples

    def _gpu_samples(self, fn: Callable[[], object], reps: int) -> list[float]:
        events = []
        for _ in range(reps):
            if events and time.monotonic() > self.deadline:
                break
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._flush_l2()
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def _flush_l2(self) -> None:
        if self._flush_buffer is None:
            self._flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self._flush_buffer.zero_()


def copy_bandwidth_gbs(timer: Timer, mebibytes: int) -> float:
    """The device's copy bandwidth: 2 * bytes / time of dst.copy_(src) (one read, one write)."""
    src = torch.randn(mebibytes * 2**20 // 4, device=timer.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
