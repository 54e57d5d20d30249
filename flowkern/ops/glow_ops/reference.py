"""The whole Glow in eager torch on the packed parameters, in logical channel order, composed of the per-op
references: the oracle of the fused kernels (the nn.Glow per-op path is another)."""
from __future__ import annotations

import torch

from ...kernels import glow_meta
from ..._checks import compute_dtype
from ..coupling_epilogue_ops import coupling_epilogue_inverse_ref, coupling_epilogue_ref
from ..mlp_coupling_ops import mlp_subnet_ref
from ..prior_ops import gaussian_log_prob_ref
from ..split_ops import half
from ..spec import MlpParams
from .plan import GlowPlan, _flatten, _numel


def _unpack_step(plan: GlowPlan, params: torch.Tensor, mix: torch.Tensor, s: int):
    meta = plan.meta_host[s].tolist()
    shapes = plan.param_shapes[s]
    an_b, an_l, *mlp = [None if off < 0 else params[off:off + _numel(sh)].view(sh) for off, sh in zip(meta, shapes)]
    cl, w, b = meta[glow_meta.CL], meta[glow_meta.OFF_MIX_W], meta[glow_meta.OFF_MIX_B]
    folded = None if not plan.lu else (mix[w:w + cl * cl].view(cl, cl), mix[b:b + cl])
    return an_b, an_l, MlpParams(*mlp), folded


def glow_ref(x, plan: GlowPlan, params, mix, log_det_const=None):
    """(z, log_det, log_prior) of the packed Glow, composed of the per-op references (compute dtype throughout)."""
    params = _flatten(params)
    dtype = compute_dtype(x.dtype)
    f = plan.logscale_factor
    h = x.to(dtype)
    log_det = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    factored = []
    for s in range(plan.steps):
        an_b, an_l, mlp, folded = _unpack_step(plan, params, mix, s)
        if plan.lu:
            weight, bias = folded
            h = h @ weight.to(dtype).T + bias.to(dtype)
        else:
            h = (h + an_b.to(dtype)) * torch.exp(f * an_l.to(dtype))
            log_det = log_det + f * an_l.to(dtype).sum()
            h = h[:, plan.perms[s].to(x.device)]
        x1, x2 = h[:, :half(h.shape[1])], h[:, half(h.shape[1]):]
        z2, coupling_log_det = coupling_epilogue_ref(x2, mlp_subnet_ref(x1, MlpParams(*(t.to(dtype) for t in mlp)), f),
                                                     plan.affine)
        h = torch.cat([x1, z2], dim=1)
        log_det = log_det + coupling_log_det
        if s % plan.depth == plan.depth - 1 and s < plan.steps - 1:
            factored.append(h[:, half(h.shape[1]):])
            h = h[:, :half(h.shape[1])]
    z = torch.cat(factored + [h], dim=1).to(x.dtype)
    if log_det_const is not None:
        log_det = log_det + log_det_const.to(dtype)
    return z, log_det, gaussian_log_prob_ref(z)


def glow_inverse_ref(z, plan: GlowPlan, params, mix):
    params = _flatten(params)
    dtype = compute_dtype(z.dtype)
    f = plan.logscale_factor
    sizes = [cl - half(cl) for cl in plan.level_channels[:-1]] + [plan.level_channels[-1]]
    parts = list(z.to(dtype).split(sizes, dim=1))
    h = parts.pop()
    for s in reversed(range(plan.steps)):
        if s % plan.depth == plan.depth - 1 and s < plan.steps - 1:
            h = torch.cat([h, parts.pop()], dim=1)
        an_b, an_l, mlp, folded = _unpack_step(plan, params, mix, s)
        y1, z2 = h[:, :half(h.shape[1])], h[:, half(h.shape[1]):]
        x2 = coupling_epilogue_inverse_ref(z2, mlp_subnet_ref(y1, MlpParams(*(t.to(dtype) for t in mlp)), f),
                                           plan.affine)
        h = torch.cat([y1, x2], dim=1)
        if plan.lu:
            weight, bias = folded
            h = h @ weight.to(dtype).T + bias.to(dtype)
        else:
            h = h[:, torch.argsort(plan.perms[s]).to(z.device)]
            h = h * torch.exp(-f * an_l.to(dtype)) - an_b.to(dtype)
    return h.to(z.dtype)
