"""Invertible 1x1 convolution (channel mixing) with W in LU form, and fixed channel permutations.

W = P L (U + diag(sign_s * exp(log_s))): P a fixed permutation given as indices (row i of P @ M is M[perm[i]]),
L unit lower triangular, U strictly upper triangular. log |det W| = sum(log_s), so no slogdet is needed, and
the inverse uses triangular solves on the factors instead of a low-precision torch.inverse. The inverse runs in
float64: inverting amplifies rounding by cond(W), which a trained W can push past what float32 round trips bear.
"""
from __future__ import annotations

import torch

from .. import backend
from .._checks import compute_dtype
from .actnorm_ops import actnorm_ref


def _factors(lower, upper, sign_s, log_s):
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    unit_lower = torch.tril(lower, -1) + eye
    upper_with_diag = torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_s))
    return unit_lower, upper_with_diag


def lu_weight_ref(perm, lower, upper, sign_s, log_s):
    """(W [C, C], log |det W| as a 0-dim tensor)."""
    unit_lower, upper_with_diag = _factors(lower, upper, sign_s, log_s)
    return (unit_lower @ upper_with_diag)[perm], log_s.sum()


def lu_inverse_weight(perm, lower, upper, sign_s, log_s):
    """W^-1 in float64 from triangular solves (the module caches it in eval mode)."""
    unit_lower, upper_with_diag = _factors(lower.double(), upper.double(), sign_s.double(), log_s.double())
    eye = torch.eye(lower.shape[0], dtype=torch.float64, device=lower.device)
    return _solve_lu(unit_lower, upper_with_diag, eye[torch.argsort(perm)])


def _solve_lu(unit_lower, upper_with_diag, rhs):
    """Solves L U X = rhs (rhs [C, N], already permuted by P^T)."""
    tmp = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper_with_diag, tmp, upper=True)


def _channels_last_2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C] or [B, C, H, W] -> [N, C] with N = B*H*W."""
    return x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])


def _from_channels_last_2d(y2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return y2d
    b, c, h, w = like.shape
    return y2d.reshape(b, h, w, c).movedim(-1, 1)


def invconv_ref(x, weight):
    """y[b, i, ...] = sum_j weight[i, j] x[b, j, ...], computed in float64 when the weight is float64."""
    dtype = torch.promote_types(compute_dtype(x.dtype), weight.dtype)
    y2d = _channels_last_2d(x.to(dtype)) @ weight.to(dtype).T
    return _from_channels_last_2d(y2d, x).to(x.dtype)


def invconv_inverse_ref(y, perm, lower, upper, sign_s, log_s):
    unit_lower, upper_with_diag = _factors(lower.double(), upper.double(), sign_s.double(), log_s.double())
    rhs = _channels_last_2d(y.double()).T[torch.argsort(perm)]
    x2d = _solve_lu(unit_lower, upper_with_diag, rhs).T
    return _from_channels_last_2d(x2d, y).to(y.dtype)


def permute_channels_ref(x, perm):
    return x.index_select(1, perm)


def actnorm_invconv_ref(x, bias, logs, logscale_factor, weight, weight_log_det):
    """ActNorm then the 1x1 convolution with `weight`: (y, log_det[B]); weight_log_det is log |det W| per pixel."""
    normed, log_det = actnorm_ref(x, bias, logs, logscale_factor)
    pixels = x[0, 0].numel()
    return invconv_ref(normed, weight), log_det + weight_log_det.to(log_det.dtype) * pixels


_KERNEL_BACKENDS = ("triton", "cuda", "cpp")


# ---- W from the LU factors ----

@torch.library.custom_op("flowkern::lu_weight_fwd", mutates_args=())
def _lu_weight_fwd(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor,
                   log_s: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "invconv").lu_weight_fwd(perm, lower, upper, sign_s, log_s)


@_lu_weight_fwd.register_fake
def _(perm, lower, upper, sign_s, log_s, impl):
    return lower.new_empty(lower.shape), log_s.new_empty(())


@torch.library.custom_op("flowkern::lu_weight_bwd", mutates_args=())
def _lu_weight_bwd(dweight: torch.Tensor, dlog_det: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor,
                   upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor,
                   impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "invconv").lu_weight_bwd(dweight, dlog_det, perm, lower, upper, sign_s, log_s)


@_lu_weight_bwd.register_fake
def _(dweight, dlog_det, perm, lower, upper, sign_s, log_s, impl):
    return lower.new_empty(lower.shape), upper.new_empty(upper.shape), torch.empty_like(log_s)


def _lu_weight_setup_context(ctx, inputs, output):
    perm, lower, upper, sign_s, log_s, impl = inputs
    ctx.save_for_backward(perm, lower, upper, sign_s, log_s)
    ctx.impl = impl


def _lu_weight_backward(ctx, dweight, dlog_det):
    dlower, dupper, dlog_s = _lu_weight_bwd(dweight, dlog_det, *ctx.saved_tensors, ctx.impl)
    return None, dlower, dupper, None, dlog_s, None


_lu_weight_fwd.register_autograd(_lu_weight_backward, setup_context=_lu_weight_setup_context)


# ---- y = x @ W^T per pixel, optionally with the preceding ActNorm folded into the load ----

@torch.library.custom_op("flowkern::invconv_fwd", mutates_args=())
def _invconv_fwd(x: torch.Tensor, weight: torch.Tensor, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "invconv").invconv_fwd(x, weight)


@_invconv_fwd.register_fake
def _(x, weight, impl):
    return torch.empty_like(x)


@torch.library.custom_op("flowkern::invconv_bwd", mutates_args=())
def _invconv_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "invconv").invconv_bwd(dy, x, weight)


@_invconv_bwd.register_fake
def _(dy, x, weight, impl):
    return torch.empty_like(x), torch.empty_like(weight)


def _invconv_setup_context(ctx, inputs, output):
    x, weight, impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.impl = impl


def _invconv_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dweight = _invconv_bwd(dy, x, weight, ctx.impl)
    return dx, dweight, None


_invconv_fwd.register_autograd(_invconv_backward, setup_context=_invconv_setup_context)


@torch.library.custom_op("flowkern::actnorm_invconv_fwd", mutates_args=())
def _actnorm_invconv_fwd(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                         weight: torch.Tensor, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "invconv").actnorm_invconv_fwd(x, bias, logs, logscale_factor, weight)


@_actnorm_invconv_fwd.register_fake
def _(x, bias, logs, logscale_factor, weight, impl):
    return torch.empty_like(x)


@torch.library.custom_op("flowkern::actnorm_invconv_bwd", mutates_args=())
def _actnorm_invconv_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor,
                         logscale_factor: float, weight: torch.Tensor,
                         impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "invconv").actnorm_invconv_bwd(dy, x, bias, logs, logscale_factor, weight)


@_actnorm_invconv_bwd.register_fake
def _(dy, x, bias, logs, logscale_factor, weight, impl):
    return torch.empty_like(x), torch.empty_like(bias), torch.empty_like(logs), torch.empty_like(weight)


def _actnorm_invconv_setup_context(ctx, inputs, output):
    x, bias, logs, logscale_factor, weight, impl = inputs
    ctx.save_for_backward(x, bias, logs, weight)
    ctx.logscale_factor, ctx.impl = logscale_factor, impl


def _actnorm_invconv_backward(ctx, dy):
    x, bias, logs, weight = ctx.saved_tensors
    dx, dbias, dlogs, dweight = _actnorm_invconv_bwd(dy, x, bias, logs, ctx.logscale_factor, weight, ctx.impl)
    return dx, dbias, dlogs, None, dweight, None


_actnorm_invconv_fwd.register_autograd(_actnorm_invconv_backward, setup_context=_actnorm_invconv_setup_context)


# ---- public entry points ----

def lu_weight(perm, lower, upper, sign_s, log_s):
    """(W = P L U' [C, C], log |det W| as a 0-dim tensor)."""
    impl = backend.resolve(lower, "lu_weight", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return lu_weight_ref(perm, lower, upper, sign_s, log_s)
    return _lu_weight_fwd(perm, lower, upper, sign_s, log_s, impl)


def invconv(x: torch.Tensor, weight: torch.Tensor):
    """y[:, i] = sum_j weight[i, j] x[:, j] at every pixel."""
    impl = backend.resolve(x, "invconv", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return invconv_ref(x, weight)
    return _invconv_fwd(x, weight, impl)


def actnorm_invconv(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                    weight: torch.Tensor, weight_log_det: torch.Tensor):
    """ActNorm followed by the 1x1 convolution, fused: returns (y, log_det[B]).

    y = ((x + bias) * exp(logscale_factor * logs)) @ weight^T at every pixel, without the intermediate in memory;
    log_det = (logscale_factor * sum(logs) + weight_log_det) * H * W. `weight` and `weight_log_det` come from
    lu_weight (InvConv1x1.weight(), cached in eval mode). The log-det is a handful of scalar ops done in torch,
    so autograd routes its gradient to logs and weight_log_det.
    """
    impl = backend.resolve(x, "actnorm_invconv", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return actnorm_invconv_ref(x, bias, logs, logscale_factor, weight, weight_log_det)
    dtype = compute_dtype(x.dtype)
    per_pixel = logscale_factor * logs.to(dtype).sum() + weight_log_det.to(dtype)
    log_det = (per_pixel * x[0, 0].numel()).expand(x.shape[0]).contiguous()
    return _actnorm_invconv_fwd(x, bias, logs, logscale_factor, weight, impl), log_det


def invconv_inverse(y, perm, lower, upper, sign_s, log_s):
    """x with invconv(x, W) = y. Kernel backends multiply by W^-1 from float64 triangular solves on the factors
    (lu_inverse_weight) with the forward's GEMM kernel; see flowkern/kernels/triton/invconv.py for why."""
    impl = backend.resolve(y, "invconv_inverse", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return invconv_inverse_ref(y, perm, lower, upper, sign_s, log_s)
    return _invconv_fwd(y, lu_inverse_weight(perm, lower, upper, sign_s, log_s), impl)


def permute_channels(x: torch.Tensor, perm: torch.Tensor):
    return permute_channels_ref(x, perm)
