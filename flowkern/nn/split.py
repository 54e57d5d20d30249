from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .._checks import check_input
from .actnorm import zero_log_det


class Split(nn.Module):
    """Multi-scale split: keep the first half(C) channels, factor out the rest under an N(0, I) prior.

    forward(x) -> (kept, log_p) where log_p [B] is the prior log-density of the factored channels (the term the
    split adds to log p(x)); forward(x, return_factored=True) also returns the factored channels.
    inverse(kept, factored=None, temperature=1.0) draws the factored channels from the prior when not given.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split: needs at least 2 channels, got {channels}")
        self.channels = channels
        self.kept_channels = ops.half(channels)

    def forward(self, x: torch.Tensor, return_factored: bool = False):
        check_input(x, self.channels, "Split")
        kept, factored = ops.split_channels(x)
        log_p = ops.gaussian_log_prob(factored)
        return (kept, log_p, factored) if return_factored else (kept, log_p)

    def inverse(self, y: torch.Tensor, factored: torch.Tensor | None = None, temperature: float = 1.0):
        check_input(y, self.kept_channels, "Split.inverse")
        factored_shape = (y.shape[0], self.channels - self.kept_channels) + tuple(y.shape[2:])
        if factored is None:
            factored = torch.randn(factored_shape, dtype=y.dtype, device=y.device) * temperature
        else:
            check_input(factored, factored_shape[1], "Split.inverse (factored)", like=y)
            if tuple(factored.shape) != factored_shape:
                raise ValueError(f"Split.inverse: factored has shape {tuple(factored.shape)}, "
                                 f"expected {factored_shape}")
        return torch.cat([y, factored.to(y.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"{self.channels}"


class Squeeze(nn.Module):
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (Glow's space-to-depth); log_det 0. A [B, C] input passes unchanged."""

    def forward(self, x: torch.Tensor):
        _check_squeezable(x, "Squeeze")
        return (ops.squeeze2d(x) if x.dim() == 4 else x), zero_log_det(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 4 and y.shape[1] % 4:
            raise ValueError(f"Squeeze.inverse: channels must be a multiple of 4, got shape {tuple(y.shape)}")
        check_input(y, y.shape[1] if y.dim() > 1 else -1, "Squeeze.inverse")
        return ops.unsqueeze2d(y) if y.dim() == 4 else y


def _check_squeezable(x: torch.Tensor, where: str) -> None:
    check_input(x, x.shape[1] if x.dim() > 1 else -1, where)
    if x.dim() == 4 and (x.shape[2] % 2 or x.shape[3] % 2):
        raise ValueError(f"{where}: height and width must be even to squeeze 2x2, got shape {tuple(x.shape)}")
