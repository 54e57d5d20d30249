"""Coupling epilogue kernels: z2 from x2 and the subnet output h, its inverse, and the affine backward.

additive: z2 = x2 + h. affine: shift = h[:, 0::2], scale = sigmoid(h[:, 1::2] + 2), z2 = (x2 + shift) * scale,
log_det = sum log(scale) per sample.

One pass over [rows x columns] tiles (see _layout); h's shift/scale pair of column n (channel c, pixel p) sits at
channels 2c and 2c+1. When h is [B, 2C] with unit channel stride the pair is adjacent in memory: a program loads a
[rows, 2 * columns] tile with vector loads and splits it in registers. The affine forward reduces log(scale) over
each row inside the program; when there are too few row blocks to fill the GPU, rows are split into column ranges
whose fp32 partial sums (one [B] row per split) are added afterwards. The additive backward is the identity
(dx2 = dh = dz2) and needs no kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import (accumulate_dtype, as_rows, blocks, column_splits, compute_type, inner_contiguous,
                      sample_offsets, strides, warps)


@triton.jit
def _load_shift_and_raw_scale(h_ptr, rows, row_mask, n0, N, P, stride_b, stride_c, stride_p,
                              INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """(shift, raw scale h[:, 2c+1] + 2) for the columns n0 .. n0 + BLOCK_N - 1."""
    if INTERLEAVED:
        pair_cols = 2 * n0 + tl.arange(0, 2 * BLOCK_N)
        pair_mask = row_mask[:, None] & (pair_cols < 2 * N)[None, :]
        pairs = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_b + pair_cols[None, :], mask=pair_mask)
        shift, raw = tl.split(pairs.to(COMPUTE).reshape(BLOCK_B, BLOCK_N, 2))
    else:
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        channels = (cols // P).to(tl.int64)
        offsets = rows.to(tl.int64)[:, None] * stride_b + (2 * channels * stride_c + (cols % P) * stride_p)[None, :]
        shift = tl.load(h_ptr + offsets, mask=mask).to(COMPUTE)
        raw = tl.load(h_ptr + offsets + stride_c, mask=mask).to(COMPUTE)
    return shift, raw + 2.0


@triton.jit
def _sigmoid_parts(raw):
    """(sigmoid(raw), 1 - sigmoid(raw), log sigmoid(raw)) without overflow for any sign of raw."""
    e = tl.exp(-tl.abs(raw))
    denominator = 1.0 + e
    positive = raw >= 0
    sigmoid = tl.where(positive, 1.0, e) / denominator
    one_minus_sigmoid = tl.where(positive, e, 1.0) / denominator
    log_sigmoid = tl.minimum(raw, 0.0) - tl.log(denominator)
    return sigmoid, one_minus_sigmoid, log_sigmoid


@triton.jit
def _coupling_epilogue_kernel(x_ptr, h_ptr, out_ptr, log_det_partial_ptr,
                              B, C, P, x_stride_b, x_stride_c, x_stride_p, h_stride_b, h_stride_c, h_stride_p,
                              columns_per_split,
                              AFFINE: tl.constexpr, INVERSE: tl.constexpr, X_INNER_CONTIGUOUS: tl.constexpr,
                              H_INNER_CONTIGUOUS: tl.constexpr, H_INTERLEAVED: tl.constexpr, COMPUTE: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Forward (x = x2, out = z2, and for affine log_det_partial[split, row]) or inverse (x = z2, out = x2) over
    the columns [split * columns_per_split, (split + 1) * columns_per_split) of a block of rows."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    N = C * P
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    log_det = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    for n0 in range(pid_s * columns_per_split, (pid_s + 1) * columns_per_split, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + sample_offsets(rows, cols, P, x_stride_b, x_stride_c, x_stride_p, X_INNER_CONTIGUOUS),
                    mask=mask).to(COMPUTE)
        if AFFINE:
            shift, raw = _load_shift_and_raw_scale(h_ptr, rows, row_mask, n0, N, P, h_stride_b, h_stride_c,
                                                   h_stride_p, H_INTERLEAVED, COMPUTE, BLOCK_B, BLOCK_N)
            sigmoid, _, log_sigmoid = _sigmoid_parts(raw)
            if INVERSE:
                out = x / sigmoid - shift
            else:
                out = (x + shift) * sigmoid
                log_det += tl.where(mask, log_sigmoid, 0.0)
        else:
            h = tl.load(h_ptr + sample_offsets(rows, cols, P, h_stride_b, h_stride_c, h_stride_p,
                                               H_INNER_CONTIGUOUS), mask=mask).to(COMPUTE)
            out = x - h if INVERSE else x + h
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)
    if AFFINE and not INVERSE:
        tl.store(log_det_partial_ptr + pid_s.to(tl.int64) * B + rows, tl.sum(log_det, axis=1), mask=row_mask)


@triton.jit
def _affine_coupling_epilogue_bwd_kernel(dz_ptr, dld_ptr, x_ptr, h_ptr, dx_ptr, dh_ptr,
                                         B, C, P, dz_stride_b, dz_stride_c, dz_stride_p, dld_stride,
                                         x_stride_b, x_stride_c, x_stride_p, h_stride_b, h_stride_c, h_stride_p,
                                         DZ_INNER_CONTIGUOUS: tl.constexpr, X_INNER_CONTIGUOUS: tl.constexpr,
                                         H_INTERLEAVED: tl.constexpr, DH_INTERLEAVED: tl.constexpr,
                                         COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx2 = dz * s; dshift = dz * s; draw = (dz * (x2 + shift) * s + dlog_det) * (1 - s), s = sigmoid(raw)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    N = C * P
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    mask = row_mask[:, None] & (cols < N)[None, :]
    dz = tl.load(dz_ptr + sample_offsets(rows, cols, P, dz_stride_b, dz_stride_c, dz_stride_p, DZ_INNER_CONTIGUOUS),
                 mask=mask).to(COMPUTE)
    dld = tl.load(dld_ptr + rows.to(tl.int64) * dld_stride, mask=row_mask).to(COMPUTE)
    x = tl.load(x_ptr + sample_offsets(rows, cols, P, x_stride_b, x_stride_c, x_stride_p, X_INNER_CONTIGUOUS),
                mask=mask).to(COMPUTE)
    shift, raw = _load_shift_and_raw_scale(h_ptr, rows, row_mask, pid_n * BLOCK_N, N, P, h_stride_b, h_stride_c,
                                           h_stride_p, H_INTERLEAVED, COMPUTE, BLOCK_B, BLOCK_N)
    sigmoid, one_minus_sigmoid, _ = _sigmoid_parts(raw)
    dx = dz * sigmoid
    draw = (dx * (x + shift) + dld[:, None]) * one_minus_sigmoid
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)

    dh_type = dh_ptr.dtype.element_ty
    dh_rows = dh_ptr + rows.to(tl.int64)[:, None] * 2 * N
    if DH_INTERLEAVED:
        # dh is contiguous [B, 2C]: write the (dshift, draw) pairs interleaved, with vector stores.
        pair_cols = 2 * pid_n * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        pair_mask = row_mask[:, None] & (pair_cols < 2 * N)[None, :]
        pairs = tl.join(dx, draw).reshape(BLOCK_B, 2 * BLOCK_N)
        tl.store(dh_rows + pair_cols[None, :], pairs.to(dh_type), mask=pair_mask)
    else:
        shift_cols = 2 * (cols // P) * P + cols % P
        tl.store(dh_rows + shift_cols[None, :], dx.to(dh_type), mask=mask)
        tl.store(dh_rows + (shift_cols + P)[None, :], draw.to(dh_type), mask=mask)


def _interleaved(h3: torch.Tensor, pixels: int) -> bool:
    """Whether each (shift, scale) channel pair of h is adjacent in memory (h is [B, 2C] with unit channel stride)."""
    return pixels == 1 and h3.stride(1) == 1


def _apply(x: torch.Tensor, h: torch.Tensor, affine: bool, inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x3, pixels = as_rows(x)
    h3, _ = as_rows(h)
    batch, columns = x.shape[0], x.shape[1] * pixels
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_b, block_n = blocks(batch, columns)
    row_blocks = triton.cdiv(batch, block_b)
    if affine and not inverse:
        splits, columns_per_split = column_splits(row_blocks, columns, block_n, x.device)
    else:   # no row reduction: one column block per program
        splits, columns_per_split = triton.cdiv(columns, block_n), block_n
    log_det_partial = (torch.empty((splits, batch), dtype=accumulate_dtype(x.dtype), device=x.device)
                       if affine and not inverse else None)
    _coupling_epilogue_kernel[(row_blocks, splits)](
        x3, h3, out, out if log_det_partial is None else log_det_partial, batch, x.shape[1], pixels,
        *strides(x3), *strides(h3), columns_per_split,
        AFFINE=affine, INVERSE=inverse, X_INNER_CONTIGUOUS=inner_contiguous(x3),
        H_INNER_CONTIGUOUS=inner_contiguous(h3), H_INTERLEAVED=affine and _interleaved(h3, pixels),
        COMPUTE=compute_type(x.dtype), BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps(block_b, block_n))
    if inverse:
        return out, None
    if log_det_partial is None:   # additive: volume preserving
        return out, torch.zeros(batch, dtype=accumulate_dtype(x.dtype), device=x.device)
    return out, log_det_partial[0] if splits == 1 else log_det_partial.sum(0)


def coupling_epilogue_fwd(x2: torch.Tensor, h: torch.Tensor, affine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(z2, log_det[B]); any strides in, z2 contiguous in x2's dtype, log_det float32 (float64 for float64 x2).
    h may have another float dtype than x2 (the subnet often runs in float32 under bf16 activations)."""
    z2, log_det = _apply(x2, h, affine, inverse=False)
    return z2, log_det


def coupling_epilogue_inv(z2: torch.Tensor, h: torch.Tensor, affine: bool) -> torch.Tensor:
    """x2 from z2 and h; any strides in, contiguous out in z2's dtype."""
    x2, _ = _apply(z2, h, affine, inverse=True)
    return x2


def coupling_epilogue_bwd(grad_z2: torch.Tensor, grad_log_det: torch.Tensor, x2: torch.Tensor,
                          h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling epilogue backward: (grad_x2 in x2's dtype, grad_h in h's dtype), both contiguous, in one pass.
    (The additive backward is the identity and needs no kernel.)"""
    dz3, pixels = as_rows(grad_z2)
    x3, _ = as_rows(x2)
    h3, _ = as_rows(h)
    batch, columns = x2.shape[0], x2.shape[1] * pixels
    grad_x2 = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    block_b, block_n = blocks(batch, columns)
    _affine_coupling_epilogue_bwd_kernel[(triton.cdiv(batch, block_b), triton.cdiv(columns, block_n))](
        dz3, grad_log_det, x3, h3, grad_x2, grad_h, batch, x2.shape[1], pixels, *strides(dz3),
        grad_log_det.stride(0), *strides(x3), *strides(h3),
        DZ_INNER_CONTIGUOUS=inner_contiguous(dz3), X_INNER_CONTIGUOUS=inner_contiguous(x3),
        H_INTERLEAVED=_interleaved(h3, pixels), DH_INTERLEAVED=pixels == 1, COMPUTE=compute_type(x2.dtype),
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps(block_b, block_n))
    return grad_x2, grad_h
