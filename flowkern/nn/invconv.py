"""InvConv1x1: invertible channel mixing (an LU-parametrized 1x1 convolution, or a fixed permutation)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .. import ops
from .._checks import compute_dtype
from .layer import FlowLayer, zero_log_det

MIXINGS = ("lu", "reverse", "random")


class InvConv1x1(FlowLayer):
    """Invertible channel mixing: y = W x per sample and pixel, x and y [B, C] or [B, C, H, W] with C = channels.

    mixing="lu": W = P L (U + diag(sign_s * exp(log_s))), initialized from the LU of a random rotation;
    log_det = sum(log_s) * H * W. mixing="reverse": the fixed channel reversal of the original BERT-flow
    config (log_det 0). mixing="random": a fixed random permutation (log_det 0).
    W and W^-1 are computed from the factors on every call, except inside `frozen()` (inference loops).
    """

    def __init__(self, channels: int, mixing: str = "lu"):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"InvConv1x1: mixing must be one of {MIXINGS}, got {mixing!r}")
        if channels < 1:
            raise ValueError(f"InvConv1x1: channels must be >= 1, got {channels}")
        self.channels, self.mixing = channels, mixing
        if mixing == "lu":
            rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
            p, lower, upper = torch.linalg.lu(rotation)
            s = torch.diagonal(upper)
            self.register_buffer("perm", p.argmax(dim=1))
            self.register_buffer("sign_s", torch.sign(s).float())
            self.lower = nn.Parameter(torch.tril(lower, -1).float())
            self.upper = nn.Parameter(torch.triu(upper, 1).float())
            self.log_s = nn.Parameter(torch.log(s.abs()).float())
        elif mixing == "reverse":
            self.register_buffer("perm", torch.arange(channels - 1, -1, -1))
        else:
            self.register_buffer("perm", torch.randperm(channels))
        # W and W^-1 inside frozen() (None outside): computed once there, from the factors as they are then.
        self._frozen: dict[str, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(_forget_frozen)

    def _factors(self):
        return self.perm, self.lower, self.upper, self.sign_s, self.log_s

    def _reuses(self) -> bool:
        """Whether this call may reuse what frozen() computed: inside the block, when no gradient is needed."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return self._frozen is not None and not needs_grad

    def _once(self, name: str, compute):
        if not self._reuses():
            return compute()
        if name not in self._frozen:
            self._frozen[name] = compute()
        return self._frozen[name]

    @contextlib.contextmanager
    def frozen(self) -> Iterator["InvConv1x1"]:
        """Inside the block, calls without gradients compute W (and W^-1) once and reuse them. Every other call
        computes them from the factors as they are then, whatever wrote those (an optimizer, `.data`, a checkpoint);
        inside the block a write is seen only through load_state_dict."""
        if self._frozen is not None:   # nested: the outer block's W stands until the outer block ends
            yield self
            return
        self._frozen = {}
        try:
            yield self
        finally:
            self._frozen = None

    def weight(self):
        """(W [C, C], log |det W|)."""
        if self.mixing != "lu":
            raise ValueError(f"InvConv1x1.weight: mixing={self.mixing!r} is a fixed permutation with no LU weight")
        return self._once("weight", lambda: ops.lu_weight(*self._factors()))

    def inverse_weight(self) -> torch.Tensor:
        """W^-1 [C, C] in float64 from triangular solves on the factors (reused inside frozen(), like weight())."""
        if self.mixing != "lu":
            raise ValueError(f"InvConv1x1.inverse_weight: mixing={self.mixing!r} is a fixed permutation")
        return self._once("inverse_weight", lambda: ops.lu_inverse_weight(*self._factors()))

    def _forward(self, x: torch.Tensor):
        if self.mixing != "lu":
            return ops.permute_channels(x, self.perm), zero_log_det(x)
        weight, log_det_per_pixel = self.weight()
        log_det = (log_det_per_pixel.to(compute_dtype(x.dtype)) * x[0, 0].numel()).expand(x.shape[0])
        return ops.invconv(x, weight), log_det.contiguous()

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mixing != "lu":
            return ops.permute_channels(y, torch.argsort(self.perm))
        if self._reuses():
            return ops.invconv(y, self.inverse_weight())
        return ops.invconv_inverse(y, *self._factors())

    def extra_repr(self) -> str:
        return f"{self.channels}, mixing={self.mixing!r}"


def _forget_frozen(module: InvConv1x1, incompatible_keys) -> None:
    if module._frozen is not None:   # a checkpoint loaded inside frozen() is seen by the next call
        module._frozen.clear()
