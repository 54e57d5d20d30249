"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from the extension flowkern._C.

flowkern._C registers its kernels as torch ops `torch.ops.flowkern_C.<op>` (csrc/bindings.cpp: one schema, a CPU
and a CUDA implementation) with the same names and arguments as the Triton launchers in flowkern/kernels/triton/,
so the dispatcher (flowkern.backend.kernels) hands either module to the autograd-visible ops `flowkern::<op>`
unchanged. The fake (meta) kernels below let torch.compile and torch.library.opcheck trace the compiled ops.
Importing this module fails with ImportError when the extension was not built.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers the flowkern_C ops)
from .._checks import compute_dtype

has_cuda: bool = _C.has_cuda

_ops = torch.ops.flowkern_C

actnorm_fwd = _ops.actnorm_fwd
actnorm_inv = _ops.actnorm_inv
actnorm_bwd = _ops.actnorm_bwd
coupling_fwd = _ops.coupling_fwd
coupling_inv = _ops.coupling_inv
coupling_bwd = _ops.coupling_bwd
gaussian_log_prob_fwd = _ops.gaussian_log_prob_fwd
gaussian_log_prob_bwd = _ops.gaussian_log_prob_bwd
lu_weight_fwd = _ops.lu_weight_fwd
lu_weight_bwd = _ops.lu_weight_bwd
invconv_fwd = _ops.invconv_fwd
invconv_bwd = _ops.invconv_bwd
actnorm_invconv_fwd = _ops.actnorm_invconv_fwd
actnorm_invconv_bwd = _ops.actnorm_invconv_bwd
mlp_coupling_fwd = _ops.mlp_coupling_fwd
mlp_coupling_inv = _ops.mlp_coupling_inv
mlp_coupling_bwd = _ops.mlp_coupling_bwd
mlp_coupling_inv_bwd = _ops.mlp_coupling_inv_bwd
glow_fwd = _ops.glow_fwd
glow_inv = _ops.glow_inv
glow_bwd = _ops.glow_bwd


def _rows_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _per_row(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


def _fake(name: str):
    return torch.library.register_fake(f"flowkern_C::{name}")


@_fake("actnorm_fwd")
def _(x, bias, logs, logscale_factor):
    return _rows_like(x), _per_row(x)


@_fake("actnorm_inv")
def _(y, bias, logs, logscale_factor):
    return _rows_like(y)


@_fake("actnorm_bwd")
def _(grad_y, grad_log_det, x, bias, logs, logscale_factor):
    return _rows_like(x), torch.empty_like(bias), torch.empty_like(logs)


@_fake("coupling_fwd")
def _(x2, h, affine):
    return _rows_like(x2), _per_row(x2)


@_fake("coupling_inv")
def _(z2, h, affine):
    return _rows_like(z2)


@_fake("coupling_bwd")
def _(grad_z2, grad_log_det, x2, h):
    return _rows_like(x2), _rows_like(h)


@_fake("gaussian_log_prob_fwd")
def _(z):
    return _per_row(z)


@_fake("gaussian_log_prob_bwd")
def _(grad_log_prob, z):
    return _rows_like(z)


@_fake("lu_weight_fwd")
def _(perm, lower, upper, sign_s, log_s):
    return lower.new_empty(lower.shape), log_s.new_empty(())


@_fake("lu_weight_bwd")
def _(grad_weight, grad_log_det, perm, lower, upper, sign_s, log_s):
    return lower.new_empty(lower.shape), upper.new_empty(upper.shape), torch.empty_like(log_s)


def _invconv_out(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)   # the binding keeps x's memory format (channels-last images stay so)


@_fake("invconv_fwd")
def _(x, weight):
    return _invconv_out(x)


@_fake("invconv_bwd")
def _(grad_y, x, weight):
    return _invconv_out(x), torch.empty_like(weight)


@_fake("actnorm_invconv_fwd")
def _(x, bias, logs, logscale_factor, weight):
    return _invconv_out(x)


@_fake("actnorm_invconv_bwd")
def _(grad_y, x, bias, logs, logscale_factor, weight):
    return _invconv_out(x), torch.empty_like(bias), torch.empty_like(logs), torch.empty_like(weight)


@_fake("mlp_coupling_fwd")
def _(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor):
    return _rows_like(x2), _per_row(x2)


@_fake("mlp_coupling_inv")
def _(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor):
    return _rows_like(z2)


def _mlp_grads(x1, other, params):
    return [_rows_like(x1), _rows_like(other)] + [torch.empty_like(p) for p in params]


@_fake("mlp_coupling_bwd")
def _(grad_z2, grad_log_det, x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor):
    return _mlp_grads(x1, x2, (w1, b1, l1, w2, b2, l2, w3, b3, l3))


@_fake("mlp_coupling_inv_bwd")
def _(grad_x2, x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor):
    return _mlp_grads(x1, z2, (w1, b1, l1, w2, b2, l2, w3, b3, l3))


@_fake("glow_fwd")
def _(x, params, mix, meta, an_idx, cp_idx, z_idx, hidden, affine, lu, logscale_factor, save):
    acc = compute_dtype(x.dtype)
    batch, channels = x.shape
    steps = meta.shape[0]
    return (_rows_like(x), _per_row(x), _per_row(x),
            x.new_empty((steps + 1, batch, channels) if save else (0,), dtype=acc),
            x.new_empty((steps, batch, channels) if save and lu else (0,), dtype=acc))


@_fake("glow_inv")
def _(z, params, mix, meta, an_idx, cp_idx, z_idx, hidden, affine, lu, logscale_factor):
    return _rows_like(z)


@_fake("glow_bwd")
def _(grad_z, grad_log_det, grad_log_prior, z, params, mix, mid, inp, meta, an_idx, cp_idx, z_idx, level_steps,
      level_channels, hidden, affine, lu, logscale_factor):
    return _rows_like(z), torch.empty_like(params), torch.empty_like(mix)
