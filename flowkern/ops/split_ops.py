"""Multi-scale reshaping without arithmetic: halving channels (the split between Glow levels and the coupling's
halves) and the 2x2 squeeze of images. Plain views and permutes, the same on every backend."""
from __future__ import annotations

import torch


def half(channels: int) -> int:
    """Size of the first part whenever channels are halved (the extra channel of an odd count goes first)."""
    return (channels + 1) // 2


def split_channels(x: torch.Tensor):
    k = half(x.shape[1])
    return x[:, :k], x[:, k:]


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2], channel order as in Glow (each channel's 2x2 block kept together)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)
