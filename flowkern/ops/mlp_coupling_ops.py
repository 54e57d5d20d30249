"""The BERT-flow coupling with its built-in MLP subnet as one op: z2 = coupling(x2, MLP(x1)) on [B, C] data.

MLP (flowkern.nn.subnets.MLPSubnet; f = logscale_factor):
    h1 = relu(actnorm(x1 @ w1^T; b1, l1)),  h2 = relu(actnorm(h1 @ w2^T; b2, l2)),
    h  = (h2 @ w3^T + b3) * exp(f * l3)                                           (ZeroLinear)
then the additive or affine epilogue of flowkern.ops.coupling_ops. Kernel backends run the whole thing in one kernel
forward and one backward, keeping the hidden activations on chip (flowkern/kernels/triton/mlp_coupling.py).
The references are the composition of the existing reference pieces, computing the subnet in the parameters'
dtype as MLPSubnet does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from .._checks import compute_dtype
from .actnorm_ops import actnorm_ref
from .coupling_ops import coupling_inverse_ref, coupling_ref

# Kernels keep a [rows, hidden] tile of each hidden layer in registers; wider subnets use the unfused path.
MAX_FUSED_HIDDEN = 64

_KERNEL_BACKENDS = ("triton", "cuda", "cpp")


def mlp_subnet_ref(x1, w1, b1, l1, w2, b2, l2, w3, b3, l3, logscale_factor):
    h = x1.to(w1.dtype)
    h = F.relu(actnorm_ref(F.linear(h, w1), b1, l1, logscale_factor)[0])
    h = F.relu(actnorm_ref(F.linear(h, w2), b2, l2, logscale_factor)[0])
    return F.linear(h, w3, b3) * torch.exp(logscale_factor * l3)


def mlp_coupling_ref(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine: bool, logscale_factor: float):
    h = mlp_subnet_ref(x1, w1, b1, l1, w2, b2, l2, w3, b3, l3, logscale_factor)
    return coupling_ref(x2, h, affine)


def mlp_coupling_inverse_ref(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine: bool, logscale_factor: float):
    h = mlp_subnet_ref(x1, w1, b1, l1, w2, b2, l2, w3, b3, l3, logscale_factor)
    return coupling_inverse_ref(z2, h, affine)


# ---- custom ops: forward and inverse, each with its backward ----
# Parameter order everywhere: w1, b1, l1, w2, b2, l2, w3, b3, l3.

@torch.library.custom_op("flowkern::mlp_coupling_fwd", mutates_args=())
def _mlp_coupling_fwd(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, l1: torch.Tensor,
                      w2: torch.Tensor, b2: torch.Tensor, l2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                      l3: torch.Tensor, affine: bool, logscale_factor: float,
                      impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backend.kernels(impl, "mlp_coupling").mlp_coupling_fwd(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3,
                                                                   affine, logscale_factor)


@_mlp_coupling_fwd.register_fake
def _(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl):
    return torch.empty_like(x2), x2.new_empty(x2.shape[0], dtype=compute_dtype(x2.dtype))


def _input_and_param_grads_like(x1, other, params) -> list[torch.Tensor]:
    return [torch.empty_like(x1), torch.empty_like(other)] + [torch.empty_like(p) for p in params]


@torch.library.custom_op("flowkern::mlp_coupling_bwd", mutates_args=())
def _mlp_coupling_bwd(dz2: torch.Tensor, dlog_det: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
                      w1: torch.Tensor, b1: torch.Tensor, l1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                      l2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, l3: torch.Tensor, affine: bool,
                      logscale_factor: float, impl: str) -> list[torch.Tensor]:
    """[dx1 (through the subnet), dx2, dw1, db1, dl1, dw2, db2, dl2, dw3, db3, dl3]."""
    return list(backend.kernels(impl, "mlp_coupling").mlp_coupling_bwd(
        dz2, dlog_det, x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor))


@_mlp_coupling_bwd.register_fake
def _(dz2, dlog_det, x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl):
    return _input_and_param_grads_like(x1, x2, (w1, b1, l1, w2, b2, l2, w3, b3, l3))


def _save_inputs(ctx, inputs, output):
    *tensors, affine, logscale_factor, impl = inputs
    ctx.save_for_backward(*tensors)
    ctx.affine, ctx.logscale_factor, ctx.impl = affine, logscale_factor, impl


def _mlp_coupling_backward(ctx, dz2, dlog_det):
    grads = _mlp_coupling_bwd(dz2, dlog_det, *ctx.saved_tensors, ctx.affine, ctx.logscale_factor, ctx.impl)
    return (*grads, None, None, None)


_mlp_coupling_fwd.register_autograd(_mlp_coupling_backward, setup_context=_save_inputs)


@torch.library.custom_op("flowkern::mlp_coupling_inv", mutates_args=())
def _mlp_coupling_inv(x1: torch.Tensor, z2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, l1: torch.Tensor,
                      w2: torch.Tensor, b2: torch.Tensor, l2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                      l3: torch.Tensor, affine: bool, logscale_factor: float, impl: str) -> torch.Tensor:
    return backend.kernels(impl, "mlp_coupling").mlp_coupling_inv(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3,
                                                                   affine, logscale_factor)


@_mlp_coupling_inv.register_fake
def _(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl):
    return torch.empty_like(z2)


@torch.library.custom_op("flowkern::mlp_coupling_inv_bwd", mutates_args=())
def _mlp_coupling_inv_bwd(dx2: torch.Tensor, x1: torch.Tensor, z2: torch.Tensor, w1: torch.Tensor,
                          b1: torch.Tensor, l1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, l2: torch.Tensor,
                          w3: torch.Tensor, b3: torch.Tensor, l3: torch.Tensor, affine: bool,
                          logscale_factor: float, impl: str) -> list[torch.Tensor]:
    """[dx1 (through the subnet), dz2, dw1, db1, dl1, dw2, db2, dl2, dw3, db3, dl3]."""
    return list(backend.kernels(impl, "mlp_coupling").mlp_coupling_inv_bwd(
        dx2, x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor))


@_mlp_coupling_inv_bwd.register_fake
def _(dx2, x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl):
    return _input_and_param_grads_like(x1, z2, (w1, b1, l1, w2, b2, l2, w3, b3, l3))


def _mlp_coupling_inv_backward(ctx, dx2):
    grads = _mlp_coupling_inv_bwd(dx2, *ctx.saved_tensors, ctx.affine, ctx.logscale_factor, ctx.impl)
    return (*grads, None, None, None)


_mlp_coupling_inv.register_autograd(_mlp_coupling_inv_backward, setup_context=_save_inputs)


# ---- public entry points ----

def _check_fusable(x1, other, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine: bool, where: str) -> None:
    """Shapes are checked here, not in the kernels, which would read out of bounds on a mismatch."""
    if x1.dim() != 2 or other.dim() != 2 or x1.shape[0] != other.shape[0]:
        raise ValueError(f"{where}: fused MLP coupling takes [B, C1] and [B, C2] data, got shapes "
                         f"{tuple(x1.shape)} and {tuple(other.shape)}")
    hidden, outputs = w1.shape[0], other.shape[1] * (2 if affine else 1)
    expected = [(hidden, x1.shape[1]), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,),
                (outputs, hidden), (outputs,), (outputs,)]
    actual = [tuple(p.shape) for p in (w1, b1, l1, w2, b2, l2, w3, b3, l3)]
    if actual != expected:
        raise ValueError(f"{where}: subnet parameter shapes {actual} do not fit x1 {tuple(x1.shape)} and "
                         f"{'affine' if affine else 'additive'} coupling of {other.shape[1]} channels; "
                         f"expected {expected}")
    if hidden > MAX_FUSED_HIDDEN:
        raise ValueError(f"{where}: kernel backends fuse MLP subnets of hidden width <= {MAX_FUSED_HIDDEN}, "
                         f"got {hidden}; use the unfused ops (coupling after the subnet)")


def mlp_coupling(x1: torch.Tensor, x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, l1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, l2: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor,
                 l3: torch.Tensor, affine: bool, logscale_factor: float = 3.0):
    """(z2, log_det[B]) = coupling(x2, MLP(x1), affine) for [B, C1] x1 and [B, C2] x2.

    w1 [H, C1], b1/l1 [H]: first Linear (no bias) and ActNorm; w2 [H, H], b2/l2 [H]: second; w3 [O, H], b3/l3 [O]:
    ZeroLinear with O = C2 (additive) or 2*C2 (affine). Every scale is exp(logscale_factor * l). The returned z2
    excludes x1: the coupling's output is cat([x1, z2]).
    """
    _check_fusable(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, "mlp_coupling")
    impl = backend.resolve(x2, "mlp_coupling", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return mlp_coupling_ref(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor)
    return _mlp_coupling_fwd(x1, x2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl)


def mlp_coupling_inverse(x1: torch.Tensor, z2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                         l1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, l2: torch.Tensor, w3: torch.Tensor,
                         b3: torch.Tensor, l3: torch.Tensor, affine: bool, logscale_factor: float = 3.0):
    """x2 with mlp_coupling(x1, x2, ...)[0] = z2 (x1 passes through a coupling unchanged)."""
    _check_fusable(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, "mlp_coupling_inverse")
    impl = backend.resolve(z2, "mlp_coupling_inverse", ("torch",) + _KERNEL_BACKENDS)
    if impl == "torch":
        return mlp_coupling_inverse_ref(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor)
    return _mlp_coupling_inv(x1, z2, w1, b1, l1, w2, b2, l2, w3, b3, l3, affine, logscale_factor, impl)
