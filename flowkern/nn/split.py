"""The multi-scale layers: Split (factor half the channels out under the prior) and Squeeze (space to depth)."""
from __future__ import annotations

import torch

from .. import ops
from .._checks import check_input
from .layer import FlowLayer, zero_log_det


class Split(FlowLayer):
    """Multi-scale split: keep the first half(C) channels, factor out the rest under an N(0, I) prior.

    forward(x) -> (kept, log_p): x [B, C] or [B, C, H, W]; kept [B, half(C), ...]; log_p [B] (float32, float64 for
    float64 input) is the prior log-density of the factored channels, the term the split adds to log p(x) where
    other layers add a log-det. forward(x, return_factored=True) also returns the factored channels.
    inverse(kept, factored=None, temperature=1.0) draws the factored channels from the prior when not given.
    """

    def __init__(self, channels: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"Split: needs at least 2 channels, got {channels}")
        self.channels = channels
        self.kept_channels = ops.half(channels)

    @property
    def latent_channels(self) -> int:
        return self.kept_channels

    def forward(self, x: torch.Tensor, return_factored: bool = False):
        self._check(x, "Split", inverse=False)
        kept, log_p, factored = self._split(x)
        return (kept, log_p, factored) if return_factored else (kept, log_p)

    def _forward(self, x: torch.Tensor):
        return self._split(x)[:2]

    def _split(self, x: torch.Tensor):
        kept, factored = ops.split_channels(x)
        return kept, ops.gaussian_log_prob(factored), factored

    def inverse(self, y: torch.Tensor, factored: torch.Tensor | None = None, temperature: float = 1.0):
        self._check(y, "Split.inverse", inverse=True)
        return self._inverse(y, factored, temperature)

    def _inverse(self, y: torch.Tensor, factored: torch.Tensor | None = None, temperature: float = 1.0):
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


class Squeeze(FlowLayer):
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (Glow's space-to-depth); log_det [B] zeros. A [B, C] input passes unchanged.

    Any channel count (channels None); inverse needs a multiple of 4 channels for [B, C, H, W] input."""

    def _check(self, x: torch.Tensor, where: str, inverse: bool) -> None:
        if inverse and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] % 4:
            raise ValueError(f"{where}: channels must be a multiple of 4, got shape {tuple(x.shape)}")
        super()._check(x, where, inverse)
        if not inverse and x.dim() == 4 and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"{where}: height and width must be even to squeeze 2x2, got shape {tuple(x.shape)}")

    def _forward(self, x: torch.Tensor):
        return (ops.squeeze2d(x) if x.dim() == 4 else x), zero_log_det(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ops.unsqueeze2d(y) if y.dim() == 4 else y
