"""Shared test utilities: randomized parameters (so no layer is an identity) and error measures."""
from __future__ import annotations

import torch

from flowkern.nn import ActNorm, Glow, InvConv1x1


@torch.no_grad()
def randomize_(module: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter away from its initial value and mark ActNorms initialized (no DDI surprise)."""
    for sub in module.modules():
        if isinstance(sub, ActNorm):
            sub.initialized.fill_(True)
        for name, p in sub.named_parameters(recurse=False):
            if isinstance(sub, InvConv1x1) and name in ("lower", "upper"):
                # Random triangular factors grow ill-conditioned with size; keep cond(W) near that of a rotation.
                p.add_(torch.randn_like(p) * scale / p.shape[0])
            else:
                p.add_(torch.randn_like(p) * scale)
    return module


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return (torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300)).item()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Element-wise worst case max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def random_input(batch: int, channels: int, image: bool, dtype=torch.float32, hw=(4, 6)) -> torch.Tensor:
    shape = (batch, channels, *hw) if image else (batch, channels)
    return (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(dtype)


def backends_for_invariants() -> tuple[list[str], list[str]]:
    """(every backend the model-level invariant tests run in full, backends that run only a small subset): the
    Triton interpreter on CPU costs seconds per Glow call under a Jacobian or gradcheck, so it takes a subset;
    on a GPU, Triton runs the full grid."""
    from tests.conftest import KERNEL_BACKENDS
    interpreted = [b for b in KERNEL_BACKENDS if b == "triton" and not torch.cuda.is_available()]
    return ["torch"] + [b for b in KERNEL_BACKENDS if b not in interpreted], interpreted


def random_glow(channels: int, levels: int, coupling: str, mixing: str, device, hidden: int = 16,
                depth: int = 2) -> Glow:
    flow = Glow(channels, levels=levels, depth=depth, hidden=hidden, coupling=coupling, mixing=mixing).to(device)
    # Mild noise: the round trip's error grows with the product of the steps' conditioning.
    return randomize_(flow, scale=0.05)
