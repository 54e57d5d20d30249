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
from .spec import BACKENDS, OpSpec, like


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


def _same_format(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)   # the kernels keep x's memory format (channels-last images stay so)


# ---- W from the LU factors ----

_LU_FACTORS = (("perm", torch.Tensor), ("lower", torch.Tensor), ("upper", torch.Tensor), ("sign_s", torch.Tensor),
               ("log_s", torch.Tensor))
LU_WEIGHT_BWD = OpSpec(
    "lu_weight_bwd", "invconv", (("grad_weight", torch.Tensor), ("grad_log_det", torch.Tensor)) + _LU_FACTORS,
    lambda grad_weight, grad_log_det, perm, lower, upper, sign_s, log_s: (like(lower), like(upper), like(log_s)),
    "(Tensor, Tensor, Tensor)")
LU_WEIGHT_FWD = OpSpec(
    "lu_weight_fwd", "invconv", _LU_FACTORS,
    lambda perm, lower, upper, sign_s, log_s: (like(lower), log_s.new_empty(())), "(Tensor, Tensor)",
    differentiable=("lower", "upper", "log_s"), backward=LU_WEIGHT_BWD)

# ---- y = x @ W^T per pixel, optionally with the preceding ActNorm folded into the load ----

INVCONV_BWD = OpSpec(
    "invconv_bwd", "invconv", (("grad_y", torch.Tensor), ("x", torch.Tensor), ("weight", torch.Tensor)),
    lambda grad_y, x, weight: (_same_format(x), like(weight)), "(Tensor, Tensor)")
INVCONV_FWD = OpSpec(
    "invconv_fwd", "invconv", (("x", torch.Tensor), ("weight", torch.Tensor)),
    lambda x, weight: _same_format(x), "Tensor", differentiable=("x", "weight"), backward=INVCONV_BWD)

_ACTNORM_INVCONV_ARGS = (("x", torch.Tensor), ("bias", torch.Tensor), ("logs", torch.Tensor),
                         ("logscale_factor", float), ("weight", torch.Tensor))
ACTNORM_INVCONV_BWD = OpSpec(
    "actnorm_invconv_bwd", "invconv", (("grad_y", torch.Tensor),) + _ACTNORM_INVCONV_ARGS,
    lambda grad_y, x, bias, logs, f, weight: (_same_format(x), like(bias), like(logs), like(weight)),
    "(Tensor, Tensor, Tensor, Tensor)")
ACTNORM_INVCONV_FWD = OpSpec(
    "actnorm_invconv_fwd", "invconv", _ACTNORM_INVCONV_ARGS,
    lambda x, bias, logs, f, weight: _same_format(x), "Tensor",
    differentiable=("x", "bias", "logs", "weight"), backward=ACTNORM_INVCONV_BWD)


# ---- public entry points ----

def lu_weight(perm, lower, upper, sign_s, log_s):
    """(W = P L U' [C, C], log |det W| as a 0-dim tensor)."""
    impl = backend.resolve(lower, "lu_weight", BACKENDS)
    if impl == "torch":
        return lu_weight_ref(perm, lower, upper, sign_s, log_s)
    return LU_WEIGHT_FWD(perm, lower, upper, sign_s, log_s, impl=impl)


def invconv(x: torch.Tensor, weight: torch.Tensor):
    """y[:, i] = sum_j weight[i, j] x[:, j] at every pixel."""
    impl = backend.resolve(x, "invconv", BACKENDS)
    if impl == "torch":
        return invconv_ref(x, weight)
    return INVCONV_FWD(x, weight, impl=impl)


def actnorm_invconv(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor, logscale_factor: float,
                    weight: torch.Tensor, weight_log_det: torch.Tensor):
    """ActNorm followed by the 1x1 convolution, fused: returns (y, log_det[B]).

    y = ((x + bias) * exp(logscale_factor * logs)) @ weight^T at every pixel, without the intermediate in memory;
    log_det = (logscale_factor * sum(logs) + weight_log_det) * H * W. `weight` and `weight_log_det` come from
    lu_weight (InvConv1x1.weight(), cached in eval mode). The log-det is a handful of scalar ops done in torch,
    so autograd routes its gradient to logs and weight_log_det.
    """
    impl = backend.resolve(x, "actnorm_invconv", BACKENDS)
    if impl == "torch":
        return actnorm_invconv_ref(x, bias, logs, logscale_factor, weight, weight_log_det)
    dtype = compute_dtype(x.dtype)
    per_pixel = logscale_factor * logs.to(dtype).sum() + weight_log_det.to(dtype)
    log_det = (per_pixel * x[0, 0].numel()).expand(x.shape[0]).contiguous()
    return ACTNORM_INVCONV_FWD(x, bias, logs, float(logscale_factor), weight, impl=impl), log_det


def invconv_inverse(y, perm, lower, upper, sign_s, log_s):
    """x with invconv(x, W) = y. Kernel backends multiply by W^-1 from float64 triangular solves on the factors
    (lu_inverse_weight) with the forward's GEMM kernel; see flowkern/kernels/triton/invconv.py for why."""
    impl = backend.resolve(y, "invconv_inverse", BACKENDS)
    if impl == "torch":
        return invconv_inverse_ref(y, perm, lower, upper, sign_s, log_s)
    return INVCONV_FWD(y, lu_inverse_weight(perm, lower, upper, sign_s, log_s), impl=impl)


def permute_channels(x: torch.Tensor, perm: torch.Tensor):
    return permute_channels_ref(x, perm)
