"""The whole [B, C] Glow (BERT-flow family) in one kernel per direction: forward, inverse and backward.

A program owns BLOCK_B rows and takes them through every step of every level. Its rows live in a per-program
slice of an fp32 workspace ([2, B, C]; the slice is written and re-read by the same program, so it stays in
L1/L2) in *physical* channel order: channel p of the workspace never moves. Fixed permutations and the splits
between levels move no data; the host compiles them (flowkern.ops.glow_ops.GlowPlan) into one table per step:
    order[s, k]        the physical channel that is coupling channel k at step s (k < CL, the level's channels);
                       k < C1 (half of CL) condition the MLP, the others are transformed
    order[S + s, k]    the ActNorm channel of that physical channel (the step's ActNorm runs before its permutation)
so every loop of a step runs over the CL channels still active at its level, the conditioning and the transformed
ones in separate loops, and W1 / W3 are read contiguously. A level's factored-out channels are written to z once,
at their split, in contiguous columns starting at meta column 15 (the inverse and the backward read them back
there); the last level's channels go to z at the end. LU flows keep physical order = logical order (order[s] is
the identity and is not read): the LU mixing is a real GEMM over the level's CL channels, ping-ponging between
the two workspace slots; the host folds the preceding ActNorm into W and a bias (W diag(s), W (b s)).

Per step (s = exp(f * logs) for every ActNorm, f = logscale_factor):
    ActNorm (permutation flows): v = (v + b) * s on the level's channels, log_det += sum(f * logs)
    MLP on the conditioning channels: h2 = relu(((relu(((x1 W1^T) + b1) s1) W2^T) + b2) s2)
    output layer o = (h2 W3^T + b3) s3, then additive v2 += o, or affine v2 = (v2 + o[0::2]) * sigmoid(o[1::2] + 2)
    with log_det += sum(logsigmoid(o[1::2] + 2)).
z's N(0, I) log-prob comes from the fp32 values as they are written.

Threads exchange data through the workspace between phases (a loop's stores are read by the next loop or step
with another thread layout), so each such phase boundary has an explicit barrier (tl.debug_barrier, a CTA-wide
__syncthreads). Within one chunk of a loop every element is loaded and stored by the same thread, or its new value
depends on values exchanged through the dot (which synchronizes), so chunks need none.

Backward: the forward saves each step's coupling input and z in fp32 (`mid`, physical order; LU flows also each
GEMM input, `inp`) when gradients are needed; the backward walks the steps in reverse, recomputes the MLP's
hidden layers from `mid`, and writes per-program fp32 partial parameter gradients (read-modify-write on the
program's own slice: no atomics; torch sums the slices, deterministic). Programs loop over row tiles (a persistent
grid), so the partial buffer is [programs, parameters] however large B is. LU flows write the gradient at each
GEMM output (`dmid`); the launcher turns it into dW and db with one batched GEMM per level (cuBLAS on GPU).

Compute is fp32 (fp64 for fp64 data); tl.dot runs IEEE for fp32/fp64 data and split TF32 for fp16/bf16 data
(kernels/triton/invconv.py explains why plain TF32 is not used).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch._utils import _flatten_dense_tensors

from ..._checks import compute_dtype
from .. import glow_meta as column   # the meta table's columns, read by name: _meta(meta_ptr, s, column.CL)
from ._layout import compute_type, target_programs  # importing _layout also fixes interpreter loop bounds
from .invconv import dot_precision

# The per-step meta table (int64 [steps, column.COUNT], flowkern.ops.glow_ops.GlowPlan; _meta(meta_ptr, s, column.X)
# reads column X, named in flowkern/kernels/glow_meta.py).

_LOG_2PI = math.log(2 * math.pi)
# -C/2 log(2 pi) per (device, dtype, C), as a tensor: a float kernel argument would be rounded to fp32.
_PRIOR_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _prior_constant(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (channels, dtype, device)
    if key not in _PRIOR_CONSTANTS:
        _PRIOR_CONSTANTS[key] = torch.full((1,), -0.5 * _LOG_2PI * channels, dtype=dtype, device=device)
    return _PRIOR_CONSTANTS[key]


def _blocks(on_gpu: bool, hidden: int, backward: bool = False) -> dict:
    hp = max(16, triton.next_power_of_2(hidden))
    if on_gpu:
        # The largest tiles ptxas for sm_90 compiles without register spills (the Hopper compile test bounds them):
        # 16 rows (tl.dot's smallest M); 32-channel chunks forward and inverse at hidden <= 32, 16 otherwise and in
        # the backward, which holds the MLP's activations and their gradients across its loops (its LU GEMM too:
        # 32-wide tiles there doubled the estimated instructions, bench/static_cost.py); 8 warps. The backward's
        # loops are not software-pipelined (num_stages=1): prefetched chunks spilled.
        if backward:
            return dict(BLOCK_B=16, BLOCK_C=16, HP=hp, BLOCK_MIX=16, num_warps=8, num_stages=1)
        return dict(BLOCK_B=16, BLOCK_C=32 if hp <= 32 else 16, HP=hp, BLOCK_MIX=32, num_warps=8)
    # Interpreter: few, wide programs and chunks (each costs ~ms); 32 rows so the tests' batches of 21-37 rows
    # still span two programs, 64 channels so the tests' 131-channel flows span several chunks at their first
    # level and one at their last.
    return dict(BLOCK_B=32, BLOCK_C=64, HP=hp, BLOCK_MIX=64)


@triton.jit
def _meta(meta_ptr, s, col):
    return tl.load(meta_ptr + s * column.COUNT + col)


@triton.jit
def _tile(ptr, rows_off, p, mask, ACC: tl.constexpr):
    """A [BLOCK_B, BLOCK_C] tile of a contiguous [B, C] buffer (rows_off = rows * C) at physical channels p."""
    return tl.load(ptr + rows_off[:, None] + p[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _physical(order_ptr, s, k, k_mask, C, LU: tl.constexpr):
    """The physical channels of coupling channels k at step s (LU flows: the same)."""
    if LU:
        p = k
    else:
        p = tl.load(order_ptr + s * C + k, mask=k_mask, other=0)
    return p


@triton.jit
def _scale_vec(params_ptr, off_b, off_l, idx, mask, logscale_factor, ACC: tl.constexpr):
    """(bias, exp(f * logs)) gathered at idx; masked entries get bias 0 and scale 1."""
    b = tl.load(params_ptr + off_b + idx, mask=mask, other=0.0).to(ACC)
    s = tl.exp(logscale_factor * tl.load(params_ptr + off_l + idx, mask=mask, other=0.0).to(ACC))
    return b, s


@triton.jit
def _actnorm_params(params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, ACC: tl.constexpr):
    """(ActNorm channel, bias, scale) of coupling channels k at step s (permutation flows)."""
    an = tl.load(order_ptr + (S + s) * C + k, mask=k_mask, other=0)
    b, sc = _scale_vec(params_ptr, _meta(meta_ptr, s, column.OFF_ACTNORM_BIAS),
                       _meta(meta_ptr, s, column.OFF_ACTNORM_LOGS), an, k_mask, logscale_factor, ACC)
    return an, b, sc


@triton.jit
def _coupling_input(cur_ptr, mid_s_ptr, rows_off, row_mask, params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C,
                    logscale_factor, LU: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr):
    """(physical channels, mask, v, log of the ActNorm scale) for coupling channels k at step s: the state's tile
    with the step's ActNorm applied (permutation flows), saved to mid_s when SAVE (the backward's input)."""
    mask = row_mask[:, None] & k_mask[None, :]
    p = _physical(order_ptr, s, k, k_mask, C, LU)
    v = _tile(cur_ptr, rows_off, p, mask, ACC)
    log_scale = k.to(ACC) * 0.0
    if not LU:
        an, b, sc = _actnorm_params(params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, ACC)
        v = (v + b[None, :]) * sc[None, :]
        log_scale = tl.log(sc)
    if SAVE:
        tl.store(mid_s_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
    return p, mask, v, log_scale


@triton.jit
def _first_layer_tile(params_ptr, off_w1, C1, k, k_mask, hid, hid_mask):
    """W1^T at conditioning channels k: [BLOCK_C, HP] (W1 is [HID, C1], row-major)."""
    return tl.load(params_ptr + off_w1 + hid[None, :] * C1 + k[:, None], mask=k_mask[:, None] & hid_mask[None, :],
                   other=0.0)


@triton.jit
def _h2(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC: tl.constexpr, PRECISION: tl.constexpr,
        HP: tl.constexpr):
    """relu(pre2): the MLP's last hidden layer."""
    pre1, pre2 = _hidden(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
    return tl.maximum(pre2, 0.0)


@triton.jit
def _hidden(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC: tl.constexpr, PRECISION: tl.constexpr,
            HP: tl.constexpr):
    """(pre1, pre2) of the MLP from acc1 = x1 W1^T."""
    hid = tl.arange(0, HP)
    hid_mask = hid < HID
    b1, s1 = _scale_vec(params_ptr, _meta(meta_ptr, s, column.OFF_B1), _meta(meta_ptr, s, column.OFF_L1), hid,
                        hid_mask, logscale_factor, ACC)
    pre1 = (acc1 + b1[None, :]) * s1[None, :]
    off_w2 = _meta(meta_ptr, s, column.OFF_W2)
    w2_t = tl.load(params_ptr + off_w2 + hid[None, :] * HID + hid[:, None],
                   mask=hid_mask[None, :] & hid_mask[:, None], other=0.0).to(ACC)
    a2 = tl.dot(tl.maximum(pre1, 0.0), w2_t, input_precision=PRECISION, out_dtype=ACC)
    b2, s2 = _scale_vec(params_ptr, _meta(meta_ptr, s, column.OFF_B2), _meta(meta_ptr, s, column.OFF_L2), hid,
                        hid_mask, logscale_factor, ACC)
    return pre1, (a2 + b2[None, :]) * s2[None, :]


@triton.jit
def _output(h2, params_ptr, meta_ptr, s, cols, mask, HID, logscale_factor, ACC: tl.constexpr,
            PRECISION: tl.constexpr, HP: tl.constexpr):
    """(h2 W3[cols]^T + b3) s3 only."""
    o, w3_t, s3 = _output_cols(h2, params_ptr, meta_ptr, s, cols, mask, HID, logscale_factor, ACC, PRECISION, HP)
    return o


@triton.jit
def _scale(params_ptr, off_b, off_l, idx, mask, logscale_factor, ACC: tl.constexpr):
    """exp(f * logs) gathered at idx (1 where masked)."""
    b, sc = _scale_vec(params_ptr, off_b, off_l, idx, mask, logscale_factor, ACC)
    return sc


@triton.jit
def _output_cols(h2, params_ptr, meta_ptr, s, cols, mask, HID, logscale_factor, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, HP: tl.constexpr):
    """(o, W3^T tile, s3) at output columns `cols`: o = (h2 W3[cols]^T + b3) s3, [BLOCK_B, BLOCK_C]."""
    hid = tl.arange(0, HP)
    w3_t = tl.load(params_ptr + _meta(meta_ptr, s, column.OFF_W3) + cols[None, :] * HID + hid[:, None],
                   mask=mask[None, :] & (hid < HID)[:, None], other=0.0).to(ACC)
    b3, s3 = _scale_vec(params_ptr, _meta(meta_ptr, s, column.OFF_B3), _meta(meta_ptr, s, column.OFF_L3), cols, mask,
                        logscale_factor, ACC)
    o = (tl.dot(h2, w3_t, input_precision=PRECISION, out_dtype=ACC) + b3[None, :]) * s3[None, :]
    return o, w3_t, s3


@triton.jit
def _first_layer_from(buf_ptr, rows_off, row_mask, params_ptr, meta_ptr, order_ptr, s, C, C1, HID,
                      LU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, HP: tl.constexpr):
    """x1 W1^T [BLOCK_B, HP] from a buffer holding the coupling's input (physical order)."""
    hid = tl.arange(0, HP)
    acc1 = tl.zeros((BLOCK_B, HP), dtype=ACC)
    for k0 in range(0, C1, BLOCK_C):
        k = k0 + tl.arange(0, BLOCK_C)
        k_mask = k < C1
        p = _physical(order_ptr, s, k, k_mask, C, LU)
        v = _tile(buf_ptr, rows_off, p, row_mask[:, None] & k_mask[None, :], ACC)
        w1_t = _first_layer_tile(params_ptr, _meta(meta_ptr, s, column.OFF_W1), C1, k, k_mask, hid, hid < HID).to(ACC)
        acc1 = tl.dot(v, w1_t, acc1, input_precision=PRECISION, out_dtype=ACC)
    return acc1


@triton.jit
def _coupling_chunk(v, h2, params_ptr, meta_ptr, s, col, col_mask, mask, HID, logscale_factor, AFFINE: tl.constexpr,
                    INVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, HP: tl.constexpr):
    """(v with the coupling, or its inverse, applied (transformed channels `col`), this chunk's per-row log-det)."""
    log_det = tl.sum(tl.zeros_like(v), axis=1)
    if AFFINE:
        shift = _output(h2, params_ptr, meta_ptr, s, 2 * col, col_mask, HID, logscale_factor, ACC, PRECISION, HP)
        raw = _output(h2, params_ptr, meta_ptr, s, 2 * col + 1, col_mask, HID, logscale_factor, ACC, PRECISION,
                      HP) + 2.0
        if INVERSE:
            out = v * (1.0 + tl.exp(-raw)) - shift
        else:
            out = (v + shift) * tl.sigmoid(raw)
            log_det = tl.sum(tl.where(mask, _log_sigmoid(raw), 0.0), axis=1)
    else:
        o = _output(h2, params_ptr, meta_ptr, s, col, col_mask, HID, logscale_factor, ACC, PRECISION, HP)
        if INVERSE:
            out = v - o
        else:
            out = v + o
    return out, log_det


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _accumulate(ptr, values, mask):
    """Read-modify-write of this program's own partial-gradient slice (no other program touches it)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + values, mask=mask)


@triton.jit
def _mix_gemm(src_ptr, dst_ptr, save_ptr, rows_off, row_mask, mix_ptr, off_w, off_b, CL,
              HAS_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[:, n] = sum_k src[:, k] M[n, k] (+ b[n]) over the level's CL channels (M^T with TRANSPOSED). SAVE also
    stores src to save_ptr (the forward keeps GEMM inputs). The caller puts barriers around it."""
    for n0 in range(0, CL, BLOCK_C):
        n = n0 + tl.arange(0, BLOCK_C)
        n_mask = n < CL
        mask_n = row_mask[:, None] & n_mask[None, :]
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
        for k0 in range(0, CL, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < CL
            u = _tile(src_ptr, rows_off, k, row_mask[:, None] & k_mask[None, :], ACC)
            w_mask = k_mask[:, None] & n_mask[None, :]
            if TRANSPOSED:
                m_t = tl.load(mix_ptr + off_w + k[:, None] * CL + n[None, :], mask=w_mask, other=0.0).to(ACC)
            else:
                m_t = tl.load(mix_ptr + off_w + n[None, :] * CL + k[:, None], mask=w_mask, other=0.0).to(ACC)
            acc = tl.dot(u, m_t, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(mix_ptr + off_b + n, mask=n_mask, other=0.0).to(ACC)[None, :]
        if SAVE:
            tl.store(save_ptr + rows_off[:, None] + n[None, :], _tile(src_ptr, rows_off, n, mask_n, ACC), mask=mask_n)
        tl.store(dst_ptr + rows_off[:, None] + n[None, :], acc, mask=mask_n)


@triton.jit
def _glow_fwd_kernel(x_ptr, z_ptr, log_det_ptr, log_prior_ptr, prior_const_ptr, ws_ptr, mid_ptr, inp_ptr,
                     params_ptr, mix_ptr, meta_ptr, order_ptr,
                     B, C, S, HID, x_sb, x_sc, z_sb, z_sc, logscale_factor,
                     AFFINE: tl.constexpr, LU: tl.constexpr, SAVE: tl.constexpr, ACC: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, HP: tl.constexpr,
                     BLOCK_MIX: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    rows_off = rows64 * C
    slot_size = B.to(tl.int64) * C
    hid = tl.arange(0, HP)
    hid_mask = hid < HID

    for c0 in range(0, C, BLOCK_C):  # x -> workspace slot 0 (level 0: physical order = input order)
        p = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (p < C)[None, :]
        v = tl.load(x_ptr + rows64[:, None] * x_sb + p.to(tl.int64)[None, :] * x_sc, mask=mask, other=0.0).to(ACC)
        tl.store(ws_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
    tl.debug_barrier()

    log_det = tl.zeros((BLOCK_B,), dtype=ACC)
    actnorm_log_det = tl.zeros((BLOCK_C,), dtype=ACC)
    sq = tl.zeros((BLOCK_B,), dtype=ACC)   # sum of z^2 for the prior
    slot = 0
    for s in range(S):
        C1 = _meta(meta_ptr, s, column.C1)
        CL = _meta(meta_ptr, s, column.CL)
        # The level's last step (not the flow's): its transformed channels leave for z.
        split = (s < S - 1) & (_meta(meta_ptr, tl.minimum(s + 1, S - 1), column.CL) != CL)
        z_first = _meta(meta_ptr, s, column.Z_OFFSET)
        if LU:
            _mix_gemm(ws_ptr + slot * slot_size, ws_ptr + (1 - slot) * slot_size, inp_ptr + s * slot_size,
                      rows_off, row_mask, mix_ptr, _meta(meta_ptr, s, column.OFF_MIX_W),
                      _meta(meta_ptr, s, column.OFF_MIX_B), CL,
                      True, False, SAVE, ACC, PRECISION, BLOCK_B, BLOCK_MIX)
            tl.debug_barrier()
            slot = 1 - slot
        cur_ptr = ws_ptr + slot * slot_size
        # Conditioning channels: ActNorm (permutation flows), save the coupling input, first MLP layer.
        acc1 = tl.zeros((BLOCK_B, HP), dtype=ACC)
        for k0 in range(0, C1, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < C1
            p, mask, v, log_scale = _coupling_input(cur_ptr, mid_ptr + s * slot_size, rows_off, row_mask, params_ptr,
                                                    meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, LU,
                                                    SAVE, ACC)
            actnorm_log_det += log_scale
            if not LU:
                tl.store(cur_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
            w1_t = _first_layer_tile(params_ptr, _meta(meta_ptr, s, column.OFF_W1), C1, k, k_mask, hid,
                                     hid_mask).to(ACC)
            acc1 = tl.dot(v, w1_t, acc1, input_precision=PRECISION, out_dtype=ACC)
        h2 = _h2(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
        # Transformed channels: ActNorm, save the coupling input, the coupling; at a split, straight to z.
        for k0 in range(C1, CL, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < CL
            p, mask, v, log_scale = _coupling_input(cur_ptr, mid_ptr + s * slot_size, rows_off, row_mask, params_ptr,
                                                    meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, LU,
                                                    SAVE, ACC)
            actnorm_log_det += log_scale
            v, chunk_log_det = _coupling_chunk(v, h2, params_ptr, meta_ptr, s, k - C1, k_mask, mask, HID,
                                               logscale_factor, AFFINE, False, ACC, PRECISION, HP)
            log_det += chunk_log_det
            if split:
                z_col = (z_first + k - C1).to(tl.int64)
                tl.store(z_ptr + rows64[:, None] * z_sb + z_col[None, :] * z_sc, v.to(z_ptr.dtype.element_ty),
                         mask=mask)
                if SAVE:  # z before rounding, for the prior's gradient
                    tl.store(mid_ptr + S * slot_size + rows_off[:, None] + p[None, :], v, mask=mask)
                sq += tl.sum(tl.where(mask, v * v, 0.0), axis=1)
            else:
                tl.store(cur_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
        tl.debug_barrier()

    # The last level's channels -> z, and the prior's log-prob, from the fp32 values (before any rounding to the
    # storage dtype, like the log-det).
    CL = _meta(meta_ptr, S - 1, column.CL)
    z_first = _meta(meta_ptr, S - 1, column.Z_OFFSET)
    cur_ptr = ws_ptr + slot * slot_size
    for k0 in range(0, CL, BLOCK_C):
        k = k0 + tl.arange(0, BLOCK_C)
        k_mask = k < CL
        mask = row_mask[:, None] & k_mask[None, :]
        p = _physical(order_ptr, S - 1, k, k_mask, C, LU)
        v = _tile(cur_ptr, rows_off, p, mask, ACC)
        z_col = (z_first + k).to(tl.int64)
        tl.store(z_ptr + rows64[:, None] * z_sb + z_col[None, :] * z_sc, v.to(z_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(mid_ptr + S * slot_size + rows_off[:, None] + p[None, :], v, mask=mask)
        sq += tl.sum(v * v, axis=1)
    tl.store(log_det_ptr + rows, log_det + tl.sum(actnorm_log_det, axis=0), mask=row_mask)
    tl.store(log_prior_ptr + rows, tl.load(prior_const_ptr) - 0.5 * sq, mask=row_mask)


@triton.jit
def _glow_inv_kernel(z_ptr, x_ptr, ws_ptr, params_ptr, mix_ptr, meta_ptr, order_ptr,
                     B, C, S, HID, z_sb, z_sc, x_sb, x_sc, logscale_factor,
                     AFFINE: tl.constexpr, LU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, HP: tl.constexpr, BLOCK_MIX: tl.constexpr):
    """x from z: the steps in reverse; `mix` holds W^-1 with the ActNorm inverse folded in (LU flows). A level's
    factored-out channels are read from z at its last step."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    rows_off = rows64 * C
    slot_size = B.to(tl.int64) * C
    hid = tl.arange(0, HP)
    hid_mask = hid < HID

    CL = _meta(meta_ptr, S - 1, column.CL)
    z_first = _meta(meta_ptr, S - 1, column.Z_OFFSET)
    for k0 in range(0, CL, BLOCK_C):  # the last level's channels from z
        k = k0 + tl.arange(0, BLOCK_C)
        k_mask = k < CL
        mask = row_mask[:, None] & k_mask[None, :]
        p = _physical(order_ptr, S - 1, k, k_mask, C, LU)
        z_col = (z_first + k).to(tl.int64)
        v = tl.load(z_ptr + rows64[:, None] * z_sb + z_col[None, :] * z_sc, mask=mask, other=0.0).to(ACC)
        tl.store(ws_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
    tl.debug_barrier()

    slot = 0
    for si in range(S):
        s = S - 1 - si
        C1 = _meta(meta_ptr, s, column.C1)
        CL = _meta(meta_ptr, s, column.CL)
        split = (s < S - 1) & (_meta(meta_ptr, tl.minimum(s + 1, S - 1), column.CL) != CL)
        z_first = _meta(meta_ptr, s, column.Z_OFFSET)
        cur_ptr = ws_ptr + slot * slot_size
        # Conditioning channels pass through a coupling unchanged, so its output is the MLP's input; their ActNorm
        # inverse (permutation flows) is applied in the same pass.
        acc1 = tl.zeros((BLOCK_B, HP), dtype=ACC)
        for k0 in range(0, C1, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < C1
            mask = row_mask[:, None] & k_mask[None, :]
            p = _physical(order_ptr, s, k, k_mask, C, LU)
            v = _tile(cur_ptr, rows_off, p, mask, ACC)
            w1_t = _first_layer_tile(params_ptr, _meta(meta_ptr, s, column.OFF_W1), C1, k, k_mask, hid,
                                     hid_mask).to(ACC)
            acc1 = tl.dot(v, w1_t, acc1, input_precision=PRECISION, out_dtype=ACC)
            if not LU:
                an, b, sc = _actnorm_params(params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, ACC)
                tl.store(cur_ptr + rows_off[:, None] + p[None, :], v / sc[None, :] - b[None, :], mask=mask)
        h2 = _h2(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
        for k0 in range(C1, CL, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < CL
            mask = row_mask[:, None] & k_mask[None, :]
            p = _physical(order_ptr, s, k, k_mask, C, LU)
            if split:
                z_col = (z_first + k - C1).to(tl.int64)
                v = tl.load(z_ptr + rows64[:, None] * z_sb + z_col[None, :] * z_sc, mask=mask, other=0.0).to(ACC)
            else:
                v = _tile(cur_ptr, rows_off, p, mask, ACC)
            v, unused_log_det = _coupling_chunk(v, h2, params_ptr, meta_ptr, s, k - C1, k_mask, mask, HID,
                                                logscale_factor, AFFINE, True, ACC, PRECISION, HP)
            if not LU:
                an, b, sc = _actnorm_params(params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, ACC)
                v = v / sc[None, :] - b[None, :]
            tl.store(cur_ptr + rows_off[:, None] + p[None, :], v, mask=mask)
        tl.debug_barrier()
        if LU:
            _mix_gemm(cur_ptr, ws_ptr + (1 - slot) * slot_size, cur_ptr, rows_off, row_mask, mix_ptr,
                      _meta(meta_ptr, s, column.OFF_MIX_W), _meta(meta_ptr, s, column.OFF_MIX_B), CL, True, False,
                      False, ACC, PRECISION,
                      BLOCK_B, BLOCK_MIX)
            tl.debug_barrier()
            slot = 1 - slot

    cur_ptr = ws_ptr + slot * slot_size
    for c0 in range(0, C, BLOCK_C):
        p = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (p < C)[None, :]
        v = _tile(cur_ptr, rows_off, p, mask, ACC)
        tl.store(x_ptr + rows64[:, None] * x_sb + p.to(tl.int64)[None, :] * x_sc, v.to(x_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _output_cols_backward(do, o, h2, w3_t, s3, cols, mask, part_ptr, meta_ptr, s, HID, logscale_factor,
                          ACC: tl.constexpr, PRECISION: tl.constexpr, HP: tl.constexpr):
    """Accumulates dW3, db3, dlogs3 at `cols` into the program's partials; returns the contribution to dh2."""
    hid = tl.arange(0, HP)
    dg = do * s3[None, :]
    _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_B3) + cols, tl.sum(dg, axis=0), mask)
    _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_L3) + cols, logscale_factor * tl.sum(do * o, axis=0), mask)
    dw3 = tl.dot(tl.trans(dg), h2, input_precision=PRECISION, out_dtype=ACC)
    _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_W3) + cols[:, None] * HID + hid[None, :], dw3,
                mask[:, None] & (hid < HID)[None, :])
    return tl.dot(dg, tl.trans(w3_t), input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _actnorm_backward(dv, v, params_ptr, meta_ptr, order_ptr, part_ptr, s, S, k, k_mask, C, dlog_det_total,
                      logscale_factor, ACC: tl.constexpr):
    """d(ActNorm input) from dv = d(ActNorm output) at coupling channels k (permutation flows); accumulates the
    ActNorm's parameter gradients. v is the saved output y = (x + b) s: d logs = f (sum dy y + sum d(log_det))."""
    an, b, sc = _actnorm_params(params_ptr, meta_ptr, order_ptr, s, S, k, k_mask, C, logscale_factor, ACC)
    dxn = dv * sc[None, :]
    _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_ACTNORM_BIAS) + an, tl.sum(dxn, axis=0), k_mask)
    _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_ACTNORM_LOGS) + an,
                logscale_factor * (tl.sum(dv * v, axis=0) + dlog_det_total),
                k_mask)
    return dxn


@triton.jit
def _glow_bwd_kernel(dz_ptr, dlog_det_ptr, dlog_prior_ptr, dx_ptr, ws_ptr, mid_ptr, dmid_ptr,
                     params_ptr, mix_ptr, meta_ptr, order_ptr, part_ptr,
                     B, C, S, HID, P_TOTAL, n_tiles, dz_sb, dz_sc, dx_sb, dx_sc, logscale_factor,
                     AFFINE: tl.constexpr, LU: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, HP: tl.constexpr, BLOCK_MIX: tl.constexpr):
    pid = tl.program_id(0)
    part_ptr += pid.to(tl.int64) * P_TOTAL
    slot_size = B.to(tl.int64) * C
    z_saved = mid_ptr + S * slot_size
    hid = tl.arange(0, HP)
    hid_mask = hid < HID
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        rows64 = rows.to(tl.int64)
        rows_off = rows64 * C
        dlog_det = tl.load(dlog_det_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        dlog_prior = tl.load(dlog_prior_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        dlog_det_total = tl.sum(dlog_det, axis=0)
        # The last level's d(z) plus the prior's -z d(log_prior), into physical order (the factored-out channels'
        # come in at their split).
        CL = _meta(meta_ptr, S - 1, column.CL)
        z_first = _meta(meta_ptr, S - 1, column.Z_OFFSET)
        for k0 in range(0, CL, BLOCK_C):
            k = k0 + tl.arange(0, BLOCK_C)
            k_mask = k < CL
            mask = row_mask[:, None] & k_mask[None, :]
            p = _physical(order_ptr, S - 1, k, k_mask, C, LU)
            z_col = (z_first + k).to(tl.int64)
            dz = tl.load(dz_ptr + rows64[:, None] * dz_sb + z_col[None, :] * dz_sc, mask=mask, other=0.0).to(ACC)
            z = _tile(z_saved, rows_off, p, mask, ACC)
            tl.store(ws_ptr + rows_off[:, None] + p[None, :], dz - z * dlog_prior[:, None], mask=mask)
        tl.debug_barrier()

        slot = 0
        for si in range(S):
            s = S - 1 - si
            C1 = _meta(meta_ptr, s, column.C1)
            CL = _meta(meta_ptr, s, column.CL)
            split = (s < S - 1) & (_meta(meta_ptr, tl.minimum(s + 1, S - 1), column.CL) != CL)
            z_first = _meta(meta_ptr, s, column.Z_OFFSET)
            cur_ptr = ws_ptr + slot * slot_size
            mid_s = mid_ptr + s * slot_size
            # Recompute the MLP from the saved coupling input.
            acc1 = _first_layer_from(mid_s, rows_off, row_mask, params_ptr, meta_ptr, order_ptr, s, C, C1, HID,
                                     LU, ACC, PRECISION, BLOCK_B, BLOCK_C, HP)
            pre1, pre2 = _hidden(acc1, params_ptr, meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
            h1, h2 = tl.maximum(pre1, 0.0), tl.maximum(pre2, 0.0)
            # Transformed channels: the coupling's backward (dh2, output-layer gradients), then their ActNorm
            # backward (permutation flows) or dmid (LU flows). At a split their d(z) comes straight from dz.
            dh2 = tl.zeros((BLOCK_B, HP), dtype=ACC)
            for k0 in range(C1, CL, BLOCK_C):
                k = k0 + tl.arange(0, BLOCK_C)
                k_mask = k < CL
                mask = row_mask[:, None] & k_mask[None, :]
                p = _physical(order_ptr, s, k, k_mask, C, LU)
                col = k - C1
                v = _tile(mid_s, rows_off, p, mask, ACC)
                if split:
                    z_col = (z_first + col).to(tl.int64)
                    dy = tl.load(dz_ptr + rows64[:, None] * dz_sb + z_col[None, :] * dz_sc, mask=mask,
                                 other=0.0).to(ACC)
                    dy -= _tile(z_saved, rows_off, p, mask, ACC) * dlog_prior[:, None]
                else:
                    dy = _tile(cur_ptr, rows_off, p, mask, ACC)
                if AFFINE:
                    shift, w3s_t, s3s = _output_cols(h2, params_ptr, meta_ptr, s, 2 * col, k_mask, HID,
                                                     logscale_factor, ACC, PRECISION, HP)
                    raw_out, w3r_t, s3r = _output_cols(h2, params_ptr, meta_ptr, s, 2 * col + 1, k_mask, HID,
                                                       logscale_factor, ACC, PRECISION, HP)
                    sigma = tl.sigmoid(raw_out + 2.0)
                    dshift = tl.where(mask, dy * sigma, 0.0)
                    draw = tl.where(mask, (dy * (v + shift) * sigma + dlog_det[:, None]) * (1.0 - sigma), 0.0)
                    dh2 += _output_cols_backward(dshift, shift, h2, w3s_t, s3s, 2 * col, k_mask, part_ptr, meta_ptr,
                                                 s, HID, logscale_factor, ACC, PRECISION, HP)
                    dh2 += _output_cols_backward(draw, raw_out, h2, w3r_t, s3r, 2 * col + 1, k_mask, part_ptr,
                                                 meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
                    dv = dshift
                else:
                    o, w3_t, s3 = _output_cols(h2, params_ptr, meta_ptr, s, col, k_mask, HID, logscale_factor, ACC,
                                               PRECISION, HP)
                    dh2 += _output_cols_backward(tl.where(mask, dy, 0.0), o, h2, w3_t, s3, col, k_mask, part_ptr,
                                                 meta_ptr, s, HID, logscale_factor, ACC, PRECISION, HP)
                    dv = dy
                if LU:
                    tl.store(dmid_ptr + s * slot_size + rows_off[:, None] + p[None, :], dv, mask=mask)
                else:
                    dv = _actnorm_backward(dv, v, params_ptr, meta_ptr, order_ptr, part_ptr, s, S, k, k_mask, C,
                                           dlog_det_total, logscale_factor, ACC)
                tl.store(cur_ptr + rows_off[:, None] + p[None, :], dv, mask=mask)
            # Down through the two hidden layers (registers only).
            dpre2 = tl.where(pre2 > 0.0, dh2, 0.0)
            s2 = _scale(params_ptr, _meta(meta_ptr, s, column.OFF_B2), _meta(meta_ptr, s, column.OFF_L2), hid,
                        hid_mask, logscale_factor, ACC)
            _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_B2) + hid, tl.sum(dpre2 * s2[None, :], axis=0),
                        hid_mask)
            _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_L2) + hid,
                        logscale_factor * tl.sum(dpre2 * pre2, axis=0),
                        hid_mask)
            da2 = dpre2 * s2[None, :]
            hid_2d = hid_mask[:, None] & hid_mask[None, :]
            off_w2 = _meta(meta_ptr, s, column.OFF_W2)
            _accumulate(part_ptr + off_w2 + hid[:, None] * HID + hid[None, :],
                        tl.dot(tl.trans(da2), h1, input_precision=PRECISION, out_dtype=ACC), hid_2d)
            w2 = tl.load(params_ptr + off_w2 + hid[:, None] * HID + hid[None, :], mask=hid_2d, other=0.0).to(ACC)
            dh1 = tl.dot(da2, w2, input_precision=PRECISION, out_dtype=ACC)
            dpre1 = tl.where(pre1 > 0.0, dh1, 0.0)
            s1 = _scale(params_ptr, _meta(meta_ptr, s, column.OFF_B1), _meta(meta_ptr, s, column.OFF_L1), hid,
                        hid_mask, logscale_factor, ACC)
            _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_B1) + hid, tl.sum(dpre1 * s1[None, :], axis=0),
                        hid_mask)
            _accumulate(part_ptr + _meta(meta_ptr, s, column.OFF_L1) + hid,
                        logscale_factor * tl.sum(dpre1 * pre1, axis=0),
                        hid_mask)
            da1 = dpre1 * s1[None, :]
            # Conditioning channels: first layer (dW1, d(x1)), then the ActNorm backward or dmid.
            off_w1 = _meta(meta_ptr, s, column.OFF_W1)
            for k0 in range(0, C1, BLOCK_C):
                k = k0 + tl.arange(0, BLOCK_C)
                k_mask = k < C1
                mask = row_mask[:, None] & k_mask[None, :]
                p = _physical(order_ptr, s, k, k_mask, C, LU)
                v = _tile(mid_s, rows_off, p, mask, ACC)
                dv = _tile(cur_ptr, rows_off, p, mask, ACC)
                w1_t = _first_layer_tile(params_ptr, off_w1, C1, k, k_mask, hid, hid_mask).to(ACC)
                dv += tl.dot(da1, tl.trans(w1_t), input_precision=PRECISION, out_dtype=ACC)
                _accumulate(part_ptr + off_w1 + hid[:, None] * C1 + k[None, :],
                            tl.dot(tl.trans(da1), v, input_precision=PRECISION, out_dtype=ACC),
                            hid_mask[:, None] & k_mask[None, :])
                if LU:
                    tl.store(dmid_ptr + s * slot_size + rows_off[:, None] + p[None, :], dv, mask=mask)
                else:
                    dv = _actnorm_backward(dv, v, params_ptr, meta_ptr, order_ptr, part_ptr, s, S, k, k_mask, C,
                                           dlog_det_total, logscale_factor, ACC)
                tl.store(cur_ptr + rows_off[:, None] + p[None, :], dv, mask=mask)
            tl.debug_barrier()
            if LU:
                _mix_gemm(cur_ptr, ws_ptr + (1 - slot) * slot_size, cur_ptr, rows_off, row_mask, mix_ptr,
                          _meta(meta_ptr, s, column.OFF_MIX_W), 0, CL, False, True, False, ACC, PRECISION, BLOCK_B,
                          BLOCK_MIX)
                tl.debug_barrier()
                slot = 1 - slot

        cur_ptr = ws_ptr + slot * slot_size
        for c0 in range(0, C, BLOCK_C):
            p = c0 + tl.arange(0, BLOCK_C)
            mask = row_mask[:, None] & (p < C)[None, :]
            dv = _tile(cur_ptr, rows_off, p, mask, ACC)
            tl.store(dx_ptr + rows64[:, None] * dx_sb + p.to(tl.int64)[None, :] * dx_sc,
                     dv.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----

def _workspace(batch: int, channels: int, like: torch.Tensor, slots: int) -> torch.Tensor:
    return torch.empty((slots, batch, channels), dtype=compute_dtype(like.dtype), device=like.device)


def glow_fwd(x: torch.Tensor, params: list[torch.Tensor], mix: torch.Tensor, plan, level_steps: list[int],
             level_channels: list[int], hidden: int, affine: bool, lu: bool, logscale_factor: float, save: bool):
    """(z, log_det, log_prior, mid, inp) for [B, C] x; mid [steps + 1, B, C] and inp [steps, B, C] (LU only)
    are saved for the backward, empty unless `save`. plan: flowkern.ops.glow_ops.GlowTables (meta and order are
    read here)."""
    meta, order, params = plan.meta, plan.order, _flatten_dense_tensors(list(params))
    batch, channels = x.shape
    steps = meta.shape[0]
    acc = compute_dtype(x.dtype)
    z = torch.empty_like(x, memory_format=torch.contiguous_format)
    log_det = x.new_empty(batch, dtype=acc)
    log_prior = x.new_empty(batch, dtype=acc)
    ws = _workspace(batch, channels, x, 2 if lu else 1)
    # Zeroed: the kernel writes only each level's active channels, and these are op outputs (deterministic bytes).
    mid = x.new_zeros((steps + 1, batch, channels) if save else (0,), dtype=acc)
    inp = x.new_zeros((steps, batch, channels) if save and lu else (0,), dtype=acc)
    blocks = _blocks(x.is_cuda, hidden)
    _glow_fwd_kernel[(triton.cdiv(batch, blocks["BLOCK_B"]),)](
        x, z, log_det, log_prior, _prior_constant(channels, acc, x.device), ws, mid, inp, params, mix, meta, order,
        batch, channels, steps, hidden, x.stride(0), x.stride(1), z.stride(0), z.stride(1), logscale_factor,
        AFFINE=affine, LU=lu, SAVE=save, ACC=compute_type(x.dtype), PRECISION=dot_precision(x.dtype), **blocks)
    return z, log_det, log_prior, mid, inp


def glow_inv(z: torch.Tensor, params: list[torch.Tensor], mix: torch.Tensor, plan, level_steps: list[int],
             level_channels: list[int], hidden: int, affine: bool, lu: bool, logscale_factor: float) -> torch.Tensor:
    meta, order, params = plan.meta, plan.order, _flatten_dense_tensors(list(params))
    batch, channels = z.shape
    x = torch.empty_like(z, memory_format=torch.contiguous_format)
    ws = _workspace(batch, channels, z, 2 if lu else 1)
    blocks = _blocks(z.is_cuda, hidden)
    _glow_inv_kernel[(triton.cdiv(batch, blocks["BLOCK_B"]),)](
        z, x, ws, params, mix, meta, order, batch, channels, meta.shape[0], hidden,
        z.stride(0), z.stride(1), x.stride(0), x.stride(1), logscale_factor,
        AFFINE=affine, LU=lu, ACC=compute_type(z.dtype), PRECISION=dot_precision(z.dtype), **blocks)
    return x


def glow_bwd(grad_z: torch.Tensor, grad_log_det: torch.Tensor, grad_log_prior: torch.Tensor, z: torch.Tensor,
             params: list[torch.Tensor], mix: torch.Tensor, mid: torch.Tensor, plan, level_steps: list[int],
             level_channels: list[int], hidden: int, affine: bool, lu: bool, logscale_factor: float):
    """(dx, dparams packed, dmid): LU flows' dmid [steps, B, C] is the gradient at each mixing GEMM's output
    (flowkern.ops.glow_ops.mix_gradient turns it into the mixing gradient)."""
    dz, dlog_det, dlog_prior = grad_z, grad_log_det, grad_log_prior
    meta, order, params = plan.meta, plan.order, _flatten_dense_tensors(list(params))
    batch, channels = z.shape
    steps = meta.shape[0]
    acc = compute_dtype(z.dtype)
    dx = torch.empty_like(z, memory_format=torch.contiguous_format)
    ws = _workspace(batch, channels, z, 2 if lu else 1)
    dmid = z.new_empty((steps, batch, channels) if lu else (0,), dtype=acc)
    blocks = _blocks(z.is_cuda, hidden, backward=True)
    tiles = triton.cdiv(batch, blocks["BLOCK_B"])
    # A persistent grid: on a GPU about two programs per SM (target_programs gives eight), so the partial-gradient
    # buffer stays [programs, parameters] however large the batch.
    programs = min(tiles, target_programs(z.device) // (4 if z.is_cuda else 1))
    partials = torch.zeros((programs, params.numel()), dtype=acc, device=z.device)
    _glow_bwd_kernel[(programs,)](
        dz, dlog_det, dlog_prior, dx, ws, mid, dmid, params, mix, meta, order, partials,
        batch, channels, steps, hidden, params.numel(), tiles, dz.stride(0), dz.stride(1), dx.stride(0),
        dx.stride(1), logscale_factor,
        AFFINE=affine, LU=lu, ACC=compute_type(z.dtype), PRECISION=dot_precision(z.dtype), **blocks)
    return dx, partials.sum(0).to(params.dtype), dmid
