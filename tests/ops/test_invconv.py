"""LU 1x1 convolution: W from its factors, the GEMM with and without the preceding ActNorm folded in, and the
inverse; every kernel backend against the float64 reference, the custom ops, and FlowStep's fused path."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.nn import FlowStep, Glow
from flowkern.ops import invconv_ops
from tests.conftest import GPU_KERNEL_BACKENDS, KERNEL_BACKENDS
from tests.helpers import randomize_
from tests.ops.kernel_checks import (HOPPER_ACTIVATIONS, LauncherCalls, assert_compiled_matches_float64,
                                     assert_training_step_matches_torch, hopper_case, hopper_spill_check)
from tests.ops.kernel_cases import (GPU_ODD_SHAPES, LAYOUTS, LOW_PRECISION, SHAPES, assert_close, device_for,
                                    grad_dtype, make, pixels)
from tests.pairwise import all_pairs, pairwise_parametrize

FACTOR = 3.0


def _lu_factors(channels: int, device, dtype=torch.float32):
    """(perm, lower, upper, sign_s, log_s) from the LU of a random rotation, moved away from it (a little: W stays
    well conditioned); lower and upper also hold junk outside their triangles, which the ops must ignore."""
    rotation, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
    _, lower, upper = torch.linalg.lu(rotation)
    s = torch.diagonal(upper)
    perm = torch.randperm(channels)
    junk = torch.randn(channels, channels, dtype=torch.float64)
    lower = torch.tril(lower + 0.02 * torch.randn_like(junk), -1) + torch.triu(junk)
    upper = torch.triu(upper + 0.02 * torch.randn_like(junk), 1) + torch.tril(junk)
    log_s = torch.log(s.abs()) + 0.1 * torch.randn(channels, dtype=torch.float64)
    factors = (perm, lower, upper, torch.sign(s), log_s)
    return [t.to(device) if t.dtype == torch.long else t.to(device, dtype) for t in factors]


def _actnorm_params(channels: int, device, dtype=torch.float32):
    return (0.5 * torch.randn(channels)).to(device, dtype), (0.1 * torch.randn(channels)).to(device, dtype)


def _weight(channels: int, device, dtype=torch.float32, layout: str = "contiguous"):
    """W and its per-pixel log-det from random factors; for the "strided" layout W is a transposed view."""
    weight, log_det = invconv_ops.lu_weight_ref(*_lu_factors(channels, device, dtype))
    if layout == "strided":
        weight = weight.t().contiguous().t()
    return weight.detach().requires_grad_(), log_det.detach().requires_grad_()


def _float64_copies(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


# ---- W = P L U' ----

@pairwise_parametrize(impl=KERNEL_BACKENDS, channels=[6, 10, 130], dtype=[torch.float32, torch.float64])
def test_lu_weight_matches_reference(impl, channels, dtype):
    perm, lower, upper, sign_s, log_s = _lu_factors(channels, device_for(impl), dtype)
    for t in (lower, upper, log_s):
        t.requires_grad_()
    with flowkern.use_backend(impl):
        weight, log_det = ops.lu_weight(perm, lower, upper, sign_s, log_s)
    lower64, upper64, log_s64 = _float64_copies(lower, upper, log_s)
    weight64, log_det64 = invconv_ops.lu_weight_ref(perm, lower64, upper64, sign_s.double(), log_s64)
    assert weight.dtype == dtype and log_det.shape == ()
    assert_close(weight, weight64, dtype, terms=channels)
    assert_close(log_det, log_det64, dtype, terms=channels)

    grad_weight = torch.randn_like(weight)
    grad_log_det = torch.randn((), dtype=dtype, device=weight.device)
    grads = torch.autograd.grad([weight, log_det], [lower, upper, log_s], [grad_weight, grad_log_det])
    grads64 = torch.autograd.grad([weight64, log_det64], [lower64, upper64, log_s64],
                                  [grad_weight.double(), grad_log_det.double()])
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, dtype, terms=channels)


# ---- y = x @ W^T per pixel, with and without the ActNorm folded in ----

def _check_mixing(impl: str, x: torch.Tensor, with_actnorm: bool, weight_layout: str, grad_layout: str) -> None:
    dtype, batch, channels = x.dtype, x.shape[0], x.shape[1]
    rows = batch * pixels(x.shape)
    param_dtype = grad_dtype(dtype)
    weight, weight_log_det = _weight(channels, x.device, param_dtype, weight_layout)
    bias, logs = (t.requires_grad_() for t in _actnorm_params(channels, x.device, param_dtype))
    x.requires_grad_()
    x64, weight64, weight_log_det64, bias64, logs64 = _float64_copies(x, weight, weight_log_det, bias, logs)
    with flowkern.use_backend(impl):
        if with_actnorm:
            y, log_det = ops.actnorm_invconv(x, bias, logs, FACTOR, weight, weight_log_det)
        else:
            y = ops.invconv(x, weight)
    if with_actnorm:
        y64, log_det64 = invconv_ops.actnorm_invconv_ref(x64, bias64, logs64, FACTOR, weight64, weight_log_det64)
        assert log_det.dtype == grad_dtype(dtype)
        assert_close(log_det, log_det64, grad_dtype(dtype), terms=2 * channels * rows)
        inputs, inputs64 = [x, weight, bias, logs, weight_log_det], [x64, weight64, bias64, logs64, weight_log_det64]
        outputs, outputs64 = [y, log_det], [y64, log_det64]
    else:
        y64 = invconv_ops.invconv_ref(x64, weight64)
        inputs, inputs64, outputs, outputs64 = [x, weight], [x64, weight64], [y], [y64]
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y64, dtype, terms=channels)

    if grad_layout == "expanded":  # stride 0, as the gradient of y.sum()
        upstream = [make((1,) * x.dim(), dtype, device=x.device).expand(x.shape)]
    else:
        upstream = [make(x.shape, dtype, grad_layout, device=x.device)]
    if with_actnorm:
        upstream.append(torch.randn(batch, dtype=grad_dtype(dtype), device=x.device))
    grads = torch.autograd.grad(outputs, inputs, upstream)
    grads64 = torch.autograd.grad(outputs64, inputs64, [g.double() for g in upstream])
    assert_close(grads[0], grads64[0], dtype, terms=channels)
    for grad, grad64 in zip(grads[1:], grads64[1:]):
        assert_close(grad, grad64, param_dtype, terms=channels * rows)


@pairwise_parametrize(impl=KERNEL_BACKENDS, shape=SHAPES, layout=LAYOUTS, dtype=[torch.float32] + LOW_PRECISION,
                      with_actnorm=[True, False])
def test_mixing_matches_reference(impl, shape, layout, dtype, with_actnorm):
    x = make(shape, dtype, layout, device=device_for(impl))
    _check_mixing(impl, x, with_actnorm, weight_layout=layout, grad_layout=layout)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 10), (2, 130, 3, 5)])
@pytest.mark.parametrize("with_actnorm", [True, False], ids=["actnorm_invconv", "invconv"])
def test_mixing_float64(impl, shape, with_actnorm):
    _check_mixing(impl, make(shape, torch.float64, device=device_for(impl)), with_actnorm, "contiguous", "expanded")


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_mixing_spatially_transposed(impl):
    x = make((2, 10, 3, 5), torch.float32, "spatially_transposed", device=device_for(impl))
    _check_mixing(impl, x, True, "contiguous", "spatially_transposed")


# The inverse runs the forward's GEMM kernel (tested above) with W^-1.
@pairwise_parametrize(impl=KERNEL_BACKENDS, shape=SHAPES, layout=LAYOUTS, dtype=[torch.float32] + LOW_PRECISION)
def test_inverse_matches_reference(impl, shape, layout, dtype):
    device = device_for(impl)
    factors = _lu_factors(shape[1], device)
    perm, lower, upper, sign_s, log_s = factors
    for t in (lower, upper, log_s):
        t.requires_grad_()
    y = make(shape, dtype, layout, device=device).requires_grad_()
    with flowkern.use_backend(impl):
        x = ops.invconv_inverse(y, *factors)
    y64, lower64, upper64, log_s64 = _float64_copies(y, lower, upper, log_s)
    x64 = invconv_ops.invconv_inverse_ref(y64, perm, lower64, upper64, sign_s.double(), log_s64)
    assert x.dtype == dtype and x.shape == y.shape
    assert_close(x, x64, dtype, terms=shape[1])

    grad_x = make(shape, dtype, layout, device=device)
    grads = torch.autograd.grad(x, [y, lower, upper, log_s], grad_x)
    grads64 = torch.autograd.grad(x64, [y64, lower64, upper64, log_s64], grad_x.double())
    assert_close(grads[0], grads64[0], dtype, terms=shape[1])
    rows = shape[0] * pixels(shape)
    for grad, grad64 in zip(grads[1:], grads64[1:]):
        assert_close(grad, grad64, torch.float32, terms=shape[1] * rows)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_inverse_round_trip(impl):
    device = device_for(impl)
    factors = _lu_factors(130, device)
    x = make((33, 130), device=device)
    with flowkern.use_backend(impl):
        weight, _ = ops.lu_weight(*factors)
        restored = ops.invconv_inverse(ops.invconv(x, weight), *factors)
    assert_close(restored, x, torch.float32, terms=130)


# ---- references, custom ops, compile ----

def test_references_gradcheck():
    perm, lower, upper, sign_s, log_s = _lu_factors(4, "cpu", torch.float64)
    for t in (lower, upper, log_s):
        t.requires_grad_()
    x = torch.randn(2, 4, 1, 3, dtype=torch.float64, requires_grad=True)
    bias, logs = (t.requires_grad_() for t in _actnorm_params(4, "cpu", torch.float64))
    weight, weight_log_det = invconv_ops.lu_weight_ref(perm, lower, upper, sign_s, log_s)
    assert torch.autograd.gradcheck(lambda lo, up, ls: invconv_ops.lu_weight_ref(perm, lo, up, sign_s, ls),
                                    (lower, upper, log_s))
    assert torch.autograd.gradcheck(invconv_ops.invconv_ref, (x, weight.detach().requires_grad_()))
    assert torch.autograd.gradcheck(
        lambda *args: invconv_ops.actnorm_invconv_ref(args[0], args[1], args[2], FACTOR, args[3], args[4]),
        (x, bias, logs, weight.detach().requires_grad_(), weight_log_det.detach().requires_grad_()))
    assert torch.autograd.gradcheck(
        lambda y, lo, up, ls: invconv_ops.invconv_inverse_ref(y, perm, lo, up, sign_s, ls), (x, lower, upper, log_s))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_custom_ops_pass_opcheck(impl):
    device = device_for(impl)
    perm, lower, upper, sign_s, log_s = _lu_factors(10, device)
    for t in (lower, upper, log_s):
        t.requires_grad_()
    x = make((3, 10, 3, 5), layout="strided", device=device).requires_grad_()
    weight, _ = _weight(10, device)
    bias, logs = (t.requires_grad_() for t in _actnorm_params(10, device))
    dy = make(x.shape, device=device)
    flowkern_ops = torch.ops.flowkern
    # The backward ops have no derivative of their own (no double backward): they get inputs without grad.
    plain = [t.detach() for t in (perm, lower, upper, sign_s, log_s, x, weight, bias, logs)]
    cases = [
        (flowkern_ops.lu_weight_fwd, (perm, lower, upper, sign_s, log_s, impl)),
        (flowkern_ops.lu_weight_bwd, (torch.randn(10, 10, device=device), torch.randn((), device=device),
                                      *plain[:5], impl)),
        (flowkern_ops.invconv_fwd, (x, weight, impl)),
        (flowkern_ops.invconv_bwd, (dy, plain[5], plain[6], impl)),
        (flowkern_ops.actnorm_invconv_fwd, (x, bias, logs, FACTOR, weight, impl)),
        (flowkern_ops.actnorm_invconv_bwd, (dy, plain[5], plain[7], plain[8], FACTOR, plain[6], impl)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def _compile_case(device):
    perm, lower, upper, sign_s, log_s = _lu_factors(10, device)
    x = make((6, 10), device=device)
    weight, _ = _weight(10, device)
    bias, logs = _actnorm_params(10, device)
    inputs = [t.requires_grad_() for t in (x, bias, logs, weight, lower, upper, log_s)]
    return perm, sign_s, inputs


def _custom_ops_loss(impl, perm, sign_s):
    def loss(x, bias, logs, weight, lower, upper, log_s):
        w, w_log_det = torch.ops.flowkern.lu_weight_fwd(perm, lower, upper, sign_s, log_s, impl)
        y = torch.ops.flowkern.actnorm_invconv_fwd(x, bias, logs, FACTOR, w, impl)
        z = torch.ops.flowkern.invconv_fwd(y, weight, impl)
        return (z * z).sum() - w_log_det
    return loss


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_custom_ops_compile_without_graph_breaks(impl):
    device = device_for(impl)
    perm, sign_s, inputs = _compile_case(device)
    def reference(x, bias, logs, weight, lower, upper, log_s):
        w, w_log_det = invconv_ops.lu_weight_ref(perm, lower, upper, sign_s.double(), log_s)
        y, _ = invconv_ops.actnorm_invconv_ref(x, bias, logs, FACTOR, w, w_log_det)
        z = invconv_ops.invconv_ref(y, weight)
        return (z * z).sum() - w_log_det

    assert_compiled_matches_float64(_custom_ops_loss(impl, perm, sign_s), reference, inputs,
                                    terms=inputs[0].numel() * inputs[0].shape[1])


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_fused_flow_step_compiles_without_graph_breaks(impl):
    """FlowStep with both fused ops (actnorm_invconv and the MLP coupling), forward and backward."""
    device = device_for(impl)
    step = FlowStep(10, hidden=16, mixing="lu", coupling="affine").to(device)
    x = make((6, 10), device=device)
    with flowkern.use_backend("torch"):
        step(x)  # data-dependent init, outside the compiled region
    randomize_(step)
    flowkern.set_finite_checks(False)
    flowkern.set_backend(impl)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    y, log_det = compiled(x)
    params = list(step.parameters())
    grads = torch.autograd.grad((y * y).sum() - log_det.sum(), params)
    reference = copy.deepcopy(step).cpu().double()
    with flowkern.use_backend("torch"):
        y64, log_det64 = reference(x.cpu().double())
    grads64 = torch.autograd.grad((y64 * y64).sum() - log_det64.sum(), list(reference.parameters()))
    assert_close(y, y64, torch.float32, terms=20)
    assert_close(log_det, log_det64, torch.float32, terms=20)
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, torch.float32, terms=20 * x.numel())


# ---- FlowStep / Glow use the fused op ----

@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
def test_flow_step_runs_ddi_unfused_then_fuses(monkeypatch):
    calls = LauncherCalls(monkeypatch, "flowkern.kernels.triton.invconv", ["actnorm_invconv_fwd", "lu_weight_fwd"])
    device = device_for("triton")
    step = FlowStep(10, hidden=16, mixing="lu").to(device)
    assert set(step.state_dict()) >= {"actnorm.bias", "actnorm.logs", "actnorm.initialized", "mixing.perm",
                                      "mixing.sign_s", "mixing.lower", "mixing.upper", "mixing.log_s"}
    x = 2.0 + 3.0 * make((33, 10), device=device)
    flowkern.set_backend("triton")
    step(x)
    assert calls.counts["actnorm_invconv_fwd"] == 0  # the DDI call
    torch.testing.assert_close(step.actnorm.bias, -x.mean(0))

    randomize_(step)
    y, log_det = step(x)
    assert calls.counts["actnorm_invconv_fwd"] == 1
    flowkern.set_backend("torch")
    y_ref, log_det_ref = step(x)
    assert_close(y, y_ref.double(), torch.float32, terms=10)
    assert_close(log_det, log_det_ref.double(), torch.float32, terms=10)

    # Inside frozen(), W is computed once; outside, on every call.
    flowkern.set_backend("triton")
    step.eval()
    before = calls.counts["lu_weight_fwd"]
    with torch.no_grad(), step.mixing.frozen():
        step(x)
        step(x)
    assert calls.counts["lu_weight_fwd"] == before + 1
    assert calls.counts["actnorm_invconv_fwd"] == 3


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("shape", [(33, 10), (3, 10, 3, 5)])
def test_glow_lu_training_step_matches_torch(shape):
    device = device_for("triton")
    assert_training_step_matches_torch(Glow(10, levels=2, depth=2, hidden=16, mixing="lu").to(device),
                                       make(shape, device=device))


def _hopper_cases() -> list[dict]:
    kernels = importlib.import_module("flowkern.kernels.triton.invconv")
    module = kernels.__name__
    cases = []
    # Every kernel, activation dtype and ActNorm option, and every pair of them, compiled once.
    mixing_kernels = [("_mix_rows_kernel", kernels._gemm_blocks(True)),
                      ("_mix_rows_input_grad_kernel", kernels._gemm_blocks(True)),
                      ("_mix_rows_weight_grad_kernel", kernels._weight_grad_blocks(True))]
    for (kernel, blocks), dtype, with_actnorm in all_pairs([mixing_kernels, list(HOPPER_ACTIVATIONS), [True, False]]):
        constexprs = dict(HAS_ACTNORM=with_actnorm, ACC="tl.float32", PRECISION=kernels.dot_precision(dtype))
        cases.append(hopper_case(module, kernel, blocks, constexprs, HOPPER_ACTIVATIONS[dtype],
                                 ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr")))
    for kernel in ("_lu_weight_kernel", "_lu_weight_grad_kernel"):
        cases.append(hopper_case(module, kernel, kernels._square_block(True), dict(ACC="tl.float32")))
    return cases


start_in_background, test_kernels_compile_for_hopper_without_spills = hopper_spill_check(_hopper_cases)


# ---- real sizes on a GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 768), (16, 768, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_actnorm", [True, False], ids=["actnorm_invconv", "invconv"])
def test_gpu_mixing_real_size(shape, dtype, with_actnorm):
    torch.manual_seed(0)
    _check_mixing("triton", make(shape, dtype, "contiguous", device="cuda"), with_actnorm, "contiguous", "contiguous")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", GPU_ODD_SHAPES)
@pytest.mark.parametrize("layout", ["sliced", "strided"])   # a channel slice; transposed rows / channels_last
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_actnorm", [True, False], ids=["actnorm_invconv", "invconv"])
def test_gpu_mixing_odd_shapes_and_layouts(impl, shape, layout, dtype, with_actnorm):
    _check_mixing(impl, make(shape, dtype, layout, device="cuda"), with_actnorm, layout, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [768, 1024])
def test_gpu_lu_weight_real_size(channels):
    test_lu_weight_matches_reference("triton", channels, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_inverse_real_size(dtype):
    test_inverse_matches_reference("triton", (4096, 768), "contiguous", dtype)
