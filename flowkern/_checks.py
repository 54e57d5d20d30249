"""Input checks for the model-facing entry points (nn modules), so bad input fails with a clear message.

Shape, dtype and device checks are free. The NaN/Inf scan reads the whole tensor and, on a GPU, waits for it
(a host sync): turn it off with `flowkern.set_finite_checks(False)` in hot loops; it is skipped while
torch.compile traces.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_finite_checks = True


def set_finite_checks(enabled: bool) -> None:
    """Enable or disable the NaN/Inf scan of layer inputs (on by default)."""
    global _finite_checks
    _finite_checks = bool(enabled)


@contextlib.contextmanager
def finite_checks(enabled: bool) -> Iterator[None]:
    """set_finite_checks(enabled) inside a with-block, then the previous setting."""
    global _finite_checks
    previous, _finite_checks = _finite_checks, bool(enabled)
    try:
        yield
    finally:
        _finite_checks = previous


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
    if _finite_checks and not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: input contains NaN or Inf")
