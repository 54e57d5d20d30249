"""Coupling epilogue: given the untouched half's subnet output h, transform the other half x2.

additive: z2 = x2 + h, log_det = 0.
affine (as in Glow / BERT-flow): shift = h[:, 0::2], scale = sigmoid(h[:, 1::2] + 2),
z2 = (x2 + shift) * scale, log_det = sum log(scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from .._checks import compute_dtype


def coupling_ref(x2, h, affine: bool):
    dtype = compute_dtype(x2.dtype)
    x2c, hc = x2.to(dtype), h.to(dtype)
    if not affine:
        return (x2c + hc).to(x2.dtype), x2c.new_zeros(x2.shape[0])
    shift, raw_scale = hc[:, 0::2], hc[:, 1::2] + 2.0
    z2 = (x2c + shift) * torch.sigmoid(raw_scale)
    log_det = F.logsigmoid(raw_scale).flatten(1).sum(1)
    return z2.to(x2.dtype), log_det


def coupling_inverse_ref(z2, h, affine: bool):
    dtype = compute_dtype(z2.dtype)
    z2c, hc = z2.to(dtype), h.to(dtype)
    if not affine:
        return (z2c - hc).to(z2.dtype)
    x2 = z2c / torch.sigmoid(hc[:, 1::2] + 2.0) - hc[:, 0::2]
    return x2.to(z2.dtype)


_KERNEL_BACKENDS = ("triton", "cuda", "cpp")


@torch.library.custom_op("flowkern::coupling_fwd", mutates_args=())
def _coupling_fwd(x2: torch.Tensor, h: torch.Tensor, affine: bool,
                  impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "coupling").coupling_fwd(x2, h, affine)


@_coupling_fwd.register_fake
def _(x2, h, affine, impl):
    return x2.new_empty(x2.shape), x2.new_empty(x2.shape[0], dtype=compute_dtype(x2.dtype))


@torch.library.custom_op("flowkern::coupling_bwd", mutates_args=())
def _coupling_bwd(grad_z2: torch.Tensor, grad_log_det: torch.Tensor, x2: torch.Tensor, h: torch.Tensor,
                  impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine only: the additive backward is the identity."""
    return backend.kernels(impl, "coupling").coupling_bwd(grad_z2, grad_log_det, x2, h)


@_coupling_bwd.register_fake
def _(grad_z2, grad_log_det, x2, h, impl):
    return x2.new_empty(x2.shape), h.new_empty(h.shape)


def _coupling_setup_context(ctx, inputs, output):
    x2, h, affine, impl = inputs
    if affine:
        ctx.save_for_backward(x2, h)
    ctx.affine, ctx.impl, ctx.h_dtype = affine, impl, h.dtype


def _coupling_backward(ctx, grad_z2, grad_log_det):
    if not ctx.affine:
        return grad_z2, grad_z2.to(ctx.h_dtype), None, None
    x2, h = ctx.saved_tensors
    grad_x2, grad_h = _coupling_bwd(grad_z2, grad_log_det, x2, h, ctx.impl)
    return grad_x2, grad_h, None, None


_coupling_fwd.register_autograd(_coupling_backward, setup_context=_coupling_setup_context)


@torch.library.custom_op("flowkern::coupling_inv", mutates_args=())
def _coupling_inv(z2: torch.Tensor, h: torch.Tensor, affine: bool, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "coupling").coupling_inv(z2, h, affine)


@_coupling_inv.register_fake
def _(z2, h, affine, impl):
    return z2.new_empty(z2.shape)


def _coupling_inv_setup_context(ctx, inputs, output):
    z2, h, affine, impl = inputs
    ctx.save_for_backward(z2, h)
    ctx.affine = affine


def _coupling_inv_backward(ctx, grad_x2):
    # The inverse is the sampling path and rarely differentiated, so its backward is plain torch ops:
    # x2 = z2 * (1 + exp(-raw)) - shift with raw = h[:, 1::2] + 2.
    z2, h = ctx.saved_tensors
    if not ctx.affine:
        return grad_x2, (-grad_x2).to(h.dtype), None, None
    dtype = compute_dtype(z2.dtype)
    grad_x2c = grad_x2.to(dtype)
    exp_neg_raw = torch.exp(-(h[:, 1::2].to(dtype) + 2.0))
    grad_z2 = grad_x2c * (1.0 + exp_neg_raw)
    grad_raw = -grad_x2c * z2.to(dtype) * exp_neg_raw
    grad_h = torch.stack([-grad_x2c, grad_raw], dim=2).flatten(1, 2)   # back to interleaved shift/scale channels
    return grad_z2.to(z2.dtype), grad_h.to(h.dtype), None, None


_coupling_inv.register_autograd(_coupling_inv_backward, setup_context=_coupling_inv_setup_context)


def coupling(x2: torch.Tensor, h: torch.Tensor, affine: bool):
    """Returns (z2, log_det[B])."""
    impl = backend.resolve(x2, "coupling", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return coupling_ref(x2, h, affine)
    return _coupling_fwd(x2, h, bool(affine), impl)


def coupling_inverse(z2: torch.Tensor, h: torch.Tensor, affine: bool):
    impl = backend.resolve(z2, "coupling_inverse", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return coupling_inverse_ref(z2, h, affine)
    return _coupling_inv(z2, h, bool(affine), impl)
