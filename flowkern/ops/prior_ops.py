"""Multi-scale split helpers and the N(0, I) prior."""
from __future__ import annotations

import math

import torch

from .. import backend
from .._checks import compute_dtype

_LOG_2PI = math.log(2 * math.pi)


def half(channels: int) -> int:
    """Size of the first part whenever channels are halved (the extra channel of an odd count goes first)."""
    return (channels + 1) // 2


def split_channels(x: torch.Tensor):
    k = half(x.shape[1])
    return x[:, :k], x[:, k:]


def gaussian_log_prob_ref(z):
    dtype = compute_dtype(z.dtype)
    zc = z.to(dtype)
    return -0.5 * (zc * zc + _LOG_2PI).flatten(1).sum(1)


_KERNEL_BACKENDS = ("triton", "cuda", "cpp")


@torch.library.custom_op("flowkern::gaussian_log_prob_fwd", mutates_args=())
def _gaussian_log_prob_fwd(z: torch.Tensor, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "prior").gaussian_log_prob_fwd(z)


@_gaussian_log_prob_fwd.register_fake
def _(z, impl):
    return z.new_empty(z.shape[0], dtype=compute_dtype(z.dtype))


@torch.library.custom_op("flowkern::gaussian_log_prob_bwd", mutates_args=())
def _gaussian_log_prob_bwd(grad_log_prob: torch.Tensor, z: torch.Tensor, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "prior").gaussian_log_prob_bwd(grad_log_prob, z)


@_gaussian_log_prob_bwd.register_fake
def _(grad_log_prob, z, impl):
    return z.new_empty(z.shape)


def _gaussian_log_prob_setup_context(ctx, inputs, output):
    z, impl = inputs
    ctx.save_for_backward(z)
    ctx.impl = impl


def _gaussian_log_prob_backward(ctx, grad_log_prob):
    z, = ctx.saved_tensors
    return _gaussian_log_prob_bwd(grad_log_prob, z, ctx.impl), None


_gaussian_log_prob_fwd.register_autograd(_gaussian_log_prob_backward, setup_context=_gaussian_log_prob_setup_context)


def gaussian_log_prob(z: torch.Tensor):
    """log N(z; 0, I) per sample, summed over all non-batch dims: shape [B]."""
    impl = backend.resolve(z, "gaussian_log_prob", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return gaussian_log_prob_ref(z)
    return _gaussian_log_prob_fwd(z, impl)


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel order as in Glow (each channel's 2x2 block kept together)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)
