"""The contract every flow layer of flowkern.nn follows (FlowLayer), and the zero log-det of volume-preserving ones.

A flow layer maps data to latent with `forward(x) -> (y, log_det)` and back with `inverse(y) -> x`. x and y are
float [B, C] or [B, C, H, W] tensors (fp16, bf16, fp32 or fp64); log_det is [B]: log |det dy/dx| per sample, summed
over channels and pixels, in float32 (float64 for float64 input), so that log p(x) = log p(y) + log_det.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_input, compute_dtype


class FlowLayer(nn.Module):
    """Base of the invertible layers: checks the input once, then runs the subclass's maths.

    `forward(x)` and `inverse(y)` check their input (tensor, float dtype, [B, C] or [B, C, H, W], the channel
    count, a non-empty batch, the device of the layer's parameters, and NaN/Inf while finite checks are on) and
    raise ValueError naming the layer, then call `_forward(x) -> (y, log_det)` or `_inverse(y) -> x`. Those two are
    what a subclass implements; a composite layer calls its parts' `_forward` / `_inverse` directly, so one check
    at the outermost layer covers the whole call.

    Subclasses set `channels` (the count forward's input must have; None: any) and may override
    `latent_channels` (the count inverse's input must have; default `channels`) and `_check` (extra structural
    checks, calling the base's first or after).
    """

    channels: int | None = None

    @property
    def latent_channels(self) -> int | None:
        """The channel count `inverse` expects (None: any)."""
        return self.channels

    def forward(self, x: torch.Tensor):
        self._check(x, type(self).__name__, inverse=False)
        return self._forward(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, f"{type(self).__name__}.inverse", inverse=True)
        return self._inverse(y)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _inverse")

    def _check(self, x: torch.Tensor, where: str, inverse: bool) -> None:
        """Raise ValueError (TypeError for a non-tensor) unless x is valid input for this layer; `where` names the
        call in the message."""
        channels = self.latent_channels if inverse else self.channels
        if channels is None:   # any count: the check still covers dtype, rank, batch and values
            channels = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() > 1 else -1
        check_input(x, channels, where, like=self._device_reference())

    def _device_reference(self) -> torch.Tensor | None:
        """A tensor on the layer's device (its first parameter, else its first buffer; None for neither): the input
        must be on the same device."""
        reference = next(self.parameters(), None)
        return reference if reference is not None else next(self.buffers(), None)


def zero_log_det(x: torch.Tensor) -> torch.Tensor:
    """The [B] log-det of a volume-preserving map of x: zeros in x's compute dtype, on x's device."""
    return torch.zeros(x.shape[0], dtype=compute_dtype(x.dtype), device=x.device)
