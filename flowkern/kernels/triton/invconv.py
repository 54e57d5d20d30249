"""Triton kernels for the LU 1x1 convolution: assembling W from its factors, and applying W to activations.

Activations are addressed as rows: [B, C] has N = B rows; [B, C, H, W] has N = B*H*W rows (one per pixel), read
through the tensor's own strides (NCHW, channels-last, transposed or sliced views all work without a copy).
Everything computes in fp32 (fp64 for fp64 data); outputs come back in the input dtype.

Matrix products use tl.dot: IEEE fp32 (or fp64) when the data are fp32/fp64, so results match a float64 reference
to ~1e-6; split TF32 ("tf32x3", three tensor-core passes, ~fp32 accuracy) when the data are fp16/bf16. Plain TF32
would not do there: the fp32 parameters, the folded ActNorm output and the fp32 log-det and parameter gradients
would all carry TF32's 2^-11 rounding. (Triton's interpreter ignores input_precision, so CPU tests cannot see this.)

The inverse has no kernel of its own: flowkern.ops.invconv_ops builds W^-1 from triangular solves on the LU factors in
float64 (never an inverse in low precision; cached in eval mode by InvConv1x1) and runs `invconv_fwd` with it.
W^-1 costs O(C^3) once per weight update, after which the inverse is the forward's fully parallel GEMM; blocked
triangular solves on the activations would do the same N*C^2 work on every call, but as C / BLOCK dependent steps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import compute_dtype
from ._layout import compute_type, target_programs  # importing _layout also fixes interpreter loop bounds


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for data of `dtype` (see the module docstring)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32x3"


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


# Block sizes. GPU: chosen so that ptxas (sm_90) reports no register spills for bf16/fp16 (TF32 dots) and fp32
# (IEEE dots, FMA layouts) data; the dW kernel contracts over rows, 16 at a time, since wider IEEE contractions
# spill. Interpreter (CPU tests): wide tiles, since every program costs ~1 ms.
def _gemm_blocks(on_gpu: bool) -> dict:
    if on_gpu:
        return dict(BLOCK_N=64, BLOCK_CO=64, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_CO=64, BLOCK_K=64)


def _weight_grad_blocks(on_gpu: bool) -> dict:
    if on_gpu:
        return dict(BLOCK_N=16, BLOCK_CO=64, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_N=32, BLOCK_CO=64, BLOCK_K=64)


def _square_block(on_gpu: bool) -> dict:
    return dict(BLOCK=64, BLOCK_K=16, num_warps=4) if on_gpu else dict(BLOCK=64, BLOCK_K=64)


def _as_rows(x: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int, int]]:
    """(N, S, W, (stride_b, stride_c, stride_h, stride_w)): row n is pixel (b, h, w) = (n // S, n % S // W, n % W)
    with S = H*W pixels per sample; a [B, C] tensor is one pixel per sample."""
    if x.dim() == 2:
        return x.shape[0], 1, 1, (x.stride(0), x.stride(1), 0, 0)
    b, _, h, w = x.shape
    return b * h * w, h * w, w, x.stride()


@triton.jit
def _row_offsets(rows, S, W, stride_b, stride_h, stride_w):
    pixel = rows % S
    return ((rows // S).to(tl.int64) * stride_b + (pixel // W).to(tl.int64) * stride_h
            + (pixel % W).to(tl.int64) * stride_w)


@triton.jit
def actnorm_scale(bias_ptr, logs_ptr, k, k_mask, logscale_factor, ACC: tl.constexpr):
    """(bias, exp(f * logs)) at channels k; masked-off channels get bias 0 and scale 1 (padding stays 0)."""
    bias = tl.load(bias_ptr + k, mask=k_mask, other=0.0).to(ACC)
    scale = tl.exp(logscale_factor * tl.load(logs_ptr + k, mask=k_mask, other=0.0).to(ACC))
    return bias, scale


@triton.jit
def _mix_rows_kernel(x_ptr, w_ptr, bias_ptr, logs_ptr, y_ptr, N, C, S, W,
                     x_sb, x_sc, x_sh, x_sw, y_sb, y_sc, y_sh, y_sw, w_s0, w_s1, logscale_factor,
                     HAS_ACTNORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, co] = sum_k W[co, k] x'[n, k], x' = (x + bias) * exp(f * logs) when HAS_ACTNORM else x."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    row_mask, co_mask = rows < N, co < C
    x_rows = _row_offsets(rows, S, W, x_sb, x_sh, x_sw)
    acc = tl.zeros((BLOCK_N, BLOCK_CO), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < C
        x = tl.load(x_ptr + x_rows[:, None] + k.to(tl.int64)[None, :] * x_sc, mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        if HAS_ACTNORM:
            bias, scale = actnorm_scale(bias_ptr, logs_ptr, k, k_mask, logscale_factor, ACC)
            x = (x + bias[None, :]) * scale[None, :]
        w_t = tl.load(w_ptr + k[:, None] * w_s1 + co[None, :] * w_s0, mask=k_mask[:, None] & co_mask[None, :],
                      other=0.0).to(ACC)
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=ACC)
    y_rows = _row_offsets(rows, S, W, y_sb, y_sh, y_sw)
    tl.store(y_ptr + y_rows[:, None] + co.to(tl.int64)[None, :] * y_sc, acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & co_mask[None, :])


@triton.jit
def _mix_rows_input_grad_kernel(dy_ptr, w_ptr, x_ptr, bias_ptr, logs_ptr, dx_ptr, dbias_part_ptr, dlogs_part_ptr,
                                N, C, S, W, dy_sb, dy_sc, dy_sh, dy_sw, x_sb, x_sc, x_sh, x_sw,
                                dx_sb, dx_sc, dx_sh, dx_sw, w_s0, w_s1, logscale_factor,
                                HAS_ACTNORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx' = dy @ W; with ActNorm: dx = dx' * scale, and this row block's partial sums of dbias and dlogs."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask, k_mask = rows < N, k < C
    dy_rows = _row_offsets(rows, S, W, dy_sb, dy_sh, dy_sw)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    for co0 in range(0, C, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        co_mask = co < C
        dy = tl.load(dy_ptr + dy_rows[:, None] + co.to(tl.int64)[None, :] * dy_sc, mask=row_mask[:, None] & co_mask[None, :],
                     other=0.0).to(ACC)
        w = tl.load(w_ptr + co[:, None] * w_s0 + k[None, :] * w_s1, mask=co_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION, out_dtype=ACC)
    mask = row_mask[:, None] & k_mask[None, :]
    dx = acc
    if HAS_ACTNORM:
        bias, scale = actnorm_scale(bias_ptr, logs_ptr, k, k_mask, logscale_factor, ACC)
        x_rows = _row_offsets(rows, S, W, x_sb, x_sh, x_sw)
        x = tl.load(x_ptr + x_rows[:, None] + k.to(tl.int64)[None, :] * x_sc, mask=mask, other=0.0).to(ACC)
        normed = (x + bias[None, :]) * scale[None, :]
        dx = acc * scale[None, :]
        # Rows past N have dy = 0, hence acc = 0: they add nothing to the partial sums.
        tl.store(dbias_part_ptr + pid_n * C + k, tl.sum(dx, axis=0), mask=k_mask)
        tl.store(dlogs_part_ptr + pid_n * C + k, logscale_factor * tl.sum(acc * normed, axis=0), mask=k_mask)
    dx_rows = _row_offsets(rows, S, W, dx_sb, dx_sh, dx_sw)
    tl.store(dx_ptr + dx_rows[:, None] + k.to(tl.int64)[None, :] * dx_sc, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_rows_weight_grad_kernel(dy_ptr, x_ptr, bias_ptr, logs_ptr, dw_part_ptr, N, C, S, W, rows_per_program,
                                 dy_sb, dy_sc, dy_sh, dy_sw, x_sb, x_sc, x_sh, x_sw, logscale_factor,
                                 HAS_ACTNORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Partial dW[co, k] = sum over this program's rows of dy[n, co] x'[n, k], into dw_part[program_id(2)]."""
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    co_mask, k_mask = co < C, k < C
    if HAS_ACTNORM:
        bias, scale = actnorm_scale(bias_ptr, logs_ptr, k, k_mask, logscale_factor, ACC)
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
    first = split * rows_per_program
    for n0 in range(first, first + rows_per_program, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        dy_rows = _row_offsets(rows, S, W, dy_sb, dy_sh, dy_sw)
        dy_t = tl.load(dy_ptr + dy_rows[None, :] + co.to(tl.int64)[:, None] * dy_sc, mask=co_mask[:, None] & row_mask[None, :],
                       other=0.0).to(ACC)
        x_rows = _row_offsets(rows, S, W, x_sb, x_sh, x_sw)
        x = tl.load(x_ptr + x_rows[:, None] + k.to(tl.int64)[None, :] * x_sc, mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        if HAS_ACTNORM:
            x = (x + bias[None, :]) * scale[None, :]
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dw_part_ptr + split.to(tl.int64) * C * C + co[:, None] * C + k[None, :], acc,
             mask=co_mask[:, None] & k_mask[None, :])


def _weight_grad_splits(n: int, tiles: int, t: torch.Tensor) -> int:
    """How many row ranges the dW reduction is cut into (one fp32 partial each, summed afterwards):
    on a GPU enough programs to fill it, ranges of at least 512 rows; on the interpreter 64-row ranges, so that
    small tests exercise several partials."""
    if _on_gpu(t):
        return max(1, min(triton.cdiv(n, 512), triton.cdiv(target_programs(t.device), tiles)))
    return triton.cdiv(n, 64)


def _channel_vectors(bias: torch.Tensor | None, logs: torch.Tensor | None, weight: torch.Tensor):
    """ActNorm's per-channel vectors as the kernels read them (contiguous; tiny), or placeholders without ActNorm."""
    if bias is None:
        return weight, weight
    return bias.contiguous(), logs.contiguous()


def _mix_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logs: torch.Tensor | None,
              logscale_factor: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n, s, w, x_strides = _as_rows(x)
    c = x.shape[1]
    has_actnorm = bias is not None
    bias_arg, logs_arg = _channel_vectors(bias, logs, weight)
    blocks = _gemm_blocks(_on_gpu(x))
    grid = (triton.cdiv(n, blocks["BLOCK_N"]), triton.cdiv(c, blocks["BLOCK_CO"]))
    _mix_rows_kernel[grid](x, weight, bias_arg, logs_arg, y,
                           n, c, s, w, *x_strides, *_as_rows(y)[3], weight.stride(0), weight.stride(1),
                           logscale_factor, HAS_ACTNORM=has_actnorm, ACC=compute_type(x.dtype),
                           PRECISION=dot_precision(x.dtype), **blocks)
    return y


def _mix_rows_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       logs: torch.Tensor | None, logscale_factor: float):
    """(dx, dW, dbias, dlogs); dbias and dlogs are None without ActNorm. Batch sums via fp32 partials."""
    dx = torch.empty_like(x)
    n, s, w, x_strides = _as_rows(x)
    dy_strides, dx_strides = _as_rows(dy)[3], _as_rows(dx)[3]
    c = x.shape[1]
    has_actnorm = bias is not None
    acc_dtype, precision = compute_type(x.dtype), dot_precision(x.dtype)
    part_dtype = compute_dtype(x.dtype)
    blocks = _gemm_blocks(_on_gpu(x))
    row_blocks = triton.cdiv(n, blocks["BLOCK_N"])
    dbias_part = x.new_empty((row_blocks, c) if has_actnorm else (1,), dtype=part_dtype)
    dlogs_part = torch.empty_like(dbias_part)
    bias_arg, logs_arg = _channel_vectors(bias, logs, weight)
    _mix_rows_input_grad_kernel[(row_blocks, triton.cdiv(c, blocks["BLOCK_K"]))](
        dy, weight, x, bias_arg, logs_arg, dx, dbias_part, dlogs_part, n, c, s, w,
        *dy_strides, *x_strides, *dx_strides, weight.stride(0), weight.stride(1), logscale_factor,
        HAS_ACTNORM=has_actnorm, ACC=acc_dtype, PRECISION=precision, **blocks)

    blocks = _weight_grad_blocks(_on_gpu(x))
    tiles = triton.cdiv(c, blocks["BLOCK_CO"]) * triton.cdiv(c, blocks["BLOCK_K"])
    splits = _weight_grad_splits(n, tiles, x)
    rows_per_program = triton.cdiv(triton.cdiv(n, splits), blocks["BLOCK_N"]) * blocks["BLOCK_N"]
    splits = triton.cdiv(n, rows_per_program)
    dw_part = x.new_empty((splits, c, c), dtype=part_dtype)
    grid = (triton.cdiv(c, blocks["BLOCK_CO"]), triton.cdiv(c, blocks["BLOCK_K"]), splits)
    _mix_rows_weight_grad_kernel[grid](
        dy, x, bias_arg, logs_arg, dw_part, n, c, s, w, rows_per_program, *dy_strides, *x_strides,
        logscale_factor, HAS_ACTNORM=has_actnorm, ACC=acc_dtype, PRECISION=precision, **blocks)
    dweight = dw_part.sum(0).to(weight.dtype)
    if not has_actnorm:
        return dx, dweight, None, None
    return dx, dweight, dbias_part.sum(0).to(bias.dtype), dlogs_part.sum(0).to(logs.dtype)


def invconv_fwd(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[:, i] = sum_j weight[i, j] x[:, j], per pixel."""
    return _mix_rows(x, weight, None, None, 1.0)


def invconv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight)."""
    dx, dweight, _, _ = _mix_rows_backward(dy, x, weight, None, None, 1.0)
    return dx, dweight


def actnorm_invconv_fwd(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                        weight: torch.Tensor) -> torch.Tensor:
    """ActNorm folded into the GEMM's load: y = ((x + bias) * exp(f * logs)) @ weight^T, per pixel."""
    return _mix_rows(x, weight, bias, logs, logscale_factor)


def actnorm_invconv_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor,
                        logscale_factor: float, weight: torch.Tensor):
    """(dx, dbias, dlogs, dweight) of y only; the log-det's own gradient is added by the caller."""
    dx, dweight, dbias, dlogs = _mix_rows_backward(dy, x, weight, bias, logs, logscale_factor)
    return dx, dbias, dlogs, dweight


# ---- W = P L U' from the factors, and its backward ----

@triton.jit
def _unit_lower_tile(lower_ptr, r, k, C, s0, s1, ACC: tl.constexpr):
    """L[r, k] for row indices r and column indices k: tril(lower, -1) + I."""
    mask = (r[:, None] < C) & (k[None, :] < r[:, None])
    tile = tl.load(lower_ptr + r[:, None] * s0 + k[None, :] * s1, mask=mask, other=0.0).to(ACC)
    return tl.where((r[:, None] == k[None, :]) & (r[:, None] < C), 1.0, tile)


@triton.jit
def _upper_tile(upper_ptr, sign_ptr, log_s_ptr, k, c, C, s0, s1, ACC: tl.constexpr):
    """U'[k, c] for row indices k and column indices c: triu(upper, 1) + diag(sign_s * exp(log_s))."""
    mask = (c[None, :] < C) & (k[:, None] < c[None, :])
    tile = tl.load(upper_ptr + k[:, None] * s0 + c[None, :] * s1, mask=mask, other=0.0).to(ACC)
    k_mask = k < C
    diag = tl.load(sign_ptr + k, mask=k_mask, other=0.0).to(ACC) * tl.exp(
        tl.load(log_s_ptr + k, mask=k_mask, other=0.0).to(ACC))
    return tl.where(k[:, None] == c[None, :], diag[:, None], tile)


@triton.jit
def _lu_weight_kernel(perm_ptr, lower_ptr, upper_ptr, sign_ptr, log_s_ptr, w_ptr, log_det_ptr, C,
                      l_s0, l_s1, u_s0, u_s1, w_s0, w_s1,
                      ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[i, c] = sum_k L[perm[i], k] U'[k, c]; U'[k, c] = 0 for k > c bounds the k loop. Program (0, 0) also
    writes log |det W| = sum(log_s)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    i = pid_m * BLOCK + tl.arange(0, BLOCK)
    c = pid_n * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(perm_ptr + i, mask=i < C, other=C)  # C marks padding rows: they load nothing
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    for k0 in range(0, tl.minimum((pid_n + 1) * BLOCK, C), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.dot(_unit_lower_tile(lower_ptr, r, k, C, l_s0, l_s1, ACC),
                     _upper_tile(upper_ptr, sign_ptr, log_s_ptr, k, c, C, u_s0, u_s1, ACC),
                     acc, input_precision="ieee", out_dtype=ACC)
    tl.store(w_ptr + i[:, None] * w_s0 + c[None, :] * w_s1, acc.to(w_ptr.dtype.element_ty),
             mask=(i[:, None] < C) & (c[None, :] < C))
    if (pid_m == 0) & (pid_n == 0):
        total = tl.zeros((BLOCK,), dtype=ACC)
        for k0 in range(0, C, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            total += tl.load(log_s_ptr + k, mask=k < C, other=0.0).to(ACC)
        tl.store(log_det_ptr, tl.sum(total, axis=0).to(log_det_ptr.dtype.element_ty))


@triton.jit
def _lu_weight_grad_kernel(dw_ptr, inv_perm_ptr, lower_ptr, upper_ptr, sign_ptr, log_s_ptr, dlog_det_ptr,
                           dlower_ptr, dupper_ptr, dlog_s_ptr, C,
                           dw_s0, dw_s1, l_s0, l_s1, u_s0, u_s1,
                           ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """With G = P^T dW (row r of G is dW[inv_perm[r]]):
    program_id(2) == 0: dlower = tril(G U'^T, -1)   (U'[k, c] = 0 for c < k: the c loop starts at the k tile)
    program_id(2) == 1: dupper = triu(L^T G, 1)     (L[r, k] = 0 for r < k: the r loop starts at the k tile)
                        and on diagonal tiles dlog_s = diag(L^T G) * sign_s * exp(log_s) + dlog_det."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    out_mask = (rows[:, None] < C) & (cols[None, :] < C)
    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    if tl.program_id(2) == 0:
        # rows = r, cols = k; contraction over c >= k.
        src = tl.load(inv_perm_ptr + rows, mask=rows < C, other=0)
        for c0 in range(pid_n * BLOCK, C, BLOCK_K):
            c = c0 + tl.arange(0, BLOCK_K)
            g = tl.load(dw_ptr + src[:, None] * dw_s0 + c[None, :] * dw_s1,
                        mask=(rows[:, None] < C) & (c[None, :] < C), other=0.0).to(ACC)
            u_t = tl.trans(_upper_tile(upper_ptr, sign_ptr, log_s_ptr, cols, c, C, u_s0, u_s1, ACC))
            acc = tl.dot(g, u_t, acc, input_precision="ieee", out_dtype=ACC)
        acc = tl.where(cols[None, :] < rows[:, None], acc, 0.0)
        tl.store(dlower_ptr + rows[:, None] * C + cols[None, :], acc.to(dlower_ptr.dtype.element_ty),
                 mask=out_mask)
    else:
        # rows = k, cols = c; contraction over r >= k.
        for r0 in range(pid_m * BLOCK, C, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            src = tl.load(inv_perm_ptr + r, mask=r < C, other=0)
            l_t = tl.trans(_unit_lower_tile(lower_ptr, r, rows, C, l_s0, l_s1, ACC))
            g = tl.load(dw_ptr + src[:, None] * dw_s0 + cols[None, :] * dw_s1,
                        mask=(r[:, None] < C) & (cols[None, :] < C), other=0.0).to(ACC)
            acc = tl.dot(l_t, g, acc, input_precision="ieee", out_dtype=ACC)
        on_diag = rows[:, None] == cols[None, :]
        tl.store(dupper_ptr + rows[:, None] * C + cols[None, :],
                 tl.where(cols[None, :] > rows[:, None], acc, 0.0).to(dupper_ptr.dtype.element_ty), mask=out_mask)
        if pid_m == pid_n:
            k_mask = rows < C
            d_diag = tl.sum(tl.where(on_diag, acc, 0.0), axis=1)
            diag = tl.load(sign_ptr + rows, mask=k_mask, other=0.0).to(ACC) * tl.exp(
                tl.load(log_s_ptr + rows, mask=k_mask, other=0.0).to(ACC))
            dlog_s = d_diag * diag + tl.load(dlog_det_ptr).to(ACC)
            tl.store(dlog_s_ptr + rows, dlog_s.to(dlog_s_ptr.dtype.element_ty), mask=k_mask)


def lu_weight_fwd(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor,
                  log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W = P L U' [C, C], log |det W| = sum(log_s) as a 0-dim tensor), in the factors' dtype."""
    perm, sign_s, log_s = perm.contiguous(), sign_s.contiguous(), log_s.contiguous()
    c = lower.shape[0]
    weight = lower.new_empty((c, c))
    log_det = log_s.new_empty(())
    blocks = _square_block(_on_gpu(lower))
    grid = (triton.cdiv(c, blocks["BLOCK"]), triton.cdiv(c, blocks["BLOCK"]))
    _lu_weight_kernel[grid](perm, lower, upper, sign_s, log_s, weight, log_det, c,
                            lower.stride(0), lower.stride(1), upper.stride(0), upper.stride(1),
                            weight.stride(0), weight.stride(1), ACC=compute_type(lower.dtype), **blocks)
    return weight, log_det


def lu_weight_bwd(dweight: torch.Tensor, dlog_det: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor,
                  upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor):
    """(dlower, dupper, dlog_s) given the gradients of W and of log |det W|."""
    sign_s, log_s = sign_s.contiguous(), log_s.contiguous()
    c = lower.shape[0]
    dlower, dupper = lower.new_empty((c, c)), upper.new_empty((c, c))
    dlog_s = torch.empty_like(log_s)
    inv_perm = torch.argsort(perm)
    blocks = _square_block(_on_gpu(lower))
    grid = (triton.cdiv(c, blocks["BLOCK"]), triton.cdiv(c, blocks["BLOCK"]), 2)
    _lu_weight_grad_kernel[grid](dweight, inv_perm, lower, upper, sign_s, log_s, dlog_det.reshape(()),
                                 dlower, dupper, dlog_s, c, dweight.stride(0), dweight.stride(1),
                                 lower.stride(0), lower.stride(1), upper.stride(0), upper.stride(1),
                                 ACC=compute_type(lower.dtype), **blocks)
    return dlower, dupper, dlog_s
