"""ActNorm kernels: y = (x + bias) * exp(f * logs) per channel, its inverse, and its backward.

Forward and inverse are one elementwise pass over [rows x columns] tiles (see _layout); the forward's programs of
column block 0 also write the log-det of their rows (f * sum(logs) * P, the same for every sample), so no extra
launch. The backward recomputes (x + bias) * s from x (y is not saved), writes dx and, per program, fp32 column
partial sums over a group of rows; a second small kernel reduces the partials over row groups and pixels into
dbias / dlogs. No atomics, so the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import (accumulate_dtype, as_rows, blocks, compute_type, inner_contiguous, sample_offsets, strides,
                      target_programs, warps)


@triton.jit
def _actnorm_apply_kernel(x_ptr, bias_ptr, logs_ptr, out_ptr, log_det_ptr,
                          B, C, P, stride_b, stride_c, stride_p, logscale_factor,
                          INVERSE: tl.constexpr, INNER_CONTIGUOUS: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Forward: out = (x + bias) * s and log_det; inverse: out = x / s - bias (s = exp(f * logs))."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    N = C * P
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    channels = cols // P

    x = tl.load(x_ptr + sample_offsets(rows, cols, P, stride_b, stride_c, stride_p, INNER_CONTIGUOUS),
                mask=mask).to(COMPUTE)
    bias = tl.load(bias_ptr + channels, mask=col_mask, other=0.0).to(COMPUTE)
    scaled_logs = logscale_factor * tl.load(logs_ptr + channels, mask=col_mask, other=0.0).to(COMPUTE)
    if INVERSE:
        out = x * tl.exp(-scaled_logs)[None, :] - bias[None, :]
    else:
        out = (x + bias[None, :]) * tl.exp(scaled_logs)[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    if not INVERSE:
        if pid_n == 0:
            logs_sum = tl.zeros([BLOCK_C], dtype=COMPUTE)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                logs_sum += tl.load(logs_ptr + c, mask=c < C, other=0.0).to(COMPUTE)
            log_det = logscale_factor * tl.sum(logs_sum, axis=0) * P
            tl.store(log_det_ptr + rows, tl.zeros([BLOCK_B], dtype=COMPUTE) + log_det, mask=row_mask)


@triton.jit
def _actnorm_bwd_kernel(dy_ptr, x_ptr, bias_ptr, logs_ptr, dx_ptr, partial_ptr,
                        B, C, P, dy_stride_b, dy_stride_c, dy_stride_p, x_stride_b, x_stride_c, x_stride_p,
                        logscale_factor, rows_per_program,
                        DY_INNER_CONTIGUOUS: tl.constexpr, X_INNER_CONTIGUOUS: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = dy * s; partial[g, 0, n] = sum(dy * s), partial[g, 1, n] = sum(dy * (x + bias) * s) over the rows of
    group g (rows_per_program rows, a multiple of BLOCK_B)."""
    pid_g = tl.program_id(0)
    pid_n = tl.program_id(1)
    N = C * P
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    channels = cols // P
    bias = tl.load(bias_ptr + channels, mask=col_mask, other=0.0).to(COMPUTE)
    scale = tl.exp(logscale_factor * tl.load(logs_ptr + channels, mask=col_mask, other=0.0).to(COMPUTE))

    sum_dy_s = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    sum_dy_y = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    for r0 in range(0, rows_per_program, BLOCK_B):
        rows = pid_g * rows_per_program + r0 + tl.arange(0, BLOCK_B)
        mask = (rows < B)[:, None] & col_mask[None, :]
        dy = tl.load(dy_ptr + sample_offsets(rows, cols, P, dy_stride_b, dy_stride_c, dy_stride_p,
                                             DY_INNER_CONTIGUOUS), mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + sample_offsets(rows, cols, P, x_stride_b, x_stride_c, x_stride_p, X_INNER_CONTIGUOUS),
                    mask=mask, other=0.0).to(COMPUTE)
        dy_s = dy * scale[None, :]
        tl.store(dx_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], dy_s.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        sum_dy_s += dy_s
        sum_dy_y += dy_s * (x + bias[None, :])   # masked lanes hold dy = 0

    partial_row = partial_ptr + pid_g.to(tl.int64) * 2 * N
    tl.store(partial_row + cols, tl.sum(sum_dy_s, axis=0), mask=col_mask)
    tl.store(partial_row + N + cols, tl.sum(sum_dy_y, axis=0), mask=col_mask)


@triton.jit
def _actnorm_param_grads_kernel(partial_ptr, dld_ptr, dbias_ptr, dlogs_ptr, groups, B, C, P, dld_stride,
                                logscale_factor, COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_LD: tl.constexpr):
    """dbias[c] = sum over groups g and pixels p of partial[g, 0, c*P + p];
    dlogs[c] = f * (the same sum of partial[g, 1]) + f * P * sum_b dlog_det[b]."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    N = C * P
    sum_dbias = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    sum_dlogs = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    for r0 in range(0, groups * P, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)   # r = g * P + p
        offsets = (r // P).to(tl.int64)[:, None] * 2 * N + channels[None, :] * P + (r % P)[:, None]
        mask = (r < groups * P)[:, None] & channel_mask[None, :]
        sum_dbias += tl.load(partial_ptr + offsets, mask=mask, other=0.0)
        sum_dlogs += tl.load(partial_ptr + N + offsets, mask=mask, other=0.0)

    sum_dld = tl.zeros([BLOCK_LD], dtype=COMPUTE)
    for b0 in range(0, B, BLOCK_LD):
        b = b0 + tl.arange(0, BLOCK_LD)
        sum_dld += tl.load(dld_ptr + b.to(tl.int64) * dld_stride, mask=b < B, other=0.0).to(COMPUTE)
    dlogs = logscale_factor * (tl.sum(sum_dlogs, axis=0) + P * tl.sum(sum_dld, axis=0))
    tl.store(dbias_ptr + channels, tl.sum(sum_dbias, axis=0).to(dbias_ptr.dtype.element_ty), mask=channel_mask)
    tl.store(dlogs_ptr + channels, dlogs.to(dlogs_ptr.dtype.element_ty), mask=channel_mask)


def _apply(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
           inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x3, pixels = as_rows(x)
    bias, logs = bias.contiguous(), logs.contiguous()
    batch, channels = x.shape[0], x.shape[1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    log_det = None if inverse else torch.empty(batch, dtype=accumulate_dtype(x.dtype), device=x.device)
    block_b, block_n = blocks(batch, channels * pixels)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(channels * pixels, block_n))
    _actnorm_apply_kernel[grid](
        x3, bias, logs, out, out if log_det is None else log_det,
        batch, channels, pixels, *strides(x3), float(logscale_factor),
        INVERSE=inverse, INNER_CONTIGUOUS=inner_contiguous(x3), COMPUTE=compute_type(x.dtype),
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_C=min(triton.next_power_of_2(channels), 1024),
        num_warps=warps(block_b, block_n))
    return out, log_det


def actnorm_fwd(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor,
                logscale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, log_det[B]); any strides in, y contiguous in x's dtype, log_det float32 (float64 for float64 x)."""
    y, log_det = _apply(x, bias, logs, logscale_factor, inverse=False)
    return y, log_det


def actnorm_inv(y: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float) -> torch.Tensor:
    """x = y * exp(-f * logs) - bias; any strides in, contiguous out."""
    x, _ = _apply(y, bias, logs, logscale_factor, inverse=True)
    return x


def actnorm_bwd(grad_y: torch.Tensor, grad_log_det: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                logs: torch.Tensor, logscale_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_bias, grad_logs) from the forward's input x (y is recomputed, not stored)."""
    x3, pixels = as_rows(x)
    dy3, _ = as_rows(grad_y)
    bias, logs = bias.contiguous(), logs.contiguous()
    batch, channels = x.shape[0], x.shape[1]
    columns = channels * pixels
    block_b, block_n = blocks(batch, columns)
    row_blocks, column_blocks = triton.cdiv(batch, block_b), triton.cdiv(columns, block_n)
    # Each program walks a group of rows so the partials stay small ([groups, 2, C*P]) at large batch.
    groups = max(1, min(row_blocks, triton.cdiv(target_programs(x.device), column_blocks)))
    rows_per_program = triton.cdiv(row_blocks, groups) * block_b
    groups = triton.cdiv(batch, rows_per_program)

    compute = compute_type(x.dtype)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    partial = torch.empty((groups, 2, columns), dtype=accumulate_dtype(x.dtype), device=x.device)
    _actnorm_bwd_kernel[(groups, column_blocks)](
        dy3, x3, bias, logs, grad_x, partial, batch, channels, pixels, *strides(dy3), *strides(x3),
        float(logscale_factor), rows_per_program,
        DY_INNER_CONTIGUOUS=inner_contiguous(dy3), X_INNER_CONTIGUOUS=inner_contiguous(x3), COMPUTE=compute,
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=warps(block_b, block_n))

    grad_bias, grad_logs = torch.empty_like(bias), torch.empty_like(logs)
    if pixels == 1:   # partial columns are channels: a block of channels per program, loads along channels
        block_c, block_r = min(triton.next_power_of_2(channels), 128), max(2, min(triton.next_power_of_2(groups), 32))
    else:             # each channel owns P adjacent columns: two channels per program, loads along pixels
        block_c, block_r = 2, max(2, min(triton.next_power_of_2(groups * pixels), 128))
    _actnorm_param_grads_kernel[(triton.cdiv(channels, block_c),)](
        partial, grad_log_det, grad_bias, grad_logs, groups, batch, channels, pixels, grad_log_det.stride(0),
        float(logscale_factor), COMPUTE=compute, BLOCK_R=block_r, BLOCK_C=block_c,
        BLOCK_LD=max(2, min(triton.next_power_of_2(batch), 1024)))
    return grad_x, grad_bias, grad_logs
