"""ActNorm: every kernel backend against the float64 reference (forward, backward, inverse), and the custom ops."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.ops.actnorm_ops import actnorm_inverse_ref, actnorm_ref
from tests.conftest import GPU_KERNEL_BACKENDS, KERNEL_BACKENDS
from tests.ops.kernel_cases import (GPU_DTYPES, GPU_ODD_SHAPES, LAYOUTS, LOW_PRECISION, SHAPES, assert_close,
                                    device_for, grad_dtype, make, pixels)
from tests.ops.kernel_checks import assert_compiled_matches_float64
from tests.pairwise import pairwise_parametrize

FACTOR = 3.0


def _params(channels: int, device, dtype=torch.float32):
    """Parameters away from their zero init (and logs small enough that exp(3 * logs) stays moderate)."""
    bias = (0.5 * torch.randn(channels, device=device)).to(dtype).requires_grad_()
    logs = (0.1 * torch.randn(channels, device=device)).to(dtype).requires_grad_()
    return bias, logs


def _float64_copies(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _check_forward_backward(impl: str, x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor,
                            grad_layout: str = "contiguous") -> None:
    dtype, batch, channels, pixel_count = x.dtype, x.shape[0], x.shape[1], pixels(x.shape)
    x.requires_grad_()
    with flowkern.use_backend(impl):
        y, log_det = ops.actnorm(x, bias, logs, FACTOR)
    x64, bias64, logs64 = _float64_copies(x, bias, logs)
    y64, log_det64 = actnorm_ref(x64, bias64, logs64, FACTOR)
    assert y.dtype == dtype and log_det.dtype == grad_dtype(dtype)
    assert_close(y, y64, dtype)
    assert_close(log_det, log_det64, grad_dtype(dtype), terms=channels * pixel_count)

    grad_y = make(x.shape, dtype, grad_layout, device=x.device)
    grad_log_det = torch.randn(batch, dtype=log_det.dtype, device=x.device)
    grads = torch.autograd.grad([y, log_det], [x, bias, logs], [grad_y, grad_log_det])
    grads64 = torch.autograd.grad([y64, log_det64], [x64, bias64, logs64], [grad_y.double(), grad_log_det.double()])
    assert_close(grads[0], grads64[0], dtype)
    assert_close(grads[1], grads64[1], grad_dtype(dtype), terms=batch * pixel_count)
    assert_close(grads[2], grads64[2], grad_dtype(dtype), terms=FACTOR * batch * pixel_count)


@pairwise_parametrize(impl=KERNEL_BACKENDS, shape=SHAPES, layout=LAYOUTS, dtype=[torch.float32] + LOW_PRECISION)
def test_forward_and_backward_match_reference(impl, shape, layout, dtype):
    device = device_for(impl)
    _check_forward_backward(impl, make(shape, dtype, layout, device=device), *_params(shape[1], device),
                            grad_layout=layout)


@pairwise_parametrize(impl=KERNEL_BACKENDS, shape=SHAPES, layout=LAYOUTS, dtype=[torch.float32] + LOW_PRECISION)
def test_inverse_matches_reference(impl, shape, layout, dtype):
    device = device_for(impl)
    y = make(shape, dtype, layout, device=device).requires_grad_()
    bias, logs = _params(shape[1], device)
    with flowkern.use_backend(impl):
        x = ops.actnorm_inverse(y, bias, logs, FACTOR)
    y64, bias64, logs64 = _float64_copies(y, bias, logs)
    x64 = actnorm_inverse_ref(y64, bias64, logs64, FACTOR)
    assert x.dtype == dtype
    assert_close(x, x64, dtype)

    grad_x = make(shape, dtype, device=device)
    grads = torch.autograd.grad(x, [y, bias, logs], grad_x)
    grads64 = torch.autograd.grad(x64, [y64, bias64, logs64], grad_x.double())
    assert_close(grads[0], grads64[0], dtype)
    assert_close(grads[1], grads64[1], grad_dtype(dtype), terms=shape[0] * pixels(shape))
    assert_close(grads[2], grads64[2], grad_dtype(dtype), terms=FACTOR * shape[0] * pixels(shape))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_unmergeable_spatial_strides_and_float64_parameters(impl):
    """H and W transposed (copied to [B, C, H*W] by the launcher), with float64 parameters on float32 data."""
    device = device_for(impl)
    _check_forward_backward(impl, make((3, 10, 3, 5), layout="spatially_transposed", device=device),
                            *_params(10, device, torch.float64))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_parameter_gradients_over_many_pixels(impl):
    """144 pixels per channel: the reduction of the per-program partials takes several chunks per channel."""
    device = device_for(impl)
    _check_forward_backward(impl, make((3, 4, 12, 12), device=device), *_params(4, device))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(33, 130), (2, 10, 3, 5)])
def test_broadcast_upstream_gradients(impl, shape):
    """loss = y.sum() + log_det.sum() hands the backward stride-0 (expanded) gradients."""
    device = device_for(impl)
    x = make(shape, device=device).requires_grad_()
    bias, logs = _params(shape[1], device)
    with flowkern.use_backend(impl):
        y, log_det = ops.actnorm(x, bias, logs, FACTOR)
    grads = torch.autograd.grad(y.sum() + log_det.sum(), [x, bias, logs])
    x64, bias64, logs64 = _float64_copies(x, bias, logs)
    y64, log_det64 = actnorm_ref(x64, bias64, logs64, FACTOR)
    grads64 = torch.autograd.grad(y64.sum() + log_det64.sum(), [x64, bias64, logs64])
    summed = shape[0] * pixels(shape)   # values summed into each parameter gradient; dx is elementwise
    for grad, grad64, terms in zip(grads, grads64, (1, summed, FACTOR * summed)):
        assert_close(grad, grad64, torch.float32, terms=terms)


@pytest.mark.parametrize("impl", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 6), (2, 5, 2, 3)])
def test_float64_gradcheck(impl, shape):
    device = device_for(impl)
    x = make(shape, torch.float64, device=device).requires_grad_()
    bias, logs = _params(shape[1], device, torch.float64)

    def forward(x, bias, logs):
        with flowkern.use_backend(impl):
            return ops.actnorm(x, bias, logs, FACTOR)

    def inverse(y, bias, logs):
        with flowkern.use_backend(impl):
            return ops.actnorm_inverse(y, bias, logs, FACTOR)

    assert torch.autograd.gradcheck(forward, (x, bias, logs))
    assert torch.autograd.gradcheck(inverse, (x, bias, logs))


def _op_samples(impl: str):
    device = device_for(impl)
    for shape, layout in [((5, 6), "contiguous"), ((5, 6), "strided"), ((2, 6, 3, 5), "contiguous")]:
        x = make(shape, layout=layout, device=device).requires_grad_()
        bias, logs = _params(shape[1], device)
        grads = (make(shape, device=device), torch.randn(shape[0], device=device))
        yield x, bias, logs, grads


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_opcheck(impl):
    for x, bias, logs, (grad_y, grad_log_det) in _op_samples(impl):
        torch.library.opcheck(torch.ops.flowkern.actnorm_fwd.default, (x, bias, logs, FACTOR, impl))
        torch.library.opcheck(torch.ops.flowkern.actnorm_inv.default, (x, bias, logs, FACTOR, impl))
        torch.library.opcheck(torch.ops.flowkern.actnorm_bwd.default,
                              (grad_y, grad_log_det, x.detach(), bias.detach(), logs.detach(), FACTOR, impl))


def _train_step_loss(forward, inverse):
    def loss(x, bias, logs):
        y, log_det = forward(x, bias, logs, FACTOR)
        return (y * y).sum() - log_det.sum() + inverse(y, bias, logs, FACTOR).sum()
    return loss


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("entry", ["custom ops", "dispatcher"])
def test_compiles_without_graph_breaks(impl, entry):
    device = device_for(impl)
    x = make((6, 10), device=device).requires_grad_()
    bias, logs = _params(10, device)
    if entry == "dispatcher":
        flowkern.set_backend(impl)
        loss = _train_step_loss(ops.actnorm, ops.actnorm_inverse)
    else:
        loss = _train_step_loss(lambda *args: torch.ops.flowkern.actnorm_fwd(*args, impl),
                                lambda *args: torch.ops.flowkern.actnorm_inv(*args, impl))
    reference = _train_step_loss(actnorm_ref, actnorm_inverse_ref)
    assert_compiled_matches_float64(loss, reference, [x, bias, logs], terms=3 * x.numel())


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", GPU_ODD_SHAPES)
@pytest.mark.parametrize("layout", ["sliced", "strided"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_odd_shapes_and_layouts(impl, shape, layout, dtype):
    params = _params(shape[1], "cuda", grad_dtype(dtype))
    _check_forward_backward(impl, make(shape, dtype, layout, device="cuda"), *params, grad_layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(4096, 768), (64, 48, 16, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_real_sizes(impl, shape, layout, dtype):
    _check_forward_backward(impl, make(shape, dtype, layout, device="cuda"), *_params(shape[1], "cuda"))
    y = make(shape, dtype, layout, device="cuda")
    bias, logs = _params(shape[1], "cuda")
    with flowkern.use_backend(impl):
        x = ops.actnorm_inverse(y, bias, logs, FACTOR)
    assert_close(x, actnorm_inverse_ref(y.double(), bias.double(), logs.double(), FACTOR), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
def test_gpu_inductor_compiles_the_training_loss(impl):
    x = make((4096, 768), torch.bfloat16, device="cuda").requires_grad_()
    bias, logs = _params(768, "cuda")

    def loss(x, bias, logs):
        y, log_det = torch.ops.flowkern.actnorm_fwd(x, bias, logs, FACTOR, impl)
        return (y.float() ** 2).sum() - log_det.sum()

    grads = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, bias, logs), [x, bias, logs])
    expected = torch.autograd.grad(loss(x, bias, logs), [x, bias, logs])
    for grad, grad_expected in zip(grads, expected):
        torch.testing.assert_close(grad, grad_expected, rtol=2e-2, atol=1e-2)
