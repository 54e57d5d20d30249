"""The built-in coupling networks: C_in channels -> C_out channels, last layer zero-initialized (identity flow)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .actnorm import ActNorm

LOGSCALE_FACTOR = 3.0


class ZeroLinear(nn.Module):
    """(x @ W^T + b) * exp(3 * logs), all zero at init, so a fresh coupling is the identity."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.logs = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * torch.exp(LOGSCALE_FACTOR * self.logs)


class ZeroConv2d(nn.Module):
    """3x3 convolution with bias, scaled by exp(3 * logs), all zero at init."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(LOGSCALE_FACTOR * self.logs)


class MLPSubnet(nn.Module):
    """BERT-flow's coupling net: Linear(no bias)+ActNorm, ReLU, twice, then ZeroLinear.

    On [B, C, H, W] it acts on each pixel (a 1x1 convolution), which is what the original Glow-on-1x1-images does.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32):
        super().__init__()
        self.linear1 = nn.Linear(in_channels, hidden, bias=False)
        self.actnorm1 = ActNorm(hidden)
        self.linear2 = nn.Linear(hidden, hidden, bias=False)
        self.actnorm2 = ActNorm(hidden)
        self.out = ZeroLinear(hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x if x.dim() == 2 else x.movedim(1, -1).reshape(-1, x.shape[1])
        h = rows.to(self.linear1.weight.dtype)
        h = F.relu(self.actnorm1._forward(self.linear1(h))[0])
        h = F.relu(self.actnorm2._forward(self.linear2(h))[0])
        h = self.out(h)
        if x.dim() == 2:
            return h
        b, _, height, width = x.shape
        return h.reshape(b, height, width, -1).movedim(-1, 1)


class ConvSubnet(nn.Module):
    """Glow's coupling net for images: 3x3 conv+ActNorm, ReLU, 1x1 conv+ActNorm, ReLU, zero-init 3x3 conv.

    A [B, C] input is treated as a 1x1 image.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False)
        self.actnorm1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.actnorm2 = ActNorm(hidden)
        self.out = ZeroConv2d(hidden, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x if x.dim() == 4 else x[:, :, None, None]
        h = image.to(self.conv1.weight.dtype)
        h = F.relu(self.actnorm1._forward(self.conv1(h))[0])
        h = F.relu(self.actnorm2._forward(self.conv2(h))[0])
        h = self.out(h)
        return h if x.dim() == 4 else h[:, :, 0, 0]
