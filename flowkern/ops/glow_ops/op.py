"""The fused Glow as one custom op (forward, inverse, and the backward kernel behind the forward's autograd).

Every backend gets the same plan (GlowPlan.tables and its level structure) and the parameter tensors as a list,
which it packs itself (so autograd sees no per-tensor views: the backward hands each tensor its slice of the
packed gradient). LU flows' mixing gradients come from the backward kernel's GEMM-output gradients through one
weight-gradient step (`mix_gradient`), the same for every backend.
"""
from __future__ import annotations

import torch
from torch._utils import _unflatten_dense_tensors

from ... import backend
from ..._checks import compute_dtype
from ..spec import OpSpec, like, per_row
from .plan import GlowPlan, GlowTables
from .reference import glow_inverse_ref, glow_ref

KERNEL_BACKENDS = ("triton", "cpp")   # on CUDA tensors the Triton kernel serves the whole Glow
BACKENDS = ("torch",) + KERNEL_BACKENDS

_PLAN_ARGS = (("plan", GlowTables), ("level_steps", list[int]), ("level_channels", list[int]), ("hidden", int),
              ("affine", bool), ("lu", bool), ("logscale_factor", float))


def _plan_args(plan: GlowPlan) -> tuple:
    return (plan.tables, plan.level_steps, plan.level_channels, plan.hidden, plan.affine, plan.lu,
            plan.logscale_factor)


def _acc(t: torch.Tensor, shape) -> torch.Tensor:
    return t.new_empty(shape, dtype=compute_dtype(t.dtype))


def _forward_outputs(x, params, mix, plan, level_steps, level_channels, hidden, affine, lu, f, save):
    """(z, log_det, log_prior, mid, inp): mid [steps + 1, B, C] each step's coupling input and the final state,
    inp [steps, B, C] each LU mixing GEMM's input (acc-typed; empty unless `save`): what the backward needs."""
    steps, (batch, channels) = plan.meta.shape[0], x.shape
    return (like(x), per_row(x), per_row(x), _acc(x, (steps + 1, batch, channels) if save else (0,)),
            _acc(x, (steps, batch, channels) if save and lu else (0,)))


def _backward_outputs(grad_z, grad_log_det, grad_log_prior, z, params, mix, mid, plan, level_steps, level_channels,
                      hidden, affine, lu, f):
    """(dx, dparams packed, dmid): dmid [steps, B, C] the gradient at each LU mixing GEMM's output (empty for
    permutation flows)."""
    steps, (batch, channels) = plan.meta.shape[0], z.shape
    return like(z), _acc(z, sum(p.numel() for p in params)), _acc(z, (steps, batch, channels) if lu else (0,))


def mix_gradient(dmid: torch.Tensor, inp: torch.Tensor, level_steps: list[int], level_channels: list[int],
                 dtype: torch.dtype) -> torch.Tensor:
    """The packed gradient of the LU flows' folded maps: dW = sum_b dmid^T inp and db = sum_b dmid per step, one
    batched GEMM per level."""
    parts, first = [], 0
    for n_steps, cl in zip(level_steps, level_channels):
        g = dmid[first:first + n_steps, :, :cl]
        u = inp[first:first + n_steps, :, :cl]
        parts.append(torch.cat([torch.bmm(g.transpose(1, 2), u).flatten(1), g.sum(1)], dim=1).flatten())
        first += n_steps
    return torch.cat(parts).to(dtype)


def _glow_backward(args, grad_z, grad_log_det, grad_log_prior, _grad_mid, _grad_inp):
    z, _, _, mid, inp = args.outputs
    if mid.numel() == 0:
        raise RuntimeError("flowkern glow: backward through a forward that did not save its activations "
                           "(it ran with save=False)")
    plan = (args.plan, args.level_steps, args.level_channels, args.hidden, args.affine, args.lu,
            args.logscale_factor)
    dx, dparams, dmid = GLOW_BWD(grad_z, grad_log_det.contiguous(), grad_log_prior.contiguous(), z, args.params,
                                 args.mix, mid, *plan, impl=args.impl)
    dmix = mix_gradient(dmid, inp, args.level_steps, args.level_channels, args.mix.dtype) if args.lu else None
    return dx, _per_tensor(dparams, args.params), dmix


def _per_tensor(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """flat's slices shaped as `tensors`: one C++ call in eager mode (a Python loop over ~100 tensors costs more
    than the backward kernel at small batches); split and view while traced with symbolic sizes."""
    if isinstance(flat.shape[0], torch.SymInt):
        return [g.view_as(t) for g, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    return list(_unflatten_dense_tensors(flat, tensors))


GLOW_BWD = OpSpec(
    "glow_bwd", "glow",
    (("grad_z", torch.Tensor), ("grad_log_det", torch.Tensor), ("grad_log_prior", torch.Tensor), ("z", torch.Tensor),
     ("params", list[torch.Tensor]), ("mix", torch.Tensor), ("mid", torch.Tensor)) + _PLAN_ARGS,
    _backward_outputs, "(Tensor, Tensor, Tensor)")
GLOW_FWD = OpSpec(
    "glow_fwd", "glow",
    (("x", torch.Tensor), ("params", list[torch.Tensor]), ("mix", torch.Tensor)) + _PLAN_ARGS + (("save", bool),),
    _forward_outputs, "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    differentiable=("x", "params", "mix"), backward=_glow_backward, activations=2)
GLOW_INV = OpSpec(   # no backward: callers needing gradients through the inverse use the per-op path
    "glow_inv", "glow",
    (("z", torch.Tensor), ("params", list[torch.Tensor]), ("mix", torch.Tensor)) + _PLAN_ARGS,
    lambda z, *args: like(z), "Tensor")


# ---- public entry points ----

def _check(t: torch.Tensor, plan: GlowPlan, params: list[torch.Tensor], mix: torch.Tensor, where: str) -> None:
    if t.dim() != 2 or t.shape[1] != plan.channels:
        raise ValueError(f"{where}: expected [B, {plan.channels}] input, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{where}: empty batch")
    if not t.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor, got {t.dtype}")
    if isinstance(params, torch.Tensor) or not params:
        raise TypeError(f"{where}: params must be the list of parameter tensors from pack_forward / pack_inverse")
    devices = {p.device for p in params} | {mix.device}
    if devices != {t.device} or t.device != plan.device:
        raise ValueError(f"{where}: input on {t.device}, parameters on {sorted(map(str, devices))}, plan on "
                         f"{plan.device}")
    if len({p.dtype for p in params}) != 1:
        raise ValueError(f"{where}: parameters of mixed dtypes {sorted({str(p.dtype) for p in params})}")
    numel = sum(p.numel() for p in params)
    if numel != plan.params_numel:
        raise ValueError(f"{where}: {numel} packed parameters, the plan expects {plan.params_numel}")
    if mix.numel() != plan.mix_numel:
        raise ValueError(f"{where}: {mix.numel()} packed LU values, the plan expects {plan.mix_numel}")


def glow(x: torch.Tensor, plan: GlowPlan, params: list[torch.Tensor], mix: torch.Tensor,
         log_det_const: torch.Tensor | None = None):
    """(z [B, C], log_det [B], log_prior [B]) of the whole Glow; log_prob = log_prior + log_det.

    params, mix, log_det_const come from pack_forward. log_det and log_prior are float32 (float64 for float64 x).
    """
    _check(x, plan, params, mix, "glow")
    impl = backend.resolve(x, "glow", BACKENDS)
    if impl == "torch":
        return glow_ref(x, plan, params, mix, log_det_const)
    save = torch.is_grad_enabled() and (x.requires_grad or mix.requires_grad or any(p.requires_grad for p in params))
    z, log_det, log_prior, _, _ = GLOW_FWD(x, list(params), mix, *_plan_args(plan), save, impl=impl)
    if log_det_const is not None:
        log_det = log_det + log_det_const.to(log_det.dtype)
    return z, log_det, log_prior


def glow_inverse(z: torch.Tensor, plan: GlowPlan, params: list[torch.Tensor], mix: torch.Tensor) -> torch.Tensor:
    """x with glow(x)[0] = z; params, mix from pack_inverse. Kernel backends have no backward for it: callers
    needing gradients through the inverse use the per-op path (nn.Glow does)."""
    _check(z, plan, params, mix, "glow_inverse")
    impl = backend.resolve(z, "glow_inverse", BACKENDS)
    if impl == "torch":
        return glow_inverse_ref(z, plan, params, mix)
    return GLOW_INV(z, list(params), mix, *_plan_args(plan), impl=impl)
