"""N(0, I) prior: log_prob[b] = -0.5 * sum over a sample's values of (z^2 + log(2 pi)), and its backward.

The forward reduces each row inside its program over [rows x columns] tiles (see _layout); when there are too few
row blocks to fill the GPU, rows are split into column ranges whose fp32 partial sums (one [B] row per split, each
including its own share of the constant) are added afterwards. The backward dz = -z * dlog_prob is elementwise.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._layout import (accumulate_dtype, as_rows, blocks, column_splits, compute_type, inner_contiguous,
                      sample_offsets, strides, warps)

_LOG_2PI = math.log(2 * math.pi)


@triton.jit
def _gaussian_log_prob_fwd_kernel(z_ptr, partial_ptr, B, N, P, stride_b, stride_c, stride_p, columns_per_split,
                                  LOG_2PI: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr, COMPUTE: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    sum_sq = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    first = pid_s * columns_per_split
    for n0 in range(first, first + columns_per_split, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        z = tl.load(z_ptr + sample_offsets(rows, cols, P, stride_b, stride_c, stride_p, INNER_CONTIGUOUS),
                    mask=mask, other=0.0).to(COMPUTE)
        sum_sq += z * z
    columns_here = tl.minimum(first + columns_per_split, N) - first
    log_prob = -0.5 * (tl.sum(sum_sq, axis=1) + columns_here.to(COMPUTE) * LOG_2PI)
    tl.store(partial_ptr + pid_s.to(tl.int64) * B + rows, log_prob, mask=row_mask)


@triton.jit
def _gaussian_log_prob_bwd_kernel(dlp_ptr, z_ptr, dz_ptr, B, N, P, dlp_stride, stride_b, stride_c, stride_p,
                                  INNER_CONTIGUOUS: tl.constexpr, COMPUTE: tl.constexpr,
                                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < N)[None, :]
    z = tl.load(z_ptr + sample_offsets(rows, cols, P, stride_b, stride_c, stride_p, INNER_CONTIGUOUS),
                mask=mask).to(COMPUTE)
    dlp = tl.load(dlp_ptr + rows.to(tl.int64) * dlp_stride, mask=row_mask).to(COMPUTE)
    dz = -z * dlp[:, None]
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def gaussian_log_prob_fwd(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) per sample, [B], float32 (float64 for float64 z); any strides in."""
    z3, pixels = as_rows(z)
    batch, columns = z.shape[0], z.shape[1] * pixels
    block_b, block_n = blocks(batch, columns)
    row_blocks = triton.cdiv(batch, block_b)
    splits, columns_per_split = column_splits(row_blocks, columns, block_n, z.device)
    partial = torch.empty((splits, batch), dtype=accumulate_dtype(z.dtype), device=z.device)
    _gaussian_log_prob_fwd_kernel[(row_blocks, splits)](
        z3, partial, batch, columns, pixels, *strides(z3), columns_per_split,
        LOG_2PI=_LOG_2PI, INNER_CONTIGUOUS=inner_contiguous(z3), COMPUTE=compute_type(z.dtype),
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps(block_b, block_n))
    return partial[0] if splits == 1 else partial.sum(0)


def gaussian_log_prob_bwd(grad_log_prob: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """dz = -z * grad_log_prob[b], contiguous, in z's dtype."""
    z3, pixels = as_rows(z)
    batch, columns = z.shape[0], z.shape[1] * pixels
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    block_b, block_n = blocks(batch, columns)
    _gaussian_log_prob_bwd_kernel[(triton.cdiv(batch, block_b), triton.cdiv(columns, block_n))](
        grad_log_prob, z3, grad_z, batch, columns, pixels, grad_log_prob.stride(0), *strides(z3),
        INNER_CONTIGUOUS=inner_contiguous(z3), COMPUTE=compute_type(z.dtype), BLOCK_B=block_b, BLOCK_N=block_n,
        num_warps=warps(block_b, block_n))
    return grad_z
