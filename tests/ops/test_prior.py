"""N(0, I) prior log-density: every kernel backend against the float64 reference, and the custom ops."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.ops.prior_ops import gaussian_log_prob_ref
from tests.conftest import GPU_KERNEL_BACKENDS, KERNEL_BACKENDS
from tests.ops.kernel_checks import assert_compiled_matches_float64
from tests.ops.kernel_cases import (GPU_DTYPES, GPU_ODD_SHAPES, LAYOUTS, LOW_PRECISION, SHAPES, assert_close,
                                    device_for, grad_dtype, make)
from tests.pairwise import pairwise_cases


def _check_forward_backward(impl: str, z: torch.Tensor) -> None:
    z.requires_grad_()
    with flowkern.use_backend(impl):
        log_prob = ops.gaussian_log_prob(z)
    z64 = z.detach().double().requires_grad_()
    log_prob64 = gaussian_log_prob_ref(z64)
    assert log_prob.dtype == grad_dtype(z.dtype) and log_prob.shape == (z.shape[0],)
    # The sum has z[0].numel() terms of size ~1 plus the same number of log(2 pi) / 2 constants.
    assert_close(log_prob, log_prob64, grad_dtype(z.dtype), terms=4 * z[0].numel())

    grad_log_prob = torch.randn(z.shape[0], dtype=log_prob.dtype, device=z.device)
    grad, = torch.autograd.grad(log_prob, z, grad_log_prob)
    grad64, = torch.autograd.grad(log_prob64, z64, grad_log_prob.double())
    assert grad.dtype == z.dtype
    assert_close(grad, grad64, z.dtype)


# Pairwise over every shape and layout; H and W transposed (the layout the kernel copies) on the 4-D shapes.
CASES = (pairwise_cases(impl=KERNEL_BACKENDS, shape=SHAPES, layout=LAYOUTS, dtype=[torch.float32] + LOW_PRECISION)
         + pairwise_cases(impl=KERNEL_BACKENDS, shape=[s for s in SHAPES if len(s) == 4],
                          layout=["spatially_transposed"], dtype=[torch.float32] + LOW_PRECISION))


@pytest.mark.parametrize("impl, shape, layout, dtype", CASES)
def test_forward_and_backward_match_reference(impl, shape, layout, dtype):
    _check_forward_backward(impl, make(shape, dtype, layout, scale=2.0, device=device_for(impl)))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_broadcast_upstream_gradient(impl):
    device = device_for(impl)
    z = make((33, 130), device=device).requires_grad_()
    with flowkern.use_backend(impl):
        grad, = torch.autograd.grad(ops.gaussian_log_prob(z).sum(), z)
    assert_close(grad, -z.detach(), torch.float32)


@pytest.mark.parametrize("impl", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 3)])
def test_float64_gradcheck(impl, shape):
    z = make(shape, torch.float64, device=device_for(impl)).requires_grad_()

    def log_prob(z):
        with flowkern.use_backend(impl):
            return ops.gaussian_log_prob(z)

    assert torch.autograd.gradcheck(log_prob, (z,))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_opcheck(impl):
    device = device_for(impl)
    for shape, layout in [((5, 6), "contiguous"), ((5, 6), "strided"), ((2, 6, 3, 5), "contiguous")]:
        z = make(shape, layout=layout, device=device).requires_grad_()
        torch.library.opcheck(torch.ops.flowkern.gaussian_log_prob_fwd.default, (z, impl))
        torch.library.opcheck(torch.ops.flowkern.gaussian_log_prob_bwd.default,
                              (torch.randn(shape[0], device=device), z.detach(), impl))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_custom_ops_compile_without_graph_breaks(impl):
    device = device_for(impl)
    z = make((6, 10), layout="sliced", device=device).requires_grad_()

    def loss(z):
        return -torch.ops.flowkern.gaussian_log_prob_fwd(z * 2, impl).mean()

    assert_compiled_matches_float64(loss, lambda z: -gaussian_log_prob_ref(z * 2).mean(), [z], terms=z.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", GPU_ODD_SHAPES)
@pytest.mark.parametrize("layout", ["sliced", "strided"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_odd_shapes_and_layouts(impl, shape, layout, dtype):
    _check_forward_backward(impl, make(shape, dtype, layout, scale=2.0, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(4096, 768), (64, 48, 16, 16), (65536, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_real_sizes(impl, shape, dtype):
    _check_forward_backward(impl, make(shape, dtype, "sliced", device="cuda"))
