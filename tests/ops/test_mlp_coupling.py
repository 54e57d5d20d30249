"""The fused BERT-flow coupling (MLP subnet + epilogue): every kernel backend against the float64 reference
(forward, backward, inverse and its backward), the custom ops, and the coupling layers' use of it."""
from __future__ import annotations

import importlib

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.nn import AdditiveCoupling, AffineCoupling, Glow, MLPSubnet
from flowkern.ops import MlpParams
from flowkern.ops.mlp_coupling_ops import MAX_FUSED_HIDDEN, mlp_coupling_inverse_ref, mlp_coupling_ref
from tests.conftest import KERNEL_BACKENDS
from tests.ops.kernel_cases import LAYOUTS, LOW_PRECISION, assert_close, device_for, grad_dtype, make
from tests.helpers import randomize_
from tests.ops.kernel_checks import (HOPPER_ACTIVATIONS, LauncherCalls, assert_compiled_matches_float64,
                                     assert_training_step_matches_torch, hopper_case, hopper_spill_check)
from tests.pairwise import all_pairs, pairwise_parametrize

FACTOR = 3.0
# (batch, channels, hidden): odd batches and channel counts (odd C gives x1 one channel more than x2), hidden
# widths below, at and above the 16-wide minimum tile, up to the largest fused width.
CASES = [(1, 6, 8), (3, 10, 16), (33, 130, 32), (33, 10, 64), (100, 130, 16)]
LAUNCHERS = ("mlp_coupling_fwd", "mlp_coupling_inv")


def _half(channels: int) -> int:
    return (channels + 1) // 2


def _subnet_params(c1: int, c2: int, hidden: int, affine: bool, device, dtype=torch.float32):
    """The subnet's MlpParams away from their init (the last layer is zero at init)."""
    out = c2 * (2 if affine else 1)
    params = [torch.randn(hidden, c1) / c1 ** 0.5, 0.3 * torch.randn(hidden), 0.1 * torch.randn(hidden),
              torch.randn(hidden, hidden) / hidden ** 0.5, 0.3 * torch.randn(hidden), 0.1 * torch.randn(hidden),
              torch.randn(out, hidden) / hidden ** 0.5, 0.3 * torch.randn(out), 0.1 * torch.randn(out)]
    return MlpParams(*(p.to(device, dtype).requires_grad_() for p in params))


def _float64_copies(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def _check(impl: str, batch: int, channels: int, hidden: int, affine: bool, dtype: torch.dtype, layout: str,
           inverse: bool, device) -> None:
    c1 = _half(channels)
    c2 = channels - c1
    x = make((batch, channels), dtype, layout, device=device).requires_grad_()
    params = _subnet_params(c1, c2, hidden, affine, device, grad_dtype(dtype))
    x64, *params64 = _float64_copies([x, *params])
    params64 = MlpParams(*params64)
    op, ref = (ops.mlp_coupling_inverse, mlp_coupling_inverse_ref) if inverse else (ops.mlp_coupling,
                                                                                    mlp_coupling_ref)
    with flowkern.use_backend(impl):
        out = op(x[:, :c1], x[:, c1:], params, affine, FACTOR)
    out64 = ref(x64[:, :c1], x64[:, c1:], params64, affine, FACTOR)
    outputs, outputs64 = ([out], [out64]) if inverse else (list(out), list(out64))
    terms = c1 + hidden
    assert outputs[0].dtype == dtype and outputs[0].shape == (batch, c2)
    assert_close(outputs[0], outputs64[0], dtype, terms=terms)
    upstream = [make((batch, c2), dtype, layout, device=device)]
    if not inverse:
        assert outputs[1].dtype == grad_dtype(dtype) and outputs[1].shape == (batch,)
        assert_close(outputs[1], outputs64[1], grad_dtype(dtype), terms=c2)
        if affine:  # the additive log-det is a constant 0; a stride-0 gradient (as from .sum()) in "strided" cases
            grad_log_det = torch.randn(1 if layout == "strided" else batch, dtype=grad_dtype(dtype), device=device)
            upstream.append(grad_log_det.expand(batch))
        else:
            outputs, outputs64 = outputs[:1], outputs64[:1]

    grads = torch.autograd.grad(outputs, [x, *params], upstream)
    grads64 = torch.autograd.grad(outputs64, [x64, *params64], [g.double() for g in upstream])
    assert_close(grads[0], grads64[0], dtype, terms=terms + c2)
    for grad, grad64 in zip(grads[1:], grads64[1:]):
        assert_close(grad, grad64, grad_dtype(dtype), terms=batch * (terms + c2))


@pairwise_parametrize(impl=KERNEL_BACKENDS, sizes=CASES, affine=[False, True], layout=LAYOUTS,
                      dtype=[torch.float32] + LOW_PRECISION)
def test_forward_and_backward_match_reference(impl, sizes, affine, layout, dtype):
    _check(impl, *sizes, affine, dtype, layout, inverse=False, device=device_for(impl))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("launcher", ["mlp_coupling_fwd", "mlp_coupling_bwd"], ids=["z2", "dx1"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_check_catches_a_two_percent_error(monkeypatch, impl, launcher, dtype):
    # The check the grid above relies on must fail a kernel whose z2 (or dx1) is 2% off.
    kernels = flowkern.backend.kernels(impl, "mlp_coupling")
    correct = getattr(kernels, launcher)

    def two_percent_off(*args):
        first, *rest = correct(*args)
        return (first * 1.02, *rest)

    monkeypatch.setattr(kernels, launcher, two_percent_off)
    with pytest.raises(AssertionError):
        _check(impl, 33, 130, 32, True, dtype, "contiguous", False, device_for(impl))


# The inverse shares the forward's kernels but for its epilogue.
@pairwise_parametrize(impl=KERNEL_BACKENDS, sizes=CASES, affine=[False, True], layout=LAYOUTS,
                      dtype=[torch.float32] + LOW_PRECISION)
def test_inverse_and_its_backward_match_reference(impl, sizes, affine, layout, dtype):
    _check(impl, *sizes, affine, dtype, layout, inverse=True, device=device_for(impl))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_float64(impl, affine, inverse):
    _check(impl, 33, 10, 16, affine, torch.float64, "sliced", inverse, device=device_for(impl))


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
def test_inverse_round_trip(impl, affine):
    device = device_for(impl)
    x = make((33, 130), device=device)
    params = _subnet_params(65, 65, 32, affine, device)
    with flowkern.use_backend(impl), torch.no_grad():
        z2, _ = ops.mlp_coupling(x[:, :65], x[:, 65:], params, affine, FACTOR)
        x2 = ops.mlp_coupling_inverse(x[:, :65], z2, params, affine, FACTOR)
    assert_close(x2, x[:, 65:].double(), torch.float32, terms=100)


def test_rejects_what_it_cannot_fuse():
    params = _subnet_params(3, 3, MAX_FUSED_HIDDEN + 1, False, "cpu")
    x = make((4, 6))
    with pytest.raises(ValueError, match="hidden width"):
        ops.mlp_coupling(x[:, :3], x[:, 3:], params, False)
    image = make((4, 6, 3, 5))
    with pytest.raises(ValueError, match=r"\[B, C1\]"):
        ops.mlp_coupling_inverse(image[:, :3], image[:, 3:], _subnet_params(3, 3, 8, False, "cpu"), False)
    with pytest.raises(ValueError, match="do not fit"):  # affine needs twice x2's channels out of the subnet
        ops.mlp_coupling(x[:, :3], x[:, 3:], _subnet_params(3, 3, 8, False, "cpu"), True)


# ---- references, custom ops, compile ----

@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
def test_references_gradcheck(affine):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = _subnet_params(3, 2, 4, affine, "cpu", torch.float64)

    def forward(x, *params):
        return mlp_coupling_ref(x[:, :3], x[:, 3:], MlpParams(*params), affine, FACTOR)

    def inverse(x, *params):
        return mlp_coupling_inverse_ref(x[:, :3], x[:, 3:], MlpParams(*params), affine, FACTOR)

    assert torch.autograd.gradcheck(forward, [x, *params])
    assert torch.autograd.gradcheck(inverse, [x, *params])


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
def test_custom_ops_pass_opcheck(impl, affine):
    device = device_for(impl)
    x = make((5, 10), layout="strided", device=device).requires_grad_()
    x1, x2 = x[:, :5], x[:, 5:]
    params = _subnet_params(5, 5, 8, affine, device)
    # The backward ops have no derivative of their own (no double backward): they get inputs without grad.
    plain = [x1.detach(), x2.detach(), [p.detach() for p in params]]
    dz2, dlog_det = make((5, 5), device=device), torch.randn(5, device=device)
    flowkern_ops = torch.ops.flowkern
    cases = [
        (flowkern_ops.mlp_coupling_fwd, (x1, x2, list(params), affine, FACTOR, impl)),
        (flowkern_ops.mlp_coupling_bwd, (dz2, dlog_det, *plain, affine, FACTOR, impl)),
        (flowkern_ops.mlp_coupling_inv, (x1, x2, list(params), affine, FACTOR, impl)),
        (flowkern_ops.mlp_coupling_inv_bwd, (dz2, *plain, affine, FACTOR, impl)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("impl", KERNEL_BACKENDS)
def test_custom_ops_compile_without_graph_breaks(impl):
    device = device_for(impl)
    x = make((6, 10), device=device).requires_grad_()
    params = _subnet_params(5, 5, 8, True, device)

    def loss(x, *params):
        z2, log_det = torch.ops.flowkern.mlp_coupling_fwd(x[:, :5], x[:, 5:], list(params), True, FACTOR, impl)
        x2 = torch.ops.flowkern.mlp_coupling_inv(x[:, :5], z2, list(params), True, FACTOR, impl)
        return (z2 * z2).sum() - log_det.sum() + (x2 * x2).sum()

    def reference(x, *params):
        z2, log_det = mlp_coupling_ref(x[:, :5], x[:, 5:], MlpParams(*params), True, FACTOR)
        x2 = mlp_coupling_inverse_ref(x[:, :5], z2, MlpParams(*params), True, FACTOR)
        return (z2 * z2).sum() - log_det.sum() + (x2 * x2).sum()

    assert_compiled_matches_float64(loss, reference, [x, *params], terms=3 * x.numel() * 8)


# ---- the coupling layers use the fused op ----

needs_triton = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")


@needs_triton
@pytest.mark.parametrize("layer", [AdditiveCoupling, AffineCoupling])
def test_coupling_runs_ddi_unfused_then_fuses(monkeypatch, layer):
    calls = LauncherCalls(monkeypatch, "flowkern.kernels.triton.mlp_coupling", LAUNCHERS)
    device = device_for("triton")
    coupling = layer(10, hidden=16).to(device)
    x = 1.0 + 2.0 * make((33, 10), device=device)
    flowkern.set_backend("triton")
    coupling(x)
    assert calls.counts["mlp_coupling_fwd"] == 0  # the DDI call
    assert bool(coupling.subnet.actnorm1.initialized) and bool(coupling.subnet.actnorm2.initialized)

    randomize_(coupling)
    y, log_det = coupling(x)
    restored = coupling.inverse(y)
    assert calls.counts == {"mlp_coupling_fwd": 1, "mlp_coupling_inv": 1}
    flowkern.set_backend("torch")
    y_ref, log_det_ref = coupling(x)
    assert_close(y, y_ref.double(), torch.float32, terms=30)
    assert_close(log_det, log_det_ref.double(), torch.float32, terms=30)
    assert_close(restored, x.double(), torch.float32, terms=30)


@needs_triton
@pytest.mark.parametrize("case", ["user_subnet", "image_data", "conv_subnet", "wide_hidden"])
def test_coupling_keeps_unfused_path(monkeypatch, case):
    calls = LauncherCalls(monkeypatch, "flowkern.kernels.triton.mlp_coupling", LAUNCHERS)
    device = device_for("triton")
    x = make((4, 10, 3, 5) if case in ("image_data", "conv_subnet") else (4, 10), device=device)
    coupling = {
        "user_subnet": lambda: AffineCoupling(10, subnet=MLPSubnet(5, 10, 16)),
        "image_data": lambda: AffineCoupling(10, hidden=16),
        "conv_subnet": lambda: AffineCoupling(10, hidden=16, image=True),
        "wide_hidden": lambda: AffineCoupling(10, hidden=MAX_FUSED_HIDDEN + 1),
    }[case]().to(device)
    flowkern.set_backend("triton")
    coupling(x)
    randomize_(coupling)
    coupling.inverse(coupling(x)[0])
    assert calls.counts == {"mlp_coupling_fwd": 0, "mlp_coupling_inv": 0}


@needs_triton
@pytest.mark.parametrize("mixing", ["reverse", "lu"])
def test_glow_affine_training_step_matches_torch(mixing):
    device = device_for("triton")
    model = Glow(10, levels=2, depth=2, hidden=16, coupling="affine", mixing=mixing).to(device)
    assert_training_step_matches_torch(model, make((33, 10), device=device))


# ---- the kernels as the GPU runs them, compiled for Hopper here ----

def _hopper_cases() -> list[dict]:
    kernels = importlib.import_module("flowkern.kernels.triton.mlp_coupling")
    activation_args = ("x1_ptr", "in2_ptr", "out2_ptr", "dout_ptr", "din2_ptr", "dx1_ptr")
    cases = []
    # Every kernel, activation dtype, hidden width and option, and every pair of them, compiled once.
    for (kernel, backward), dtype, hidden, affine, inverse in all_pairs([
            [("_mlp_coupling_kernel", False), ("_mlp_coupling_bwd_kernel", True)], list(HOPPER_ACTIVATIONS),
            [32, 64], [False, True], [False, True]]):
        constexprs = dict(AFFINE=affine, INVERSE=inverse, ACC="tl.float32", PRECISION=kernels.dot_precision(dtype))
        blocks = kernels._blocks(True, dtype, hidden, backward)
        cases.append(hopper_case(kernels.__name__, kernel, blocks, constexprs, HOPPER_ACTIVATIONS[dtype],
                                 activation_args))
    return cases


start_in_background, test_kernels_compile_for_hopper_without_spills = hopper_spill_check(_hopper_cases)


# ---- real sizes on a GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [32, 64])
@pytest.mark.parametrize("affine", [False, True], ids=["additive", "affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gpu_real_size(hidden, affine, dtype, inverse):
    _check("triton", 4096, 768, hidden, affine, dtype, "contiguous", inverse, device="cuda")


@pytest.mark.gpu
def test_gpu_odd_sizes():
    for batch, channels, hidden in [(33, 130, 32), (20000, 130, 64)]:
        _check("triton", batch, channels, hidden, True, torch.bfloat16, "sliced", False, device="cuda")
