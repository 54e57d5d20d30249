"""ActNorm: y = (x + bias) * exp(logscale_factor * logs), per channel; log_det = f * sum(logs) * H * W."""
from __future__ import annotations

import torch

from .. import backend
from .._checks import compute_dtype
from .spec import BACKENDS, OpSpec, like, per_row


def _per_channel(v: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view((1, -1) + (1,) * (x.dim() - 2))


def _pixels(x: torch.Tensor) -> int:
    return x[0, 0].numel()


def actnorm_ref(x, bias, logs, logscale_factor):
    dtype = compute_dtype(x.dtype)
    scaled_logs = logscale_factor * logs.to(dtype)
    y = (x.to(dtype) + _per_channel(bias, x, dtype)) * _per_channel(scaled_logs.exp(), x, dtype)
    log_det = (scaled_logs.sum() * _pixels(x)).expand(x.shape[0]).contiguous()
    return y.to(x.dtype), log_det


def actnorm_inverse_ref(y, bias, logs, logscale_factor):
    dtype = compute_dtype(y.dtype)
    inv_scale = torch.exp(-logscale_factor * logs.to(dtype))
    x = y.to(dtype) * _per_channel(inv_scale, y, dtype) - _per_channel(bias, y, dtype)
    return x.to(y.dtype)


def _actnorm_inv_backward(args, grad_x):
    # The inverse is the sampling path and rarely differentiated, so its backward is plain torch ops:
    # x = y * r - bias with r = exp(-f * logs).
    y, logs, f = args.y, args.logs, args.logscale_factor
    dtype = compute_dtype(y.dtype)
    inv_scale = _per_channel(torch.exp(-f * logs.to(dtype)), y, dtype)
    grad_x = grad_x.to(dtype)
    grad_y_scaled = grad_x * inv_scale
    non_channel_dims = [0] + list(range(2, y.dim()))
    grad_bias = -grad_x.sum(non_channel_dims)
    grad_logs = -f * (grad_y_scaled * y.to(dtype)).sum(non_channel_dims)
    return grad_y_scaled.to(y.dtype), grad_bias.to(args.bias.dtype), grad_logs.to(logs.dtype)


_ARGS = (("bias", torch.Tensor), ("logs", torch.Tensor), ("logscale_factor", float))
ACTNORM_BWD = OpSpec(
    "actnorm_bwd", "actnorm",
    (("grad_y", torch.Tensor), ("grad_log_det", torch.Tensor), ("x", torch.Tensor)) + _ARGS,
    lambda grad_y, grad_log_det, x, bias, logs, f: (like(x), like(bias), like(logs)), "(Tensor, Tensor, Tensor)")
ACTNORM_FWD = OpSpec(
    "actnorm_fwd", "actnorm", (("x", torch.Tensor),) + _ARGS,
    lambda x, bias, logs, f: (like(x), per_row(x)), "(Tensor, Tensor)",
    differentiable=("x", "bias", "logs"), backward=ACTNORM_BWD)
ACTNORM_INV = OpSpec(
    "actnorm_inv", "actnorm", (("y", torch.Tensor),) + _ARGS,
    lambda y, bias, logs, f: like(y), "Tensor",
    differentiable=("y", "bias", "logs"), backward=_actnorm_inv_backward)


def actnorm(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float = 3.0):
    """Returns (y, log_det[B])."""
    impl = backend.resolve(x, "actnorm", BACKENDS)
    if impl == "torch":
        return actnorm_ref(x, bias, logs, logscale_factor)
    return ACTNORM_FWD(x, bias, logs, float(logscale_factor), impl=impl)


def actnorm_inverse(y: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float = 3.0):
    impl = backend.resolve(y, "actnorm_inverse", BACKENDS)
    if impl == "torch":
        return actnorm_inverse_ref(y, bias, logs, logscale_factor)
    return ACTNORM_INV(y, bias, logs, float(logscale_factor), impl=impl)
