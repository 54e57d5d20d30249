"""ActNorm on the Triton engine of the channelwise ops (see channelwise): y = (x + bias) * exp(f * logs) per channel
with log_det = f * sum(logs) * P, its inverse, and its backward from the forward's input x (y is recomputed)."""
from __future__ import annotations

import triton
import triton.language as tl

from .channelwise import Channelwise


@triton.jit
def _forward(ins, params, rows, scalars):
    return ((ins[0] + params[0]) * tl.exp(scalars[0] * params[1]),), (), ()


@triton.jit
def _log_det_term(params, scalars):
    return scalars[0] * params[1]   # of every element of the channel: log_det = f * sum(logs) * P


@triton.jit
def _inverse(ins, params, rows, scalars):
    return (ins[0] * tl.exp(-scalars[0] * params[1]) - params[0],), (), ()


@triton.jit
def _backward(ins, params, rows, scalars):
    """ins (grad_y, x), rows (grad_log_det,): dx = dy * s; terms of dbias (dy * s) and of dlogs / f."""
    dy_scaled = ins[0] * tl.exp(scalars[0] * params[1])
    return (dy_scaled,), (), (dy_scaled, dy_scaled * (ins[1] + params[0]) + rows[0])


@triton.jit
def _times_factor(k: tl.constexpr, total, scalars):
    return scalars[0] * total if k == 1 else total


actnorm_fwd = Channelwise("actnorm_fwd", "x:d bias:p logs:p logscale_factor:s", _forward, row_sums=1,
                          row_term=_log_det_term)
actnorm_inv = Channelwise("actnorm_inv", "y:d bias:p logs:p logscale_factor:s", _inverse)
actnorm_bwd = Channelwise("actnorm_bwd", "grad_y:d grad_log_det:r x:d bias:p logs:p logscale_factor:s", _backward,
                          channel_sums=2, dtype_from=1, finish_channel=_times_factor)
