"""The fused Glow's plan (GlowPlan: its structure as tables, built once per module and device) and the packing
of its parameters (pack_forward, pack_inverse)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...kernels import glow_meta
from ..mlp_coupling_ops import MAX_FUSED_HIDDEN
from ..spec import MlpParams
from ..split_ops import half

# Per-step parameters in packing order (the ActNorm pair is left out of LU flows, where it is folded into W).
STEP_PARAMS = ("actnorm_bias", "actnorm_logs") + MlpParams._fields


class GlowTables(NamedTuple):
    """The plan's tables, handed to every backend as one group (see GlowPlan): each backend reads those it needs."""
    meta: torch.Tensor
    an_idx: torch.Tensor
    z_idx: torch.Tensor
    order: torch.Tensor
    local_order: torch.Tensor


class GlowPlan:
    """The static structure of a fusable Glow, as index tables on one device.

    level_channels: channels of each level; depth: steps per level; perms: one LongTensor per step (y = x[:, perm])
    for permutation mixing, or None for LU mixing. Channels keep one *physical* position for the whole flow;
    an_idx [steps, C] gives each physical channel's ActNorm channel at each step (-1 once it has been factored
    out), z_idx [C] its column in z. `order` [2 * steps, C] lists the roles by coupling channel (what the Triton
    kernel loops over: the level's channels only): order[s, k] is the physical channel that is coupling channel k
    at step s, order[steps + s, k] its ActNorm channel (k < the level's channels; 0 after).
    `local_order` [2 * steps, C] is the C++ CPU kernel's channel order (csrc/cpu/glow.cpp), in which the
    conditioning and the transformed channels each keep ascending physical order (so that under reverse mixing
    each is one contiguous range of the state): local_order[s, i] is the physical channel at local position i of
    step s (the C1 conditioning channels, then the transformed ones), local_order[steps + s, i] its coupling
    channel (-1 after the level's channels).
    `meta` [steps, glow_meta.COUNT]: per step, the columns named in flowkern/kernels/glow_meta.py. `tables` holds
    them all (GlowTables) on `device`, for every backend.
    """

    def __init__(self, level_channels: list[int], depth: int, hidden: int, affine: bool,
                 perms: list[torch.Tensor] | None, logscale_factor: float, device: torch.device):
        if hidden > MAX_FUSED_HIDDEN:
            raise ValueError(f"GlowPlan: the fused Glow takes MLP subnets of hidden width <= {MAX_FUSED_HIDDEN}, "
                             f"got {hidden}")
        self.level_channels, self.depth, self.hidden, self.affine = list(level_channels), depth, hidden, affine
        self.lu = perms is None
        self.logscale_factor = float(logscale_factor)
        self.channels = channels = level_channels[0]
        self.steps = steps = len(level_channels) * depth
        self.perms = None if perms is None else [p.detach().cpu() for p in perms]
        an_idx = torch.full((steps, channels), -1, dtype=torch.int32)
        cp_idx = torch.full((steps, channels), -1, dtype=torch.int32)
        z_idx = torch.empty(channels, dtype=torch.int32)
        order = torch.zeros((2 * steps, channels), dtype=torch.int32)
        local_order = torch.full((2 * steps, channels), -1, dtype=torch.int32)
        meta = torch.zeros((steps, glow_meta.COUNT), dtype=torch.int64)
        self.param_shapes: list[list[tuple[int, ...]]] = []
        physical = list(range(channels))  # physical position of each logical channel of the current level
        params_total = mix_total = z_offset = 0
        for level, cl in enumerate(level_channels):
            c1 = half(cl)
            outputs = (cl - c1) * (2 if affine else 1)
            for d in range(depth):
                s = level * depth + d
                an_idx[s, physical] = torch.arange(cl, dtype=torch.int32)
                if not self.lu:
                    perm = self.perms[s].tolist()
                    physical = [physical[j] for j in perm]
                cp_idx[s, physical] = torch.arange(cl, dtype=torch.int32)
                order[s, :cl] = torch.tensor(physical, dtype=torch.int32)
                order[steps + s, :cl] = an_idx[s, physical]
                local = sorted(physical[:c1]) + sorted(physical[c1:cl])
                local_order[s, :cl] = torch.tensor(local, dtype=torch.int32)
                local_order[steps + s, :cl] = cp_idx[s, local]
                shapes = [(cl,), (cl,), (hidden, c1), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,),
                          (outputs, hidden), (outputs,), (outputs,)]
                # The STEP_PARAMS offsets are the table's first columns, in that order.
                for column, shape in enumerate(shapes):
                    if self.lu and column < 2:
                        meta[s, column] = -1
                        continue
                    meta[s, column] = params_total
                    params_total += _numel(shape)
                meta[s, glow_meta.OFF_MIX_W] = meta[s, glow_meta.OFF_MIX_B] = -1
                if self.lu:
                    meta[s, glow_meta.OFF_MIX_W], meta[s, glow_meta.OFF_MIX_B] = mix_total, mix_total + cl * cl
                    mix_total += cl * cl + cl
                meta[s, glow_meta.C1], meta[s, glow_meta.CL], meta[s, glow_meta.Z_OFFSET] = c1, cl, z_offset
                self.param_shapes.append(shapes)
            if level < len(level_channels) - 1:
                for j in range(c1, cl):
                    z_idx[physical[j]] = z_offset + j - c1
                z_offset += cl - c1
                physical = physical[:c1]
            else:
                for j in range(cl):
                    z_idx[physical[j]] = z_offset + j
        self.params_numel, self.mix_numel = params_total, mix_total
        self.level_steps = [depth] * len(level_channels)
        self.meta_host = meta
        self.tables = GlowTables(*(t.to(device) for t in (meta, an_idx, z_idx, order, local_order)))
        self.device = torch.device(device)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _check_step_params(plan: GlowPlan, step_params) -> None:
    if len(step_params) != plan.steps:
        raise ValueError(f"glow: expected parameters for {plan.steps} steps, got {len(step_params)}")
    for s, (tensors, shapes) in enumerate(zip(step_params, plan.param_shapes)):
        actual = [tuple(t.shape) for t in tensors]
        if actual != [tuple(sh) for sh in shapes]:
            raise ValueError(f"glow: step {s} parameter shapes {actual} do not match the plan's {shapes} "
                             f"(order {STEP_PARAMS})")


def pack_forward(plan: GlowPlan, step_params, lu_weights=None):
    """(params, mix, log_det_const) for `glow`: the parameter tensors in packing order (a list: the op
    concatenates them itself and hands each its gradient, so autograd sees no per-tensor views), the folded LU
    maps (empty for permutation flows) and the LU flows' constant log-det (None for permutation flows, whose kernel
    adds the ActNorm log-det itself). step_params: per step, the tensors of STEP_PARAMS; lu_weights: per step
    (W, log|det W|) for LU flows. Differentiable."""
    _check_step_params(plan, step_params)
    if not plan.lu:
        return [t for tensors in step_params for t in tensors], step_params[0][0].new_empty(0), None
    f = plan.logscale_factor
    mix, const = [], 0.0
    for tensors, (weight, weight_log_det) in zip(step_params, lu_weights):
        bias, logs = tensors[0], tensors[1]
        scale = torch.exp(f * logs)
        mix += [weight * scale[None, :], weight @ (bias * scale)]
        const = const + weight_log_det + f * logs.sum()
    return [t for tensors in step_params for t in tensors[2:]], _flatten(mix), const


def pack_inverse(plan: GlowPlan, step_params, lu_inverse_weights=None):
    """(params, mix) for `glow_inverse` (params: a list, as from pack_forward); lu_inverse_weights: per step W^-1
    (float64 from lu_inverse_weight)."""
    _check_step_params(plan, step_params)
    if not plan.lu:
        return [t for tensors in step_params for t in tensors], step_params[0][0].new_empty(0)
    f = plan.logscale_factor
    mix = []
    for tensors, inverse_weight in zip(step_params, lu_inverse_weights):
        bias, logs = tensors[0], tensors[1]
        # u = W^-1 v / s - b: the ActNorm inverse folded into the rows of W^-1 (computed in float64).
        scale = torch.exp(f * logs.to(inverse_weight.dtype))
        mix += [(inverse_weight / scale[:, None]).to(bias.dtype), -bias]
    return [t for tensors in step_params for t in tensors[2:]], _flatten(mix)


