"""Coupling layers: half the channels pass unchanged and condition an invertible map of the other half."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops import MlpParams
from ..ops.mlp_coupling_ops import MAX_FUSED_HIDDEN
from .actnorm import suspend_ddi
from .layer import FlowLayer
from .subnets import LOGSCALE_FACTOR, ConvSubnet, MLPSubnet


class _Coupling(FlowLayer):
    """x = [x1, x2] (x1 the first half(C) channels); h = subnet(x1); z2 = transform(x2, h); y = [x1, z2].

    x, y: [B, C] or [B, C, H, W] with C = channels >= 2. The subnet maps x1's half(C) channels to out_channels
    (C - half(C), twice that for affine). Built-in subnets: MLPSubnet (per pixel; fused into one op for [B, C]
    input) or ConvSubnet (image=True); a user's subnet must keep the batch and spatial shape.
    """

    affine = False

    def __init__(self, channels: int, hidden: int = 32, subnet: nn.Module | None = None, image: bool = False):
        super().__init__()
        if channels < 2:
            raise ValueError(f"{type(self).__name__}: needs at least 2 channels to split, got {channels}")
        self.channels = channels
        self.cond_channels = ops.half(channels)
        self.out_channels = (channels - self.cond_channels) * (2 if self.affine else 1)
        # Only the built-in MLP subnet runs fused (ops.mlp_coupling); user-supplied and conv subnets do not.
        self._builtin_mlp = subnet is None and not image and hidden <= MAX_FUSED_HIDDEN
        if subnet is None:
            net = ConvSubnet if image else MLPSubnet
            subnet = net(self.cond_channels, self.out_channels, hidden)
        self.subnet = subnet

    def _conditioner(self, x1: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        h = self.subnet(x1)
        expected = (like.shape[0], self.out_channels) + tuple(like.shape[2:])
        if tuple(h.shape) != expected:
            raise ValueError(f"{type(self).__name__}: subnet returned shape {tuple(h.shape)}, expected {expected} "
                             f"({self.cond_channels} channels in -> {self.out_channels} out)")
        return h

    def _fused_subnet_params(self, x: torch.Tensor):
        """The MLP subnet's parameters for ops.mlp_coupling, or None where the unfused path must run: other
        subnets, [B, C, H, W] data, and the first training call, whose subnet ActNorms may still need their DDI."""
        net = self.subnet
        if not self._builtin_mlp or type(net) is not MLPSubnet or x.dim() != 2:
            return None
        if net.actnorm1.ddi_pending() or net.actnorm2.ddi_pending():
            return None
        if not net.actnorm1.logscale_factor == net.actnorm2.logscale_factor == LOGSCALE_FACTOR:
            return None
        return MlpParams(net.linear1.weight, net.actnorm1.bias, net.actnorm1.logs, net.linear2.weight,
                         net.actnorm2.bias, net.actnorm2.logs, net.out.weight, net.out.bias, net.out.logs)

    def _forward(self, x: torch.Tensor):
        x1, x2 = ops.split_channels(x)
        params = self._fused_subnet_params(x)
        if params is None:
            z2, log_det = ops.coupling_epilogue(x2, self._conditioner(x1, x2), self.affine)
        else:
            z2, log_det = ops.mlp_coupling(x1, x2, params, self.affine, LOGSCALE_FACTOR)
        return torch.cat([x1, z2], dim=1), log_det

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        y1, z2 = ops.split_channels(y)
        with suspend_ddi():
            params = self._fused_subnet_params(y)
            if params is None:
                x2 = ops.coupling_epilogue_inverse(z2, self._conditioner(y1, z2), self.affine)
            else:
                x2 = ops.mlp_coupling_inverse(y1, z2, params, self.affine, LOGSCALE_FACTOR)
        return torch.cat([y1, x2], dim=1)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class AdditiveCoupling(_Coupling):
    """z2 = x2 + NN(x1); log_det = 0 (volume preserving): a [B] zero vector."""


class AffineCoupling(_Coupling):
    """shift, scale = h[:, 0::2], sigmoid(h[:, 1::2] + 2) with h = NN(x1); z2 = (x2 + shift) * scale;
    log_det [B] = sum of log(scale) over x2's channels and pixels."""

    affine = True
