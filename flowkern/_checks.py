"""Input checks for the model-facing entry points (nn modules), so bad input fails with a clear message.

Shape, dtype and device checks are free. The NaN/Inf scan reads the whole tensor and, on a GPU, waits for it
(a host sync): turn it off with `flowkern.set_finite_checks(False)` in hot loops; it is skipped while
torch.compile traces.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The user's process-wide setting, and a context-local override for library code (the Embedder, TrainStep) that
# skips the scan for its own calls: a ContextVar, so one thread's `with finite_checks(False)` leaves the checks on
# in every other thread and task.
_finite_checks_default = True
_finite_checks_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "flowkern_finite_checks", default=None)


def set_finite_checks(enabled: bool) -> None:
    """Enable or disable the NaN/Inf scan of layer inputs for the whole process (on by default)."""
    global _finite_checks_default
    _finite_checks_default = bool(enabled)


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """Enable or disable the NaN/Inf scan inside a with-block, for this thread (or asyncio task) only."""
    token = _finite_checks_override.set(bool(enabled))
    try:
        yield
    finally:
        _finite_checks_override.reset(token)


def finite_checks_enabled() -> bool:
    """Whether layer inputs are scanned for NaN/Inf here: this context's override, else the process setting."""
    local = _finite_checks_override.get()
    return _finite_checks_default if local is None else local


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels and references compute (and accumulate log-dets) in float32, or float64 for float64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x: torch.Tensor, channels: int, where: str, like: torch.Tensor | None = None) -> None:
    """Raise ValueError unless x is a finite float [B, C] or [B, C, H, W] tensor with `channels` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: expected a floating-point tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if x.dim() not in (2, 4):
        raise ValueError(f"{where}: expected shape [B, C] or [B, C, H, W], got {tuple(x.shape)} ({x.dim()} dims)")
    if x.shape[1] != channels:
        raise ValueError(f"{where}: expected {channels} channels in dim 1, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: empty batch, shape {tuple(x.shape)}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{where}: input is on {x.device} but the layer's parameters are on {like.device}")
    # is_compiling first: torch.compile never reads the ContextVar (a graph break) and skips the scan anyway.
    if not torch.compiler.is_compiling() and finite_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: input contains NaN or Inf")
