"""Coupling epilogue: every kernel backend against the float64 reference (forward, backward, inverse)."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.ops.coupling_epilogue_ops import coupling_epilogue_inverse_ref, coupling_epilogue_ref
from tests.conftest import GPU_KERNEL_BACKENDS, KERNEL_BACKENDS
from tests.ops.kernel_checks import assert_compiled_matches_float64
from tests.ops.kernel_cases import (GPU_DTYPES, GPU_ODD_SHAPES, LAYOUTS, LOW_PRECISION, SHAPES, assert_close,
                                    device_for, grad_dtype, make)
from tests.pairwise import pairwise_parametrize

KINDS = {"additive": False, "affine": True}


def _h_shape(x2_shape, affine: bool):
    return (x2_shape[0], x2_shape[1] * (2 if affine else 1)) + tuple(x2_shape[2:])


def _inputs(shape, affine: bool, dtype, layout: str, device, h_dtype=None):
    x2 = make(shape, dtype, layout, device=device).requires_grad_()
    h = make(_h_shape(shape, affine), h_dtype or dtype, layout, scale=1.5, device=device).requires_grad_()
    return x2, h


def _float64_copies(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _check_forward_backward(impl: str, x2: torch.Tensor, h: torch.Tensor, affine: bool,
                            grad_layout: str = "contiguous") -> None:
    dtype, batch = x2.dtype, x2.shape[0]
    with flowkern.use_backend(impl):
        z2, log_det = ops.coupling_epilogue(x2, h, affine)
    x2_64, h64 = _float64_copies(x2, h)
    z2_64, log_det64 = coupling_epilogue_ref(x2_64, h64, affine)
    assert z2.dtype == dtype and log_det.dtype == grad_dtype(dtype)
    assert_close(z2, z2_64, dtype)
    assert_close(log_det, log_det64, grad_dtype(dtype), terms=x2[0].numel())

    grad_z2 = make(x2.shape, dtype, grad_layout, device=x2.device)
    grad_log_det = torch.randn(batch, dtype=log_det.dtype, device=x2.device)
    outputs, outputs64 = ([z2, log_det], [z2_64, log_det64]) if affine else ([z2], [z2_64])
    upstream = [grad_z2, grad_log_det] if affine else [grad_z2]
    grads = torch.autograd.grad(outputs, [x2, h], upstream)
    grads64 = torch.autograd.grad(outputs64, [x2_64, h64], [g.double() for g in upstream])
    assert grads[0].dtype == dtype and grads[1].dtype == h.dtype
    assert_close(grads[0], grads64[0], dtype)
    assert_close(grads[1], grads64[1], h.dtype)


@pairwise_parametrize(impl=KERNEL_BACKENDS, kind=KINDS, shape=SHAPES, layout=LAYOUTS,
                      dtype=[torch.float32] + LOW_PRECISION)
def test_forward_and_backward_match_reference(impl, kind, shape, layout, dtype):
    x2, h = _inputs(shape, KINDS[kind], dtype, layout, device_for(impl))
    _check_forward_backward(impl, x2, h, KINDS[kind], grad_layout=layout)


@pairwise_parametrize(impl=KERNEL_BACKENDS, kind=KINDS, shape=SHAPES, layout=LAYOUTS,
                      dtype=[torch.float32] + LOW_PRECISION)
def test_inverse_matches_reference(impl, kind, shape, layout, dtype):
    affine = KINDS[kind]
    z2, h = _inputs(shape, affine, dtype, layout, device_for(impl))
    with flowkern.use_backend(impl):
        x2 = ops.coupling_epilogue_inverse(z2, h, affine)
    z2_64, h64 = _float64_copies(z2, h)
    x2_64 = coupling_epilogue_inverse_ref(z2_64, h64, affine)
    assert x2.dtype == dtype
    assert_close(x2, x2_64, dtype)

    grad_x2 = make(shape, dtype, device=z2.device)
    grads = torch.autograd.grad(x2, [z2, h], grad_x2)
    grads64 = torch.autograd.grad(x2_64, [z2_64, h64], grad_x2.double())
    assert_close(grads[0], grads64[0], dtype)
    assert_close(grads[1], grads64[1], dtype)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_float32_subnet_output_with_low_precision_activations(impl, kind, dtype):
    """The MLP subnet runs in its parameters' float32 while x2 is bf16/fp16: h and x2 dtypes differ."""
    x2, h = _inputs((33, 10), KINDS[kind], dtype, "sliced", device_for(impl), h_dtype=torch.float32)
    _check_forward_backward(impl, x2, h, KINDS[kind])


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_unmergeable_spatial_strides(impl, kind):
    x2, h = _inputs((3, 10, 3, 5), KINDS[kind], torch.float32, "spatially_transposed", device_for(impl))
    _check_forward_backward(impl, x2, h, KINDS[kind])


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(33, 130), (2, 10, 3, 5)])
def test_broadcast_upstream_gradients(impl, shape):
    """loss = z2.sum() + log_det.sum() hands the backward stride-0 (expanded) gradients."""
    x2, h = _inputs(shape, True, torch.float32, "contiguous", device_for(impl))
    with flowkern.use_backend(impl):
        z2, log_det = ops.coupling_epilogue(x2, h, True)
    grads = torch.autograd.grad(z2.sum() + log_det.sum(), [x2, h])
    x2_64, h64 = _float64_copies(x2, h)
    z2_64, log_det64 = coupling_epilogue_ref(x2_64, h64, True)
    grads64 = torch.autograd.grad(z2_64.sum() + log_det64.sum(), [x2_64, h64])
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, torch.float32)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_extreme_scales_stay_finite(impl):
    """Raw scales far outside sigmoid's range: log-sigmoid must neither overflow nor lose the tiny terms."""
    device = device_for(impl)
    x2, h = make((4, 6), device=device), make((4, 12), scale=60.0, device=device)
    with flowkern.use_backend(impl):
        z2, log_det = ops.coupling_epilogue(x2, h, True)
    z2_64, log_det64 = coupling_epilogue_ref(x2.double(), h.double(), True)
    assert torch.isfinite(log_det).all()
    assert_close(z2, z2_64, torch.float32)
    assert_close(log_det, log_det64, torch.float32, terms=6)


@pairwise_parametrize(impl=["torch"] + KERNEL_BACKENDS, kind=KINDS, shape=[(3, 4), (2, 3, 2, 3)])
def test_float64_gradcheck(impl, kind, shape):
    affine = KINDS[kind]
    x2, h = _inputs(shape, affine, torch.float64, "contiguous", device_for(impl))

    def forward(x2, h):
        with flowkern.use_backend(impl):
            return ops.coupling_epilogue(x2, h, affine)

    def inverse(z2, h):
        with flowkern.use_backend(impl):
            return ops.coupling_epilogue_inverse(z2, h, affine)

    assert torch.autograd.gradcheck(forward, (x2, h))
    assert torch.autograd.gradcheck(inverse, (x2, h))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_opcheck(impl):
    device = device_for(impl)
    for shape, layout in [((5, 6), "contiguous"), ((5, 6), "strided"), ((2, 6, 3, 5), "contiguous")]:
        for affine in (False, True):
            x2, h = _inputs(shape, affine, torch.float32, layout, device)
            torch.library.opcheck(torch.ops.flowkern.coupling_epilogue_fwd.default, (x2, h, affine, impl))
            torch.library.opcheck(torch.ops.flowkern.coupling_epilogue_inv.default, (x2, h, affine, impl))
        grad_z2, grad_log_det = make(shape, device=device), torch.randn(shape[0], device=device)
        torch.library.opcheck(torch.ops.flowkern.coupling_epilogue_bwd.default,
                              (grad_z2, grad_log_det, x2.detach(), h.detach(), impl))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_custom_ops_compile_without_graph_breaks(impl):
    device = device_for(impl)
    x2, h = _inputs((6, 10), True, torch.float32, "sliced", device)

    def loss(x2, h):
        z2, log_det = torch.ops.flowkern.coupling_epilogue_fwd(x2, h, True, impl)
        additive, _ = torch.ops.flowkern.coupling_epilogue_fwd(x2, h[:, :10], False, impl)
        back = torch.ops.flowkern.coupling_epilogue_inv(z2, h, True, impl)
        return (z2 * z2).sum() - log_det.sum() + additive.sum() + back.sum()

    def reference(x2, h):
        z2, log_det = coupling_epilogue_ref(x2, h, True)
        additive, _ = coupling_epilogue_ref(x2, h[:, :10], False)
        return (z2 * z2).sum() - log_det.sum() + additive.sum() + coupling_epilogue_inverse_ref(z2, h, True).sum()

    assert_compiled_matches_float64(loss, reference, [x2, h], terms=4 * x2.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", GPU_ODD_SHAPES)
@pytest.mark.parametrize("layout", ["sliced", "strided"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_odd_shapes_and_layouts(impl, kind, shape, layout, dtype):
    x2, h = _inputs(shape, KINDS[kind], dtype, layout, "cuda")
    _check_forward_backward(impl, x2, h, KINDS[kind], grad_layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(4096, 768), (64, 48, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_real_sizes(impl, kind, shape, dtype):
    affine = KINDS[kind]
    x2, h = _inputs(shape, affine, dtype, "sliced", "cuda")
    _check_forward_backward(impl, x2, h, affine)
    with flowkern.use_backend(impl):
        x2_back = ops.coupling_epilogue_inverse(x2.detach(), h.detach(), affine)
    assert_close(x2_back, coupling_epilogue_inverse_ref(x2.detach().double(), h.detach().double(), affine), dtype)
