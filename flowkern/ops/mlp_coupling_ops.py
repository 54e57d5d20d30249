"""The BERT-flow coupling with its built-in MLP subnet as one op: z2 = coupling_epilogue(x2, MLP(x1)) on [B, C] data.

MLP (flowkern.nn.subnets.MLPSubnet; f = logscale_factor):
    h1 = relu(actnorm(x1 @ w1^T; b1, l1)),  h2 = relu(actnorm(h1 @ w2^T; b2, l2)),
    h  = (h2 @ w3^T + b3) * exp(f * l3)                                           (ZeroLinear)
then the additive or affine epilogue of flowkern.ops.coupling_epilogue_ops. Kernel backends run the whole thing in one
kernel forward and one backward, keeping the hidden activations on chip (flowkern/kernels/triton/mlp_coupling.py).
The references are the composition of the existing reference pieces, computing the subnet in the parameters'
dtype as MLPSubnet does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backend
from .actnorm_ops import actnorm_ref
from .coupling_epilogue_ops import coupling_epilogue_inverse_ref, coupling_epilogue_ref
from .spec import BACKENDS, MlpParams, OpSpec, like, per_row

# Kernels keep a [rows, hidden] tile of each hidden layer in registers; wider subnets use the unfused path.
MAX_FUSED_HIDDEN = 64


def mlp_subnet_ref(x1, mlp: MlpParams, logscale_factor):
    h = x1.to(mlp.w1.dtype)
    h = F.relu(actnorm_ref(F.linear(h, mlp.w1), mlp.b1, mlp.l1, logscale_factor)[0])
    h = F.relu(actnorm_ref(F.linear(h, mlp.w2), mlp.b2, mlp.l2, logscale_factor)[0])
    return F.linear(h, mlp.w3, mlp.b3) * torch.exp(logscale_factor * mlp.l3)


def mlp_coupling_ref(x1, x2, mlp: MlpParams, affine: bool, logscale_factor: float):
    return coupling_epilogue_ref(x2, mlp_subnet_ref(x1, mlp, logscale_factor), affine)


def mlp_coupling_inverse_ref(x1, z2, mlp: MlpParams, affine: bool, logscale_factor: float):
    return coupling_epilogue_inverse_ref(z2, mlp_subnet_ref(x1, mlp, logscale_factor), affine)


# ---- custom ops: forward and inverse, each with its backward ----

def _input_and_param_grads(x1, other, mlp, affine, logscale_factor) -> list[torch.Tensor]:
    """[dx1 (through the subnet), d other, one per member of mlp]; the kernels keep the data's layout."""
    return [torch.empty_like(x1), torch.empty_like(other)] + [like(p) for p in mlp]


_MLP_ARGS = (("mlp", MlpParams), ("affine", bool), ("logscale_factor", float))
MLP_COUPLING_BWD = OpSpec(
    "mlp_coupling_bwd", "mlp_coupling",
    (("grad_z2", torch.Tensor), ("grad_log_det", torch.Tensor), ("x1", torch.Tensor), ("x2", torch.Tensor))
    + _MLP_ARGS, lambda grad_z2, grad_log_det, *args: _input_and_param_grads(*args), "Tensor[]")
MLP_COUPLING_FWD = OpSpec(
    "mlp_coupling_fwd", "mlp_coupling", (("x1", torch.Tensor), ("x2", torch.Tensor)) + _MLP_ARGS,
    lambda x1, x2, mlp, affine, f: (torch.empty_like(x2), per_row(x2)), "(Tensor, Tensor)",
    differentiable=("x1", "x2", "mlp"), backward=MLP_COUPLING_BWD)
MLP_COUPLING_INV_BWD = OpSpec(
    "mlp_coupling_inv_bwd", "mlp_coupling",
    (("grad_x2", torch.Tensor), ("x1", torch.Tensor), ("z2", torch.Tensor)) + _MLP_ARGS,
    lambda grad_x2, *args: _input_and_param_grads(*args), "Tensor[]")
MLP_COUPLING_INV = OpSpec(
    "mlp_coupling_inv", "mlp_coupling", (("x1", torch.Tensor), ("z2", torch.Tensor)) + _MLP_ARGS,
    lambda x1, z2, mlp, affine, f: torch.empty_like(z2), "Tensor",
    differentiable=("x1", "z2", "mlp"), backward=MLP_COUPLING_INV_BWD)


# ---- public entry points ----

def _check_fusable(x1, other, mlp: MlpParams, affine: bool, where: str) -> MlpParams:
    """Shapes are checked here, not in the kernels, which would read out of bounds on a mismatch."""
    if not isinstance(mlp, tuple) or len(mlp) != len(MlpParams._fields):
        raise TypeError(f"{where}: mlp must be an MlpParams of {len(MlpParams._fields)} tensors "
                        f"{MlpParams._fields}, got {type(mlp).__name__}")
    mlp = MlpParams(*mlp)
    if x1.dim() != 2 or other.dim() != 2 or x1.shape[0] != other.shape[0]:
        raise ValueError(f"{where}: fused MLP coupling takes [B, C1] and [B, C2] data, got shapes "
                         f"{tuple(x1.shape)} and {tuple(other.shape)}")
    hidden, outputs = mlp.w1.shape[0], other.shape[1] * (2 if affine else 1)
    expected = MlpParams((hidden, x1.shape[1]), (hidden,), (hidden,), (hidden, hidden), (hidden,), (hidden,),
                         (outputs, hidden), (outputs,), (outputs,))
    actual = MlpParams(*(tuple(p.shape) for p in mlp))
    if actual != expected:
        raise ValueError(f"{where}: subnet parameter shapes {actual} do not fit x1 {tuple(x1.shape)} and "
                         f"{'affine' if affine else 'additive'} coupling of {other.shape[1]} channels; "
                         f"expected {expected}")
    if hidden > MAX_FUSED_HIDDEN:
        raise ValueError(f"{where}: kernel backends fuse MLP subnets of hidden width <= {MAX_FUSED_HIDDEN}, "
                         f"got {hidden}; use the unfused ops (coupling_epilogue after the subnet)")
    return mlp


def mlp_coupling(x1: torch.Tensor, x2: torch.Tensor, mlp: MlpParams, affine: bool, logscale_factor: float = 3.0):
    """(z2, log_det[B]) = coupling_epilogue(x2, MLP(x1), affine) for [B, C1] x1 and [B, C2] x2.

    mlp: the subnet's MlpParams, O = C2 (additive) or 2*C2 (affine) outputs; every scale is exp(logscale_factor * l).
    The returned z2 excludes x1: the coupling's output is cat([x1, z2]).
    """
    mlp = _check_fusable(x1, x2, mlp, affine, "mlp_coupling")
    impl = backend.resolve(x2, "mlp_coupling", BACKENDS)
    if impl == "torch":
        return mlp_coupling_ref(x1, x2, mlp, affine, logscale_factor)
    return MLP_COUPLING_FWD(x1, x2, mlp, bool(affine), float(logscale_factor), impl=impl)


def mlp_coupling_inverse(x1: torch.Tensor, z2: torch.Tensor, mlp: MlpParams, affine: bool,
                         logscale_factor: float = 3.0):
    """x2 with mlp_coupling(x1, x2, ...)[0] = z2 (x1 passes through a coupling unchanged)."""
    mlp = _check_fusable(x1, z2, mlp, affine, "mlp_coupling_inverse")
    impl = backend.resolve(z2, "mlp_coupling_inverse", BACKENDS)
    if impl == "torch":
        return mlp_coupling_inverse_ref(x1, z2, mlp, affine, logscale_factor)
    return MLP_COUPLING_INV(x1, z2, mlp, bool(affine), float(logscale_factor), impl=impl)
