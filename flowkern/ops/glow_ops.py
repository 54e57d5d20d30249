"""The whole [B, C] Glow of the BERT-flow family as one op: every level, step and split, plus the N(0, I) prior.

Covers Glows built from ActNorm -> mixing (a fixed permutation, or LU weights) -> coupling (additive or affine)
with the built-in MLP subnet (flowkern.nn.subnets.MLPSubnet, hidden <= 64), halving splits between levels.
`nn.Glow` builds a `GlowPlan` once (the structure: which channel plays which role at each step) and packs its
parameters per call (`pack_forward`, `pack_inverse`); `glow` and `glow_inverse` then run the whole flow:
  - "triton": one kernel forward, one inverse, one backward (flowkern/kernels/triton/glow.py);
  - "torch": `glow_ref` / `glow_inverse_ref`, eager torch on the same packed parameters, in logical channel
    order and built from the per-op references (the oracle; the nn.Glow per-op path is another).
LU flows fold each ActNorm into the step's W on the host (W diag(s) and W (b s), tiny [C, C] ops that autograd
differentiates), so the kernels see one affine map per step; their constant log-det (sum log|s_W| + f sum logs)
is added on the host as well.
"""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .. import backend
from .._checks import compute_dtype
from .coupling_ops import coupling_inverse_ref, coupling_ref
from .mlp_coupling_ops import MAX_FUSED_HIDDEN, mlp_subnet_ref
from .prior_ops import gaussian_log_prob_ref, half

_KERNEL_BACKENDS = ("triton", "cpp")   # on CUDA tensors the Triton kernel serves the whole Glow
BACKENDS = ("torch",) + _KERNEL_BACKENDS

# Per-step parameters in packing order (the ActNorm pair is left out of LU flows, where it is folded into W).
STEP_PARAMS = ("actnorm_bias", "actnorm_logs", "w1", "b1", "l1", "w2", "b2", "l2", "w3", "b3", "l3")
# Columns of the int64 per-step meta table: offsets into the packed parameters / mixing buffers, then sizes.
_META = ("off_actnorm_bias", "off_actnorm_logs", "off_w1", "off_b1", "off_l1", "off_w2", "off_b2", "off_l2",
         "off_w3", "off_b3", "off_l3", "off_wmix", "off_bmix", "cond_channels", "level_channels", "z_offset")


class GlowPlan:
    """The static structure of a fusable Glow, as index tables on one device.

    level_channels: channels of each level; depth: steps per level; perms: one LongTensor per step (y = x[:, perm])
    for permutation mixing, or None for LU mixing. Channels keep one *physical* position for the whole flow;
    an_idx/cp_idx [steps, C] give each physical channel's ActNorm and coupling channel at each step (-1 once it
    has been factored out), z_idx [C] its column in z. `order` [2 * steps, C] lists the same by coupling channel
    (what the Triton kernel loops over: the level's channels only): order[s, k] is the physical channel that is
    coupling channel k at step s, order[steps + s, k] its ActNorm channel (k < the level's channels; 0 after).
    Meta column z_offset: the first z column of the channels the step's level factors out (at the last level, of
    its remaining channels).
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
        meta = torch.zeros((steps, len(_META)), dtype=torch.int64)
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
                shapes = [(cl,), (cl,), (hidden, c1), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,),
                          (outputs, hidden), (outputs,), (outputs,)]
                offsets = []
                for i, shape in enumerate(shapes):
                    if self.lu and i < 2:
                        offsets.append(-1)
                        continue
                    offsets.append(params_total)
                    params_total += _numel(shape)
                mix_offsets = [-1, -1]
                if self.lu:
                    mix_offsets = [mix_total, mix_total + cl * cl]
                    mix_total += cl * cl + cl
                meta[s] = torch.tensor(offsets + mix_offsets + [c1, cl, z_offset])
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
        self.meta, self.an_idx = meta.to(device), an_idx.to(device)
        self.cp_idx, self.z_idx, self.order = cp_idx.to(device), z_idx.to(device), order.to(device)
        self.device = torch.device(device)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _concatenate(params) -> torch.Tensor:
    """The packed parameter vector the kernels read, in one C++ call (a Python loop over ~100 tensors costs more
    than the copy)."""
    return _flatten_dense_tensors(list(params))


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


# ---- the eager reference, on the packed parameters, in logical channel order ----

def _unpack_step(plan: GlowPlan, params: torch.Tensor, mix: torch.Tensor, s: int):
    meta = plan.meta_host[s].tolist()
    shapes = plan.param_shapes[s]
    tensors = [None if off < 0 else params[off:off + _numel(sh)].view(sh) for off, sh in zip(meta[:11], shapes)]
    cl = meta[14]
    folded = None if not plan.lu else (mix[meta[11]:meta[11] + cl * cl].view(cl, cl), mix[meta[12]:meta[12] + cl])
    return tensors, folded


def glow_ref(x, plan: GlowPlan, params, mix, log_det_const=None):
    """(z, log_det, log_prior) of the packed Glow, composed of the per-op references (compute dtype throughout)."""
    params = _flatten(params)
    dtype = compute_dtype(x.dtype)
    f = plan.logscale_factor
    h = x.to(dtype)
    log_det = torch.zeros(x.shape[0], dtype=dtype, device=x.device)
    factored = []
    for s in range(plan.steps):
        (an_b, an_l, *mlp), folded = _unpack_step(plan, params, mix, s)
        if plan.lu:
            weight, bias = folded
            h = h @ weight.to(dtype).T + bias.to(dtype)
        else:
            h = (h + an_b.to(dtype)) * torch.exp(f * an_l.to(dtype))
            log_det = log_det + f * an_l.to(dtype).sum()
            h = h[:, plan.perms[s].to(x.device)]
        x1, x2 = h[:, :half(h.shape[1])], h[:, half(h.shape[1]):]
        z2, coupling_log_det = coupling_ref(x2, mlp_subnet_ref(x1, *[t.to(dtype) for t in mlp], f), plan.affine)
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
        (an_b, an_l, *mlp), folded = _unpack_step(plan, params, mix, s)
        y1, z2 = h[:, :half(h.shape[1])], h[:, half(h.shape[1]):]
        x2 = coupling_inverse_ref(z2, mlp_subnet_ref(y1, *[t.to(dtype) for t in mlp], f), plan.affine)
        h = torch.cat([y1, x2], dim=1)
        if plan.lu:
            weight, bias = folded
            h = h @ weight.to(dtype).T + bias.to(dtype)
        else:
            h = h[:, torch.argsort(plan.perms[s]).to(z.device)]
            h = h * torch.exp(-f * an_l.to(dtype)) - an_b.to(dtype)
    return h.to(z.dtype)


# ---- custom ops ----

@torch.library.custom_op("flowkern::glow_fwd", mutates_args=())
def _glow_fwd(x: torch.Tensor, params: torch.Tensor, mix: torch.Tensor, meta: torch.Tensor, an_idx: torch.Tensor,
              cp_idx: torch.Tensor, z_idx: torch.Tensor, order: torch.Tensor, level_steps: list[int],
              level_channels: list[int],
              hidden: int, affine: bool, lu: bool, logscale_factor: float, save: bool,
              impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, log_det, log_prior, mid, inp) from the packed parameter vector; mid and inp are what the backward needs
    (empty unless `save`). level_steps / level_channels (steps and channels per level) are for the backward, which
    needs them on the host: reading them from `meta` there would be a device sync."""
    tables = _launcher_tables(impl, meta, an_idx, cp_idx, z_idx, order)
    return backend.kernels(impl, "glow").glow_fwd(x, params, mix, *tables, hidden, affine, lu, logscale_factor, save)


def _launcher_tables(impl: str, meta, an_idx, cp_idx, z_idx, order) -> tuple:
    """The plan tables a backend's launchers take: the compiled CPU kernel works in physical channel order, the
    Triton kernel by coupling channel over each level's active channels."""
    return (meta, order) if impl == "triton" else (meta, an_idx, cp_idx, z_idx)


@_glow_fwd.register_fake
def _(x, params, mix, meta, an_idx, cp_idx, z_idx, order, level_steps, level_channels, hidden, affine, lu,
      logscale_factor, save, impl):
    acc = compute_dtype(x.dtype)
    batch, channels = x.shape
    steps = meta.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(batch, dtype=acc),
            x.new_empty(batch, dtype=acc), x.new_empty((steps + 1, batch, channels) if save else (0,), dtype=acc),
            x.new_empty((steps, batch, channels) if save and lu else (0,), dtype=acc))


@torch.library.custom_op("flowkern::glow_bwd", mutates_args=())
def _glow_bwd(dz: torch.Tensor, dlog_det: torch.Tensor, dlog_prior: torch.Tensor, z: torch.Tensor,
              params: torch.Tensor, mix: torch.Tensor, mid: torch.Tensor, inp: torch.Tensor, meta: torch.Tensor,
              an_idx: torch.Tensor, cp_idx: torch.Tensor, z_idx: torch.Tensor, order: torch.Tensor,
              level_steps: list[int], level_channels: list[int], hidden: int, affine: bool, lu: bool,
              logscale_factor: float, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dparams, dmix)."""
    tables = _launcher_tables(impl, meta, an_idx, cp_idx, z_idx, order)
    return backend.kernels(impl, "glow").glow_bwd(dz, dlog_det, dlog_prior, z, params, mix, mid, inp, *tables,
                                                  level_steps, level_channels, hidden, affine, lu, logscale_factor)


@_glow_bwd.register_fake
def _(dz, dlog_det, dlog_prior, z, params, mix, mid, inp, meta, an_idx, cp_idx, z_idx, order, level_steps,
      level_channels, hidden, affine, lu, logscale_factor, impl):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(params), torch.empty_like(mix)


def _glow_setup_context(ctx, inputs, output):
    (x, params, mix, meta, an_idx, cp_idx, z_idx, order, level_steps, level_channels, hidden, affine, lu,
     logscale_factor, save, impl) = inputs
    z, _, _, mid, inp = output
    ctx.save_for_backward(z, params, mix, mid, inp, meta, an_idx, cp_idx, z_idx, order)
    ctx.levels = (list(level_steps), list(level_channels))
    ctx.hidden, ctx.affine, ctx.lu, ctx.logscale_factor, ctx.impl = hidden, affine, lu, logscale_factor, impl


def _backward_kernel(dz, dlog_det, dlog_prior, z, params, mix, mid, inp, meta, an_idx, cp_idx, z_idx, order, levels,
                     hidden, affine, lu, logscale_factor, impl):
    """(dx, dparams, dmix) through the glow_bwd op, with autograd's None gradients made explicit."""
    if mid.numel() == 0:
        raise RuntimeError("flowkern glow: backward through a forward that did not save its activations "
                           "(it ran with save=False)")
    dz = torch.zeros_like(z) if dz is None else dz
    acc = compute_dtype(z.dtype)
    dlog_det = z.new_zeros(z.shape[0], dtype=acc) if dlog_det is None else dlog_det.contiguous()
    dlog_prior = z.new_zeros(z.shape[0], dtype=acc) if dlog_prior is None else dlog_prior.contiguous()
    level_steps, level_channels = levels
    return _glow_bwd(dz, dlog_det, dlog_prior, z, params, mix, mid, inp, meta, an_idx, cp_idx, z_idx, order,
                     level_steps, level_channels, hidden, affine, lu, logscale_factor, impl)


def _glow_backward(ctx, dz, dlog_det, dlog_prior, _dmid, _dinp):
    dx, dparams, dmix = _backward_kernel(dz, dlog_det, dlog_prior, *ctx.saved_tensors, ctx.levels, ctx.hidden,
                                         ctx.affine, ctx.lu, ctx.logscale_factor, ctx.impl)
    return (dx, dparams, dmix if ctx.lu else None) + (None,) * 13


_glow_fwd.register_autograd(_glow_backward, setup_context=_glow_setup_context)


class _GlowFunction(torch.autograd.Function):
    """glow_fwd over the parameter tensors themselves (eager calls): one autograd node whose backward hands each
    tensor its slice of the packed gradient. Packing under autograd instead (a cat, then a view per tensor on the
    way back) costs more host time than the CPU kernels themselves at batch 64 with BERT-flow's ~100 tensors.
    Inside, glow_fwd runs without grad: its own registered autograd (what torch.compile traces) stays out."""

    @staticmethod
    def forward(ctx, x, mix, plan, save, impl, *params):
        packed = _concatenate(params)
        z, log_det, log_prior, mid, inp = _glow_fwd(x, packed, mix, plan.meta, plan.an_idx, plan.cp_idx, plan.z_idx,
                                                    plan.order, plan.level_steps, plan.level_channels, plan.hidden,
                                                    plan.affine, plan.lu, plan.logscale_factor, save, impl)
        ctx.save_for_backward(z, packed, mix, mid, inp)
        ctx.plan, ctx.impl, ctx.params = plan, impl, params
        return z, log_det, log_prior

    @staticmethod
    def backward(ctx, dz, dlog_det, dlog_prior):
        plan = ctx.plan
        z, packed, mix, mid, inp = ctx.saved_tensors
        dx, dpacked, dmix = _backward_kernel(dz, dlog_det, dlog_prior, z, packed, mix, mid, inp, plan.meta,
                                             plan.an_idx, plan.cp_idx, plan.z_idx, plan.order,
                                             (plan.level_steps, plan.level_channels), plan.hidden, plan.affine,
                                             plan.lu, plan.logscale_factor, ctx.impl)
        dparams = _unflatten_dense_tensors(dpacked, ctx.params)
        return (dx, dmix if plan.lu else None, None, None, None, *dparams)

@torch.library.custom_op("flowkern::glow_inv", mutates_args=())
def _glow_inv(z: torch.Tensor, params: torch.Tensor, mix: torch.Tensor, meta: torch.Tensor, an_idx: torch.Tensor,
              cp_idx: torch.Tensor, z_idx: torch.Tensor, order: torch.Tensor, hidden: int, affine: bool, lu: bool,
              logscale_factor: float, impl: str) -> torch.Tensor:
    tables = _launcher_tables(impl, meta, an_idx, cp_idx, z_idx, order)
    return backend.kernels(impl, "glow").glow_inv(z, params, mix, *tables, hidden, affine, lu, logscale_factor)


@_glow_inv.register_fake
def _(z, params, mix, meta, an_idx, cp_idx, z_idx, order, hidden, affine, lu, logscale_factor, impl):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


# ---- public entry points ----

def _check(t: torch.Tensor, plan: GlowPlan, params: torch.Tensor, mix: torch.Tensor, where: str) -> None:
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
    if torch.compiler.is_compiling():   # traced: the custom op and its registered autograd
        z, log_det, log_prior, _, _ = _glow_fwd(x, _flatten(params), mix, plan.meta, plan.an_idx, plan.cp_idx,
                                                plan.z_idx, plan.order, plan.level_steps, plan.level_channels,
                                                plan.hidden, plan.affine, plan.lu, plan.logscale_factor, save, impl)
    else:
        z, log_det, log_prior = _GlowFunction.apply(x, mix, plan, save, impl, *params)
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
    return _glow_inv(z, _concatenate(params), mix, plan.meta, plan.an_idx, plan.cp_idx, plan.z_idx, plan.order,
                     plan.hidden, plan.affine, plan.lu, plan.logscale_factor, impl)
