"""The whole BERT-flow coupling on [B, C] in one kernel: MLP subnet on x1 plus the coupling epilogue on x2.

Subnet (flowkern.nn.subnets.MLPSubnet; f = logscale_factor, s_i = exp(f * logs_i)):
    pre1 = (x1 @ W1^T + b1) * s1,  h1 = relu(pre1)          W1 [H, C1]
    pre2 = (h1 @ W2^T + b2) * s2,  h2 = relu(pre2)          W2 [H, H]
    o    = (h2 @ W3^T + b3) * s3                            W3 [O, H], O = C2 (additive) or 2 * C2 (affine)
Epilogue (flowkern.ops.coupling_epilogue_ops): additive z2 = x2 + o; affine shift = o[:, 0::2], raw = o[:, 1::2] + 2,
z2 = (x2 + shift) * sigmoid(raw), log_det = sum logsigmoid(raw). Inverse: x2 = z2 - o, or
x2 = z2 * (1 + exp(-raw)) - shift (= z2 / sigmoid(raw) - shift, without a division).

Each program owns BLOCK_B rows. The hidden activations ([BLOCK_B, H], H <= 64) live in registers only: the forward
streams x1 through W1 in BLOCK_K column chunks, then streams the output channels in BLOCK_J chunks, reading x2 and
writing z2 chunk by chunk (for affine, the shift and scale rows 2j and 2j+1 of W3 are two small dots). The backward
recomputes the hidden layers instead of storing them, walks the output chunks again accumulating dh2, then goes down
through both ActNorm+ReLU layers and finally streams x1 once more for dW1 and dx1. Parameter gradients are written
as this program's fp32 partial sums ([programs, ...] buffers) and summed by torch afterwards: deterministic, no
atomics. Activations are read and written through their strides (x1, x2 are usually column slices of one x);
the tiny parameter tensors are made contiguous.

Compute is fp32 (fp64 for fp64 data); tl.dot runs IEEE for fp32/fp64 data and split TF32 ("tf32x3") for fp16/bf16
data (see kernels/triton/invconv.py: plain TF32 would degrade the fp32 log-det and parameter gradients). The hidden width must be <= 64 (ops.mlp_coupling.MAX_FUSED_HIDDEN: register tiles); the channel
counts are unbounded.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._checks import compute_dtype
from ._layout import compute_type  # importing _layout also fixes interpreter loop bounds
from .invconv import actnorm_scale, dot_precision


def _blocks(on_gpu: bool, dtype: torch.dtype, hidden: int, backward: bool) -> dict:
    hp = max(16, triton.next_power_of_2(hidden))
    if on_gpu:
        # 32 rows per program: B = 4096 gives about one program per H100 SM, with fp32 partials of moderate size.
        # The backward drops to 16 rows where ptxas for sm_90 reports register spills at 32: hidden 64 (IEEE dots
        # use FMA layouts, heavier) and fp16/bf16 data (split-TF32 dots hold three operand copies); at hidden 64 it
        # also streams 16-column chunks. The Hopper compile test bounds the remaining spills.
        low_precision = dtype in (torch.float16, torch.bfloat16)
        rows = 16 if backward and (hp == 64 or low_precision) else 32
        chunk = 16 if backward and hp == 64 else 32
        return dict(BLOCK_B=rows, BLOCK_K=chunk, BLOCK_J=16 if backward else 32, HP=hp, num_warps=8)
    # Interpreter: each program costs ~ms, so wide column chunks; 16-row blocks so small batches still span
    # several programs (exercising the partial sums and the padded last block).
    return dict(BLOCK_B=16, BLOCK_K=64, BLOCK_J=64, HP=hp)


@triton.jit
def _first_layer(x1_ptr, x1_sb, x1_sc, rows, row_mask, C1, HID, w1_ptr, b1_ptr, l1_ptr, logscale_factor,
                 ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                 HP: tl.constexpr):
    """pre1 = (x1 @ W1^T + b1) * s1, [BLOCK_B, HP], streaming x1 and W1 in BLOCK_K column chunks."""
    hid = tl.arange(0, HP)
    hid_mask = hid < HID
    a1 = tl.zeros((BLOCK_B, HP), dtype=ACC)
    x1_rows = rows.to(tl.int64) * x1_sb
    for k0 in range(0, C1, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < C1
        x1 = tl.load(x1_ptr + x1_rows[:, None] + k.to(tl.int64)[None, :] * x1_sc, mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0).to(ACC)
        w1_t = tl.load(w1_ptr + hid[None, :] * C1 + k[:, None], mask=hid_mask[None, :] & k_mask[:, None],
                       other=0.0).to(ACC)
        a1 = tl.dot(x1, w1_t, a1, input_precision=PRECISION, out_dtype=ACC)
    b1, s1 = actnorm_scale(b1_ptr, l1_ptr, hid, hid_mask, logscale_factor, ACC)
    return (a1 + b1[None, :]) * s1[None, :]


@triton.jit
def _second_layer(pre1, HID, w2_ptr, b2_ptr, l2_ptr, logscale_factor, ACC: tl.constexpr, PRECISION: tl.constexpr,
                  HP: tl.constexpr):
    """pre2 = (relu(pre1) @ W2^T + b2) * s2, [BLOCK_B, HP]."""
    hid = tl.arange(0, HP)
    hid_mask = hid < HID
    w2_t = tl.load(w2_ptr + hid[None, :] * HID + hid[:, None], mask=hid_mask[None, :] & hid_mask[:, None],
                   other=0.0).to(ACC)
    a2 = tl.dot(tl.maximum(pre1, 0.0), w2_t, input_precision=PRECISION, out_dtype=ACC)
    b2, s2 = actnorm_scale(b2_ptr, l2_ptr, hid, hid_mask, logscale_factor, ACC)
    return (a2 + b2[None, :]) * s2[None, :]


@triton.jit
def _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, out_idx, out_mask, HID, logscale_factor,
                  ACC: tl.constexpr, PRECISION: tl.constexpr, HP: tl.constexpr):
    """(o, W3^T tile, s3) for output channels out_idx: o = (h2 @ W3[out_idx]^T + b3) * s3, [BLOCK_B, BLOCK_J]."""
    hid = tl.arange(0, HP)
    w3_t = tl.load(w3_ptr + out_idx[None, :] * HID + hid[:, None], mask=out_mask[None, :] & (hid < HID)[:, None],
                   other=0.0).to(ACC)
    b3, s3 = actnorm_scale(b3_ptr, l3_ptr, out_idx, out_mask, logscale_factor, ACC)
    o = (tl.dot(h2, w3_t, input_precision=PRECISION, out_dtype=ACC) + b3[None, :]) * s3[None, :]
    return o, w3_t, s3


@triton.jit
def _output_layer_backward(do, o, h2, w3_t, s3, out_idx, out_mask, HID, OUT, pid, dw3_part_ptr, db3_part_ptr,
                           dl3_part_ptr, logscale_factor, ACC: tl.constexpr, PRECISION: tl.constexpr,
                           HP: tl.constexpr):
    """Stores this program's partial dW3, db3, dlogs3 for out_idx; returns the contribution to dh2."""
    hid = tl.arange(0, HP)
    dg = do * s3[None, :]
    tl.store(db3_part_ptr + pid * OUT + out_idx, tl.sum(dg, axis=0), mask=out_mask)
    tl.store(dl3_part_ptr + pid * OUT + out_idx, logscale_factor * tl.sum(do * o, axis=0), mask=out_mask)
    dw3 = tl.dot(tl.trans(dg), h2, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dw3_part_ptr + pid.to(tl.int64) * OUT * HID + out_idx[:, None] * HID + hid[None, :], dw3,
             mask=out_mask[:, None] & (hid < HID)[None, :])
    return tl.dot(dg, tl.trans(w3_t), input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _mlp_coupling_kernel(x1_ptr, in2_ptr, out2_ptr, log_det_ptr,
                         w1_ptr, b1_ptr, l1_ptr, w2_ptr, b2_ptr, l2_ptr, w3_ptr, b3_ptr, l3_ptr,
                         B, C1, C2, HID, x1_sb, x1_sc, in2_sb, in2_sc, out2_sb, out2_sc, logscale_factor,
                         AFFINE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, HP: tl.constexpr):
    """Forward: out2 = z2 from in2 = x2, and log_det. INVERSE: out2 = x2 from in2 = z2 (no log_det)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    pre1 = _first_layer(x1_ptr, x1_sb, x1_sc, rows, row_mask, C1, HID, w1_ptr, b1_ptr, l1_ptr, logscale_factor,
                        ACC, PRECISION, BLOCK_B, BLOCK_K, HP)
    h2 = tl.maximum(_second_layer(pre1, HID, w2_ptr, b2_ptr, l2_ptr, logscale_factor, ACC, PRECISION, HP), 0.0)
    log_det = tl.zeros((BLOCK_B,), dtype=ACC)
    in2_rows, out2_rows = rows.to(tl.int64) * in2_sb, rows.to(tl.int64) * out2_sb
    for j0 in range(0, C2, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_mask = j < C2
        mask = row_mask[:, None] & j_mask[None, :]
        v = tl.load(in2_ptr + in2_rows[:, None] + j.to(tl.int64)[None, :] * in2_sc, mask=mask, other=0.0).to(ACC)
        if AFFINE:
            shift, _, _ = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, 2 * j, j_mask, HID, logscale_factor,
                                        ACC, PRECISION, HP)
            raw, _, _ = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, 2 * j + 1, j_mask, HID, logscale_factor,
                                      ACC, PRECISION, HP)
            raw += 2.0
            if INVERSE:
                out = v * (1.0 + tl.exp(-raw)) - shift
            else:
                out = (v + shift) * tl.sigmoid(raw)
                log_det += tl.sum(tl.where(mask, _log_sigmoid(raw), 0.0), axis=1)
        else:
            o, _, _ = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, j, j_mask, HID, logscale_factor, ACC, PRECISION, HP)
            if INVERSE:
                out = v - o
            else:
                out = v + o
        tl.store(out2_ptr + out2_rows[:, None] + j.to(tl.int64)[None, :] * out2_sc, out.to(out2_ptr.dtype.element_ty), mask=mask)
    if not INVERSE:
        tl.store(log_det_ptr + rows, log_det.to(log_det_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _mlp_coupling_bwd_kernel(dout_ptr, dlog_det_ptr, x1_ptr, in2_ptr, din2_ptr, dx1_ptr,
                             w1_ptr, b1_ptr, l1_ptr, w2_ptr, b2_ptr, l2_ptr, w3_ptr, b3_ptr, l3_ptr,
                             dw1_part_ptr, db1_part_ptr, dl1_part_ptr, dw2_part_ptr, db2_part_ptr, dl2_part_ptr,
                             dw3_part_ptr, db3_part_ptr, dl3_part_ptr,
                             B, C1, C2, HID, OUT, dout_sb, dout_sc, dlog_det_s, x1_sb, x1_sc, in2_sb, in2_sc,
                             din2_sb, din2_sc, dx1_sb, dx1_sc, logscale_factor,
                             AFFINE: tl.constexpr, INVERSE: tl.constexpr, ACC: tl.constexpr,
                             PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_J: tl.constexpr, HP: tl.constexpr):
    """Backward of _mlp_coupling_kernel (either direction) given dout = d(out2) and, forward affine, d(log_det):
    writes d(in2), dx1 (through the subnet only) and this program's partial parameter gradients."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    hid = tl.arange(0, HP)
    hid_mask = hid < HID
    pre1 = _first_layer(x1_ptr, x1_sb, x1_sc, rows, row_mask, C1, HID, w1_ptr, b1_ptr, l1_ptr, logscale_factor,
                        ACC, PRECISION, BLOCK_B, BLOCK_K, HP)
    pre2 = _second_layer(pre1, HID, w2_ptr, b2_ptr, l2_ptr, logscale_factor, ACC, PRECISION, HP)
    h1, h2 = tl.maximum(pre1, 0.0), tl.maximum(pre2, 0.0)
    if AFFINE and not INVERSE:
        dlog_det = tl.load(dlog_det_ptr + rows.to(tl.int64) * dlog_det_s, mask=row_mask, other=0.0).to(ACC)

    # Output layer and epilogue, chunk by chunk of x2's channels.
    dh2 = tl.zeros((BLOCK_B, HP), dtype=ACC)
    dout_rows, in2_rows, din2_rows = (rows.to(tl.int64) * dout_sb, rows.to(tl.int64) * in2_sb,
                                      rows.to(tl.int64) * din2_sb)
    for j0 in range(0, C2, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_mask = j < C2
        mask = row_mask[:, None] & j_mask[None, :]
        dout = tl.load(dout_ptr + dout_rows[:, None] + j.to(tl.int64)[None, :] * dout_sc, mask=mask, other=0.0).to(ACC)
        v = tl.load(in2_ptr + in2_rows[:, None] + j.to(tl.int64)[None, :] * in2_sc, mask=mask, other=0.0).to(ACC)
        if AFFINE:
            shift, w3s_t, s3s = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, 2 * j, j_mask, HID, logscale_factor,
                                              ACC, PRECISION, HP)
            raw_out, w3r_t, s3r = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, 2 * j + 1, j_mask, HID,
                                                logscale_factor, ACC, PRECISION, HP)
            raw = raw_out + 2.0
            if INVERSE:  # x2 = z2 * (1 + e) - shift, e = exp(-raw)
                e = tl.exp(-raw)
                din2 = dout * (1.0 + e)
                dshift = -dout
                draw = -dout * v * e
            else:  # z2 = (x2 + shift) * sigma, log_det += log(sigma), d log(sigma) / d raw = 1 - sigma
                sigma = tl.sigmoid(raw)
                din2 = dout * sigma
                dshift = din2
                draw = (dout * (v + shift) * sigma + dlog_det[:, None]) * (1.0 - sigma)
            draw = tl.where(mask, draw, 0.0)
            dh2 += _output_layer_backward(dshift, shift, h2, w3s_t, s3s, 2 * j, j_mask, HID, OUT, pid,
                                          dw3_part_ptr, db3_part_ptr, dl3_part_ptr, logscale_factor,
                                          ACC, PRECISION, HP)
            dh2 += _output_layer_backward(draw, raw_out, h2, w3r_t, s3r, 2 * j + 1, j_mask, HID, OUT, pid,
                                          dw3_part_ptr, db3_part_ptr, dl3_part_ptr, logscale_factor,
                                          ACC, PRECISION, HP)
        else:
            o, w3_t, s3 = _output_layer(h2, w3_ptr, b3_ptr, l3_ptr, j, j_mask, HID, logscale_factor,
                                        ACC, PRECISION, HP)
            din2 = dout
            if INVERSE:
                do = -dout
            else:
                do = dout
            dh2 += _output_layer_backward(do, o, h2, w3_t, s3, j, j_mask, HID, OUT, pid,
                                          dw3_part_ptr, db3_part_ptr, dl3_part_ptr, logscale_factor,
                                          ACC, PRECISION, HP)
        tl.store(din2_ptr + din2_rows[:, None] + j.to(tl.int64)[None, :] * din2_sc, din2.to(din2_ptr.dtype.element_ty),
                 mask=mask)

    # Second hidden layer: ReLU, ActNorm, W2.
    dpre2 = tl.where(pre2 > 0.0, dh2, 0.0)
    _, s2 = actnorm_scale(b2_ptr, l2_ptr, hid, hid_mask, logscale_factor, ACC)
    tl.store(db2_part_ptr + pid * HID + hid, tl.sum(dpre2 * s2[None, :], axis=0), mask=hid_mask)
    tl.store(dl2_part_ptr + pid * HID + hid, logscale_factor * tl.sum(dpre2 * pre2, axis=0), mask=hid_mask)
    da2 = dpre2 * s2[None, :]
    hid_2d = hid_mask[:, None] & hid_mask[None, :]
    dw2 = tl.dot(tl.trans(da2), h1, input_precision=PRECISION, out_dtype=ACC)
    tl.store(dw2_part_ptr + pid.to(tl.int64) * HID * HID + hid[:, None] * HID + hid[None, :], dw2, mask=hid_2d)
    w2 = tl.load(w2_ptr + hid[:, None] * HID + hid[None, :], mask=hid_2d, other=0.0).to(ACC)
    dh1 = tl.dot(da2, w2, input_precision=PRECISION, out_dtype=ACC)

    # First hidden layer: ReLU, ActNorm, then W1 and x1, chunk by chunk of x1's channels.
    dpre1 = tl.where(pre1 > 0.0, dh1, 0.0)
    _, s1 = actnorm_scale(b1_ptr, l1_ptr, hid, hid_mask, logscale_factor, ACC)
    tl.store(db1_part_ptr + pid * HID + hid, tl.sum(dpre1 * s1[None, :], axis=0), mask=hid_mask)
    tl.store(dl1_part_ptr + pid * HID + hid, logscale_factor * tl.sum(dpre1 * pre1, axis=0), mask=hid_mask)
    da1 = dpre1 * s1[None, :]
    da1_t = tl.trans(da1)
    x1_rows, dx1_rows = rows.to(tl.int64) * x1_sb, rows.to(tl.int64) * dx1_sb
    for k0 in range(0, C1, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < C1
        x1 = tl.load(x1_ptr + x1_rows[:, None] + k.to(tl.int64)[None, :] * x1_sc, mask=row_mask[:, None] & k_mask[None, :],
                     other=0.0).to(ACC)
        w_mask = hid_mask[:, None] & k_mask[None, :]
        dw1 = tl.dot(da1_t, x1, input_precision=PRECISION, out_dtype=ACC)
        tl.store(dw1_part_ptr + pid.to(tl.int64) * HID * C1 + hid[:, None] * C1 + k[None, :], dw1, mask=w_mask)
        w1 = tl.load(w1_ptr + hid[:, None] * C1 + k[None, :], mask=w_mask, other=0.0).to(ACC)
        dx1 = tl.dot(da1, w1, input_precision=PRECISION, out_dtype=ACC)
        tl.store(dx1_ptr + dx1_rows[:, None] + k.to(tl.int64)[None, :] * dx1_sc, dx1.to(dx1_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & k_mask[None, :])


def _contiguous_params(mlp):
    return type(mlp)(*(p.contiguous() for p in mlp))


def _run_forward(x1: torch.Tensor, in2: torch.Tensor, params, affine: bool, logscale_factor: float,
                 inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    params = _contiguous_params(params)
    batch, c1 = x1.shape
    c2, hidden = in2.shape[1], params.w1.shape[0]
    out2 = torch.empty_like(in2)
    log_det = None if inverse else in2.new_empty(batch, dtype=compute_dtype(in2.dtype))
    blocks = _blocks(in2.is_cuda, in2.dtype, hidden, backward=False)
    _mlp_coupling_kernel[(triton.cdiv(batch, blocks["BLOCK_B"]),)](
        x1, in2, out2, out2 if log_det is None else log_det, *params,
        batch, c1, c2, hidden, x1.stride(0), x1.stride(1), in2.stride(0), in2.stride(1),
        out2.stride(0), out2.stride(1), logscale_factor, AFFINE=affine, INVERSE=inverse,
        ACC=compute_type(in2.dtype), PRECISION=dot_precision(in2.dtype), **blocks)
    return out2, log_det


def _run_backward(dout: torch.Tensor, dlog_det: torch.Tensor | None, x1: torch.Tensor, in2: torch.Tensor, params,
                  affine: bool, logscale_factor: float, inverse: bool):
    contiguous = _contiguous_params(params)
    batch, c1 = x1.shape
    c2, hidden, outputs = in2.shape[1], params.w1.shape[0], params.w3.shape[0]
    blocks = _blocks(in2.is_cuda, in2.dtype, hidden, backward=True)
    programs = triton.cdiv(batch, blocks["BLOCK_B"])
    din2, dx1 = torch.empty_like(in2), torch.empty_like(x1)
    part_dtype = compute_dtype(in2.dtype)
    partials = [x1.new_empty((programs,) + p.shape, dtype=part_dtype) for p in contiguous]
    _mlp_coupling_bwd_kernel[(programs,)](
        dout, dout if dlog_det is None else dlog_det, x1, in2, din2, dx1, *contiguous, *partials,
        batch, c1, c2, hidden, outputs, dout.stride(0), dout.stride(1), 0 if dlog_det is None else dlog_det.stride(0),
        x1.stride(0), x1.stride(1), in2.stride(0), in2.stride(1), din2.stride(0), din2.stride(1),
        dx1.stride(0), dx1.stride(1), logscale_factor, AFFINE=affine, INVERSE=inverse, ACC=compute_type(in2.dtype),
        PRECISION=dot_precision(in2.dtype), **blocks)
    param_grads = [part.sum(0).to(p.dtype) for part, p in zip(partials, params)]
    return dx1, din2, *param_grads


def mlp_coupling_fwd(x1: torch.Tensor, x2: torch.Tensor, mlp, affine: bool,
                     logscale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z2, log_det[B]) of the coupling with the MLP subnet's parameters `mlp` (flowkern.ops.spec.MlpParams)."""
    return _run_forward(x1, x2, mlp, affine, logscale_factor, inverse=False)


def mlp_coupling_bwd(grad_z2: torch.Tensor, grad_log_det: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, mlp,
                     affine: bool, logscale_factor: float) -> tuple[torch.Tensor, ...]:
    """(dx1 through the subnet, dx2, then one gradient per member of mlp)."""
    return _run_backward(grad_z2, grad_log_det, x1, x2, mlp, affine, logscale_factor, inverse=False)


def mlp_coupling_inv(x1: torch.Tensor, z2: torch.Tensor, mlp, affine: bool, logscale_factor: float) -> torch.Tensor:
    """x2 from z2 (x1 passes through the coupling unchanged, so the subnet sees the same input)."""
    x2, _ = _run_forward(x1, z2, mlp, affine, logscale_factor, inverse=True)
    return x2


def mlp_coupling_inv_bwd(grad_x2: torch.Tensor, x1: torch.Tensor, z2: torch.Tensor, mlp, affine: bool,
                         logscale_factor: float) -> tuple[torch.Tensor, ...]:
    """(dx1 through the subnet, dz2, then one gradient per member of mlp) of mlp_coupling_inv."""
    return _run_backward(grad_x2, None, x1, z2, mlp, affine, logscale_factor, inverse=True)
