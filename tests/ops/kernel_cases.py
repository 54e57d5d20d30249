"""Inputs and tolerances shared by the kernel-vs-reference tests of the op families."""
from __future__ import annotations

import math

import torch

# Odd sizes; 4-D shapes use small odd H x W. Under the interpreter's few programs, (100, 130) makes the ActNorm
# backward walk several row blocks per program, (33, 10, 3, 5) gives its parameter-gradient reduction several
# chunks, and (2, 130, 3, 5) splits each row of the log-det / prior reductions over several programs.
SHAPES = [(1, 6), (3, 10), (33, 130), (100, 130), (3, 6, 3, 5), (1, 10, 3, 5), (33, 10, 3, 5), (2, 130, 3, 5)]
# contiguous; a channel slice of a wider tensor (the coupling halves); a transposed [B, C] or a channels_last
# [B, C, H, W]. make() also offers "spatially_transposed" (H, W swapped: the one layout the kernels copy).
LAYOUTS = ["contiguous", "sliced", "strided"]
LOW_PRECISION = [torch.float16, torch.bfloat16]
# The compiled kernels on odd sizes and layouts (gpu-marked). With a GPU's many programs, (20000, 130) is where
# the ActNorm backward walks several row blocks per program and its parameter-gradient reduction several chunks,
# (1000, 10, 5, 5) the same with pixels, and (2, 130, 3, 5) splits rows of the log-det / prior reductions.
GPU_ODD_SHAPES = [(33, 130), (20000, 130), (1000, 10, 5, 5), (2, 130, 3, 5)]
GPU_DTYPES = [torch.float64, torch.float32, torch.bfloat16]

# (rtol, atol) for values stored in fp32 / fp64; reductions and log-dets are fp32 whatever the input dtype.
_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}
# fp16 / bf16 outputs: the kernels compute in fp32 and round once, so an output may differ from the float64
# reference *rounded to its dtype* by one unit in the last place (eps relative: both round nearly the same value,
# which may straddle a rounding boundary), plus fp32 arithmetic error where values cancel to near zero.
_FP32_COMPUTE_ATOL = 1e-5

def make(shape, dtype: torch.dtype = torch.float32, layout: str = "contiguous", scale: float = 1.0,
         device: str | torch.device = "cpu") -> torch.Tensor:
    """Fresh N(0, scale^2) values of `shape`, laid out in memory as `layout`."""
    if layout == "contiguous":
        base = torch.randn(shape, device=device)
    elif layout == "sliced":
        wider = torch.randn((shape[0], shape[1] + 3) + tuple(shape[2:]), device=device)
        base = wider[:, 1:shape[1] + 1]
    elif layout == "strided" and len(shape) == 2:
        base = torch.randn(shape[1], shape[0], device=device).t()
    elif layout == "strided":
        base = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    elif layout == "spatially_transposed":
        b, c, h, w = shape
        base = torch.randn(b, c, w, h, device=device).transpose(2, 3)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    # Scale and cast in place of a fresh copy so the layout survives.
    base.mul_(scale)
    if dtype == torch.float32:
        return base
    out = torch.empty_strided(base.shape, base.stride(), dtype=dtype, device=device)
    return out.copy_(base)


def device_for(impl: str) -> str:
    """Where a backend's kernels run in these tests: Triton on the GPU when there is one, else interpreted on CPU."""
    if impl == "cpp" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def pixels(shape) -> int:
    return math.prod(shape[2:])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, terms: int = 1) -> None:
    """actual (computed in/stored as `dtype`) against a float64 reference; `terms` = how many values were summed
    into each element, which scales the absolute tolerance. fp16 / bf16 values are held to what fp32 compute and
    one rounding to `dtype` can produce (see _FP32_COMPUTE_ATOL)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if dtype in LOW_PRECISION:
        torch.testing.assert_close(actual.double(), expected.to(dtype).double(), rtol=torch.finfo(dtype).eps,
                                   atol=_FP32_COMPUTE_ATOL * math.sqrt(terms))
        return
    rtol, atol = _TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * math.sqrt(terms))


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameter gradients and log-dets are accumulated in float32 whatever the activation dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
