from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import check_input, compute_dtype
from .actnorm import zero_log_det

MIXINGS = ("lu", "reverse", "random")


class InvConv1x1(nn.Module):
    """Invertible channel mixing.

    mixing="lu": W = P L (U + diag(sign_s * exp(log_s))), initialized from the LU of a random rotation;
    log_det = sum(log_s) * H * W. mixing="reverse": the fixed channel reversal of the original BERT-flow
    config (log_det 0). mixing="random": a fixed random permutation (log_det 0).
    In eval mode W and W^-1 are cached; the cache is dropped when parameters change or train() is called.
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
        self._cache: dict[str, object] = {}

    def _factors(self):
        return self.perm, self.lower, self.upper, self.sign_s, self.log_s

    def _cache_key(self):
        # id() as well: a replaced parameter can reuse a freed address with version 0.
        return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in self._factors())

    def _cacheable(self) -> bool:
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        return not self.training and not needs_grad

    def _cached(self, name: str, compute):
        if not self._cacheable():
            return compute()
        key = self._cache_key()
        if self._cache.get("key") != key:
            self._cache = {"key": key}
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    def train(self, mode: bool = True):
        self._cache = {}
        return super().train(mode)

    def weight(self):
        """(W [C, C], log |det W|)."""
        if self.mixing != "lu":
            raise ValueError(f"InvConv1x1.weight: mixing={self.mixing!r} is a fixed permutation with no LU weight")
        return self._cached("weight", lambda: ops.lu_weight(*self._factors()))

    def inverse_weight(self) -> torch.Tensor:
        """W^-1 [C, C] in float64 from triangular solves on the factors (cached like weight())."""
        if self.mixing != "lu":
            raise ValueError(f"InvConv1x1.inverse_weight: mixing={self.mixing!r} is a fixed permutation")
        return self._cached("inverse_weight", lambda: ops.lu_inverse_weight(*self._factors()))

    def forward(self, x: torch.Tensor):
        check_input(x, self.channels, "InvConv1x1", like=self.perm)
        return self._forward(x)

    def _forward(self, x: torch.Tensor):
        if self.mixing != "lu":
            return ops.permute_channels(x, self.perm), zero_log_det(x)
        weight, log_det_per_pixel = self.weight()
        log_det = (log_det_per_pixel.to(compute_dtype(x.dtype)) * x[0, 0].numel()).expand(x.shape[0])
        return ops.invconv(x, weight), log_det.contiguous()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_input(y, self.channels, "InvConv1x1.inverse", like=self.perm)
        return self._inverse(y)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mixing != "lu":
            return ops.permute_channels(y, torch.argsort(self.perm))
        if self._cacheable():
            return ops.invconv(y, self.inverse_weight())
        return ops.invconv_inverse(y, *self._factors())

    def extra_repr(self) -> str:
        return f"{self.channels}, mixing={self.mixing!r}"
