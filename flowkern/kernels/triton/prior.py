"""The N(0, I) prior on the Triton engine of the channelwise ops (see channelwise):
log_prob[b] = -0.5 * sum over a sample's values of (z^2 + log(2 pi)), and dz = -z * dlog_prob[b]."""
from __future__ import annotations

import math

import triton
import triton.language as tl

from .channelwise import Channelwise

_LOG_2PI = tl.constexpr(math.log(2 * math.pi))


@triton.jit
def _forward(ins, params, rows, scalars):
    return (), (ins[0] * ins[0],), ()


@triton.jit
def _log_prob(k: tl.constexpr, sum_squares, n):
    return -0.5 * (sum_squares + n.to(sum_squares.dtype) * _LOG_2PI)


@triton.jit
def _backward(ins, params, rows, scalars):
    return (-ins[0] * rows[0],), (), ()


gaussian_log_prob_fwd = Channelwise("gaussian_log_prob_fwd", "z:d", _forward, outputs=0, row_sums=1, flat=True,
                                    finish_row=_log_prob)
gaussian_log_prob_bwd = Channelwise("gaussian_log_prob_bwd", "grad_log_prob:r z:d", _backward, flat=True)
