import numpy as np
import pytest
import torch

from flowkern.models import Whitening


def anisotropic(n=2000, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 5


def test_whitened_fit_data_has_zero_mean_identity_covariance():
    x = anisotropic()
    z = Whitening().fit(x).transform(x)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(8), atol=1e-3)


def test_dim_keeps_the_largest_variance_directions():
    x = anisotropic()
    full, reduced = Whitening().fit(x), Whitening(dim=3).fit(x)
    np.testing.assert_allclose(reduced.transform(x), full.transform(x)[:, :3], atol=1e-5)


def test_tensor_in_tensor_out():
    x = anisotropic()
    w = Whitening().fit(torch.from_numpy(x).float())
    out = w.transform(torch.from_numpy(x[:5]).float())
    assert isinstance(out, torch.Tensor) and out.shape == (5, 8)


def test_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        Whitening().transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="exceeds"):
        Whitening(dim=9).fit(anisotropic())
    with pytest.raises(ValueError, match="N >= 2"):
        Whitening().fit(np.zeros((1, 3)))
