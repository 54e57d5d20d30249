"""ActNorm: a per-channel affine map with data-dependent init; the context-local switch that suspends that init."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

from .. import ops
from .layer import FlowLayer


class ActNorm(FlowLayer):
    """y = (x + bias) * exp(logscale_factor * logs) per channel, with data-dependent init (DDI).

    x, y: [B, C] or [B, C, H, W] with C = channels. log_det [B] = H * W * logscale_factor * sum(logs) (H * W = 1
    for [B, C]). With ddi=True the first forward in training mode sets bias and logs so that the batch gets zero mean and
    unit variance per channel. `initialized` is a saved buffer: loading a checkpoint never re-initializes.
    """

    def __init__(self, channels: int, logscale_factor: float = 3.0, ddi: bool = True):
        super().__init__()
        if channels < 1:
            raise ValueError(f"ActNorm: channels must be >= 1, got {channels}")
        self.channels = channels
        self.logscale_factor = float(logscale_factor)
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(not ddi))
        # Reading the buffer costs a host sync on GPU; remember once it is known to be set.
        self._known_initialized = not ddi
        self.register_load_state_dict_post_hook(_forget_initialized)

    def ddi_pending(self) -> bool:
        """Whether the next call runs the data-dependent init (only the unfused ActNorm forward does it)."""
        if not self.training or self._known_initialized:
            return False
        # Compiled graphs never read the ContextVar (a graph break); a pending init breaks the graph anyway.
        if not torch.compiler.is_compiling() and _ddi_suspended.get():
            return False
        if bool(self.initialized):  # set by a checkpoint: read once (a host sync on GPU), then remembered
            self._known_initialized = True
            return False
        return True

    def _forward(self, x: torch.Tensor):
        if self.ddi_pending():
            self.data_init(x)
        return ops.actnorm(x, self.bias, self.logs, self.logscale_factor)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor) -> None:
        """Set bias and logs from a batch so that it comes out with zero mean and unit variance per channel."""
        values = x.detach().transpose(0, 1).reshape(self.channels, -1).double()
        if values.shape[1] < 2:
            raise ValueError(
                f"ActNorm data-dependent init needs at least 2 values per channel, got a batch of shape "
                f"{tuple(x.shape)}; initialize on a larger batch or construct with ddi=False")
        mean, std = values.mean(1), values.std(1, unbiased=False)
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(1.0 / (std + 1e-6)) / self.logscale_factor)
        self.initialized.fill_(True)
        self._known_initialized = True

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return ops.actnorm_inverse(y, self.bias, self.logs, self.logscale_factor)

    def extra_repr(self) -> str:
        return f"{self.channels}, logscale_factor={self.logscale_factor}"


def _forget_initialized(module: ActNorm, incompatible_keys) -> None:
    module._known_initialized = False


# Context-local: one thread's inverse pass must not skip another thread's (or task's) data-dependent init.
_ddi_suspended: contextvars.ContextVar[bool] = contextvars.ContextVar("flowkern_ddi_suspended", default=False)


@contextlib.contextmanager
def suspend_ddi() -> Iterator[None]:
    """No data-dependent init inside (this thread / task only): inverse passes run coupling subnets on latents,
    which must not set the init meant for data."""
    token = _ddi_suspended.set(True)
    try:
        yield
    finally:
        _ddi_suspended.reset(token)
