"""ActNorm: y = (x + bias) * exp(logscale_factor * logs), per channel; log_det = f * sum(logs) * H * W."""
from __future__ import annotations

import torch

from .. import backend
from .._checks import compute_dtype


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


_KERNEL_BACKENDS = ("triton", "cuda", "cpp")


@torch.library.custom_op("flowkern::actnorm_fwd", mutates_args=())
def _actnorm_fwd(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "actnorm").actnorm_fwd(x, bias, logs, logscale_factor)


@_actnorm_fwd.register_fake
def _(x, bias, logs, logscale_factor, impl):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("flowkern::actnorm_bwd", mutates_args=())
def _actnorm_bwd(grad_y: torch.Tensor, grad_log_det: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                 logs: torch.Tensor, logscale_factor: float,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "actnorm").actnorm_bwd(grad_y, grad_log_det, x, bias, logs, logscale_factor)


@_actnorm_bwd.register_fake
def _(grad_y, grad_log_det, x, bias, logs, logscale_factor, impl):
    return x.new_empty(x.shape), bias.new_empty(bias.shape), logs.new_empty(logs.shape)


def _actnorm_setup_context(ctx, inputs, output):
    x, bias, logs, logscale_factor, impl = inputs
    ctx.save_for_backward(x, bias, logs)
    ctx.logscale_factor, ctx.impl = logscale_factor, impl


def _actnorm_backward(ctx, grad_y, grad_log_det):
    x, bias, logs = ctx.saved_tensors
    grads = _actnorm_bwd(grad_y, grad_log_det, x, bias, logs, ctx.logscale_factor, ctx.impl)
    return *grads, None, None


_actnorm_fwd.register_autograd(_actnorm_backward, setup_context=_actnorm_setup_context)


@torch.library.custom_op("flowkern::actnorm_inv", mutates_args=())
def _actnorm_inv(y: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                 impl: str) -> torch.Tensor:
    return backend.kernels(impl, "actnorm").actnorm_inv(y, bias, logs, logscale_factor)


@_actnorm_inv.register_fake
def _(y, bias, logs, logscale_factor, impl):
    return y.new_empty(y.shape)


def _actnorm_inv_setup_context(ctx, inputs, output):
    y, bias, logs, logscale_factor, impl = inputs
    ctx.save_for_backward(y, logs)
    ctx.logscale_factor, ctx.bias_dtype = logscale_factor, bias.dtype


def _actnorm_inv_backward(ctx, grad_x):
    # The inverse is the sampling path and rarely differentiated, so its backward is plain torch ops:
    # x = y * r - bias with r = exp(-f * logs).
    y, logs = ctx.saved_tensors
    dtype = compute_dtype(y.dtype)
    inv_scale = _per_channel(torch.exp(-ctx.logscale_factor * logs.to(dtype)), y, dtype)
    grad_x = grad_x.to(dtype)
    grad_y_scaled = grad_x * inv_scale
    non_channel_dims = [0] + list(range(2, y.dim()))
    grad_bias = -grad_x.sum(non_channel_dims)
    grad_logs = -ctx.logscale_factor * (grad_y_scaled * y.to(dtype)).sum(non_channel_dims)
    return grad_y_scaled.to(y.dtype), grad_bias.to(ctx.bias_dtype), grad_logs.to(logs.dtype), None, None


_actnorm_inv.register_autograd(_actnorm_inv_backward, setup_context=_actnorm_inv_setup_context)


def actnorm(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float = 3.0):
    """Returns (y, log_det[B])."""
    impl = backend.resolve(x, "actnorm", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return actnorm_ref(x, bias, logs, logscale_factor)
    return _actnorm_fwd(x, bias, logs, float(logscale_factor), impl)


def actnorm_inverse(y: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float = 3.0):
    impl = backend.resolve(y, "actnorm_inverse", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return actnorm_inverse_ref(y, bias, logs, logscale_factor)
    return _actnorm_inv(y, bias, logs, float(logscale_factor), impl)
