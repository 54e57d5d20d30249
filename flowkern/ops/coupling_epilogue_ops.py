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
from .spec import BACKENDS, OpSpec, like, per_row


def coupling_epilogue_ref(x2, h, affine: bool):
    dtype = compute_dtype(x2.dtype)
    x2c, hc = x2.to(dtype), h.to(dtype)
    if not affine:
        return (x2c + hc).to(x2.dtype), x2c.new_zeros(x2.shape[0])
    shift, raw_scale = hc[:, 0::2], hc[:, 1::2] + 2.0
    z2 = (x2c + shift) * torch.sigmoid(raw_scale)
    log_det = F.logsigmoid(raw_scale).flatten(1).sum(1)
    return z2.to(x2.dtype), log_det


def coupling_epilogue_inverse_ref(z2, h, affine: bool):
    dtype = compute_dtype(z2.dtype)
    z2c, hc = z2.to(dtype), h.to(dtype)
    if not affine:
        return (z2c - hc).to(z2.dtype)
    x2 = z2c / torch.sigmoid(hc[:, 1::2] + 2.0) - hc[:, 0::2]
    return x2.to(z2.dtype)


def _coupling_epilogue_backward(args, grad_z2, grad_log_det):
    if not args.affine:   # the additive backward is the identity (the kernel's backward is affine only)
        return grad_z2, grad_z2.to(args.h.dtype)
    return COUPLING_EPILOGUE_BWD(grad_z2, grad_log_det, args.x2, args.h, impl=args.impl)


def _coupling_epilogue_inv_backward(args, grad_x2):
    # The inverse is the sampling path and rarely differentiated, so its backward is plain torch ops:
    # x2 = z2 * (1 + exp(-raw)) - shift with raw = h[:, 1::2] + 2.
    z2, h = args.z2, args.h
    if not args.affine:
        return grad_x2, (-grad_x2).to(h.dtype)
    dtype = compute_dtype(z2.dtype)
    grad_x2c = grad_x2.to(dtype)
    exp_neg_raw = torch.exp(-(h[:, 1::2].to(dtype) + 2.0))
    grad_z2 = grad_x2c * (1.0 + exp_neg_raw)
    grad_raw = -grad_x2c * z2.to(dtype) * exp_neg_raw
    grad_h = torch.stack([-grad_x2c, grad_raw], dim=2).flatten(1, 2)   # back to interleaved shift/scale channels
    return grad_z2.to(z2.dtype), grad_h.to(h.dtype)


COUPLING_EPILOGUE_BWD = OpSpec(   # affine only
    "coupling_epilogue_bwd", "coupling_epilogue",
    (("grad_z2", torch.Tensor), ("grad_log_det", torch.Tensor), ("x2", torch.Tensor), ("h", torch.Tensor)),
    lambda grad_z2, grad_log_det, x2, h: (like(x2), like(h)), "(Tensor, Tensor)")
COUPLING_EPILOGUE_FWD = OpSpec(
    "coupling_epilogue_fwd", "coupling_epilogue", (("x2", torch.Tensor), ("h", torch.Tensor), ("affine", bool)),
    lambda x2, h, affine: (like(x2), per_row(x2)), "(Tensor, Tensor)",
    differentiable=("x2", "h"), backward=_coupling_epilogue_backward)
COUPLING_EPILOGUE_INV = OpSpec(
    "coupling_epilogue_inv", "coupling_epilogue", (("z2", torch.Tensor), ("h", torch.Tensor), ("affine", bool)),
    lambda z2, h, affine: like(z2), "Tensor",
    differentiable=("z2", "h"), backward=_coupling_epilogue_inv_backward)


def coupling_epilogue(x2: torch.Tensor, h: torch.Tensor, affine: bool):
    """Returns (z2, log_det[B])."""
    impl = backend.resolve(x2, "coupling_epilogue", BACKENDS)
    if impl == "torch":
        return coupling_epilogue_ref(x2, h, affine)
    return COUPLING_EPILOGUE_FWD(x2, h, bool(affine), impl=impl)


def coupling_epilogue_inverse(z2: torch.Tensor, h: torch.Tensor, affine: bool):
    impl = backend.resolve(z2, "coupling_epilogue_inverse", BACKENDS)
    if impl == "torch":
        return coupling_epilogue_inverse_ref(z2, h, affine)
    return COUPLING_EPILOGUE_INV(z2, h, bool(affine), impl=impl)
