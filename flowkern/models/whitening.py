"""Whitening baseline (Su et al. 2021): x -> (x - mu) W, W = U diag(1/sqrt(S)) from the covariance's SVD."""

from __future__ import annotations

import numpy as np
import torch


class Whitening:
    """Whitening fitted on pooled embeddings; ``dim`` keeps the first k principal directions (None: all)."""

    def __init__(self, dim: int | None = None, eps: float = 1e-12) -> None:
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.eps = eps
        self.mean: np.ndarray | None = None
        self.kernel: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray | torch.Tensor) -> Whitening:
        x = _as_float64(embeddings)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need a [N, D] array with N >= 2 to fit whitening, got shape {x.shape}")
        if self.dim is not None and self.dim > x.shape[1]:
            raise ValueError(f"dim {self.dim} exceeds the embedding size {x.shape[1]}")
        self.mean = x.mean(axis=0)
        u, s, _ = np.linalg.svd(np.cov(x, rowvar=False))
        # eps keeps directions of (numerically) zero variance from dividing by zero.
        kernel = u / np.sqrt(s + self.eps)
        self.kernel = kernel[:, : self.dim]
        return self

    def transform(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Whitened float32 embeddings, as a tensor if given a tensor (same device), else numpy."""
        if self.mean is None:
            raise RuntimeError("Whitening.transform called before fit")
        whitened = ((_as_float64(embeddings) - self.mean) @ self.kernel).astype(np.float32)
        if isinstance(embeddings, torch.Tensor):
            return torch.from_numpy(whitened).to(embeddings.device)
        return whitened


def _as_float64(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    return np.asarray(embeddings, dtype=np.float64)
