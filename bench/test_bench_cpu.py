"""CPU benchmarks of the torch backend at small sizes (pytest-benchmark); not part of the test suite.

    python -m pytest bench -q --benchmark-only

(pyproject's testpaths keep `python -m pytest` to tests/.) The Triton interpreter is left out: it measures Python.
"""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import nn, ops

pytest.importorskip("pytest_benchmark")

B, C = 256, 768


@pytest.fixture(autouse=True)
def _torch_backend():
    flowkern.set_finite_checks(False)
    torch.manual_seed(0)
    with flowkern.use_backend("torch"):
        yield
    flowkern.set_finite_checks(True)


def _forward_backward(fn, *inputs):
    inputs = [t.requires_grad_() for t in inputs]

    def run():
        outputs = [o for o in fn(*inputs) if o.requires_grad]
        return torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
    return run


def test_actnorm_forward(benchmark):
    x, bias, logs = torch.randn(B, C), torch.randn(C), 0.1 * torch.randn(C)
    benchmark(ops.actnorm, x, bias, logs)


def test_actnorm_forward_backward(benchmark):
    benchmark(_forward_backward(ops.actnorm, torch.randn(B, C), torch.randn(C), 0.1 * torch.randn(C)))


@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
def test_coupling_epilogue_forward_backward(benchmark, affine):
    x2, h = torch.randn(B, C // 2), torch.randn(B, C if affine else C // 2)
    benchmark(_forward_backward(lambda x2, h: ops.coupling_epilogue(x2, h, affine), x2, h))


def test_gaussian_log_prob_forward_backward(benchmark):
    benchmark(_forward_backward(lambda z: (ops.gaussian_log_prob(z),), torch.randn(B, C)))


@pytest.mark.parametrize("config", [("additive", "reverse"), ("affine", "lu")], ids=lambda c: "-".join(c))
def test_glow_inference(benchmark, config):
    model = nn.Glow(C, 3, 3, 32, *config).eval()
    x = torch.randn(64, C)
    with torch.no_grad():
        benchmark(model, x)


@pytest.mark.parametrize("config", [("additive", "reverse"), ("affine", "lu")], ids=lambda c: "-".join(c))
def test_glow_train_step(benchmark, config):
    model = nn.Glow(C, 3, 3, 32, *config)
    x = torch.randn(64, C)
    model(x)   # data-dependent init outside the timing
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = -model.log_prob(x).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    benchmark(step)
