"""The N(0, I) prior: log N(z; 0, I) per sample."""
from __future__ import annotations

import math

import torch

from .. import backend
from .._checks import compute_dtype
from .spec import BACKENDS, OpSpec, like, per_row

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob_ref(z):
    dtype = compute_dtype(z.dtype)
    zc = z.to(dtype)
    return -0.5 * (zc * zc + _LOG_2PI).flatten(1).sum(1)


GAUSSIAN_LOG_PROB_BWD = OpSpec(
    "gaussian_log_prob_bwd", "prior", (("grad_log_prob", torch.Tensor), ("z", torch.Tensor)),
    lambda grad_log_prob, z: like(z), "Tensor")
GAUSSIAN_LOG_PROB_FWD = OpSpec(
    "gaussian_log_prob_fwd", "prior", (("z", torch.Tensor),), lambda z: per_row(z), "Tensor",
    differentiable=("z",), backward=GAUSSIAN_LOG_PROB_BWD)


def gaussian_log_prob(z: torch.Tensor):
    """log N(z; 0, I) per sample, summed over all non-batch dims: shape [B]."""
    impl = backend.resolve(z, "gaussian_log_prob", BACKENDS)
    if impl == "torch":
        return gaussian_log_prob_ref(z)
    return GAUSSIAN_LOG_PROB_FWD(z, impl=impl)
