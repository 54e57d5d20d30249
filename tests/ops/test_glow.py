"""The fused [B, C] Glow (ops.glow; nn.Glow's "fused" path) against the float64 per-op reference: z, log-det,
log-prob, inverse and every gradient, for additive/affine x reverse/random/LU, odd channel counts, 1-3 levels."""
from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.kernels import glow_meta
from flowkern.nn import Glow
from flowkern.ops.glow_ops import GlowPlan, glow_ref, pack_forward
from tests.conftest import KERNEL_BACKENDS
from tests.helpers import random_glow
from tests.ops.kernel_cases import assert_close, device_for, grad_dtype, make
from tests.ops.kernel_checks import HOPPER_ACTIVATIONS, hopper_case, hopper_spill_check
from tests.pairwise import all_pairs, pairwise_parametrize

needs_triton = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="needs the triton backend")
# Kernel backends with a whole-Glow kernel here: Triton (GPU, or the interpreter) and the compiled CPU kernel.
GLOW_BACKENDS = [b for b in KERNEL_BACKENDS if b in ("triton", "cpp")]
each_backend = pytest.mark.parametrize("impl", GLOW_BACKENDS)
# (channels, levels): odd channel counts put the extra channel in the kept half; 131 over 3 levels gives level
# sizes 131, 66, 33, and 130/131 span two of the interpreted kernels' 128-channel chunks. Pairwise over backends,
# sizes, couplings and mixings (the interpreter is slow).
SIZES = [(10, 1), (10, 3), (131, 3), (130, 2)]


def _outputs_and_grads(flow: Glow, x: torch.Tensor, backend: str, dtype: torch.dtype):
    """z, log_det, log_prob and inverse(z), then the gradients of a random weighting of all three outputs
    with respect to x (one leaf per call, so each gradient is one kernel's output, rounded once) and every
    parameter. z's weights are representable in `dtype` (z's gradient is stored in it), so the float64 reference
    sees the same upstream gradient."""
    weights = torch.Generator().manual_seed(1)
    b, c = x.shape
    upstream = [torch.randn(shape, generator=weights, dtype=torch.float64) for shape in ((b, c), (b,), (b,))]
    upstream[0] = upstream[0].to(dtype).double()
    flow.zero_grad()
    x_forward, x_log_prob = (x.detach().clone().requires_grad_() for _ in range(2))
    with flowkern.use_backend(backend):
        z, log_det = flow(x_forward)
        log_prob = flow.log_prob(x_log_prob)
        with torch.no_grad():
            restored = flow.inverse(z)
        loss = sum((out.double() * u.to(out.device)).sum() for out, u in zip((z, log_det, log_prob), upstream))
        loss.backward()
    grads = [x_forward.grad, x_log_prob.grad] + [p.grad for p in flow.parameters()]
    return [z, log_det, log_prob, restored], grads


def _compare(flow: Glow, x: torch.Tensor, dtype: torch.dtype, impl: str = "triton") -> None:
    reference = copy.deepcopy(flow).cpu().double()
    expected, expected_grads = _outputs_and_grads(reference, x.detach().cpu().double(), "torch", dtype)
    with flowkern.use_backend(impl):
        assert flow.path_for(x) == "fused"
    actual, grads = _outputs_and_grads(flow, x, impl, dtype)
    # The inverse is of the kernel's own z (rounded to dtype): its float64 reference is the inverse of that z.
    with flowkern.use_backend("torch"), torch.no_grad():
        expected[3] = reference.inverse(actual[0].detach().cpu().double())
    channels, hidden = x.shape[1], flow.config["hidden"]
    terms = channels + hidden  # values summed into each output or gradient element, per step
    for name, a, e in zip(("z", "log_det", "log_prob", "inverse"), actual, expected):
        assert a.shape == e.shape, name
        try:
            assert_close(a.cpu(), e, dtype if name in ("z", "inverse") else grad_dtype(dtype), terms=terms)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
    names = ["x (forward)", "x (log_prob)"] + [name for name, _ in flow.named_parameters()]
    for name, g, e in zip(names, grads, expected_grads):
        assert g is not None, f"no gradient for {name}"
        try:
            assert_close(g.cpu(), e, dtype if name.startswith("x ") else grad_dtype(dtype), terms=terms * x.shape[0])
        except AssertionError as error:
            raise AssertionError(f"gradient of {name}: {error}") from None


@pairwise_parametrize(impl=GLOW_BACKENDS, sizes=SIZES, coupling=["additive", "affine"],
                      mixing=["reverse", "random", "lu"])
def test_fused_matches_float64_reference(impl, sizes, coupling, mixing):
    channels, levels = sizes
    device = device_for(impl)
    _compare(random_glow(channels, levels, coupling, mixing, device), make((37, channels), device=device),
             torch.float32, impl)


@pairwise_parametrize(impl=GLOW_BACKENDS, dtype=[torch.bfloat16, torch.float16, torch.float64],
                      flow=[("additive", "reverse"), ("affine", "lu")])
def test_fused_dtypes(impl, dtype, flow):
    device = device_for(impl)
    flow = random_glow(67, 2, *flow, device)
    if dtype == torch.float64:
        flow = flow.double()
    _compare(flow, make((21, 67), dtype, device=device), dtype, impl)


@each_backend
@pytest.mark.parametrize("layout", ["sliced", "strided"])
def test_fused_reads_any_layout(impl, layout):
    device = device_for(impl)
    _compare(random_glow(130, 2, "affine", "random", device), make((37, 130), layout=layout, device=device),
             torch.float32, impl)


@each_backend
def test_backward_walks_several_row_tiles_per_program(impl):
    # 150 rows = 5 tiles of 32 over the interpreter's 4 programs: partial gradients accumulate across tiles.
    device = device_for(impl)
    _compare(random_glow(10, 2, "affine", "reverse", device, depth=3), make((150, 10), device=device), torch.float32, impl)


@each_backend
@pytest.mark.parametrize("coupling, mixing", [("affine", "random"), ("additive", "reverse")])
def test_hidden_width_off_the_vector_width(impl, coupling, mixing):
    # hidden 20: the kernels pad the subnet's layers to their vector / block widths; the padding must stay inert.
    device = device_for(impl)
    _compare(random_glow(67, 2, coupling, mixing, device, hidden=20), make((37, 67), device=device), torch.float32, impl)


# ---- the op itself ----

def _plan_and_params(coupling: str, mixing: str, device):
    flow = random_glow(10, 2, coupling, mixing, device).eval()
    plan = flow._plan(torch.device(device))
    weights = [s.mixing.weight() for s in flow._steps()] if mixing == "lu" else None
    return flow, plan, pack_forward(plan, flow._step_params(), weights)


@pytest.mark.parametrize("coupling, mixing", [("affine", "random"), ("additive", "lu")])
def test_reference_on_packed_parameters_matches_layers(coupling, mixing):
    flow, plan, (params, mix, const) = _plan_and_params(coupling, mixing, "cpu")
    flow = flow.double()
    plan = flow._plan(torch.device("cpu"))
    weights = [s.mixing.weight() for s in flow._steps()] if mixing == "lu" else None
    params, mix, const = pack_forward(plan, flow._step_params(), weights)
    x = make((7, 10), torch.float64)
    with flowkern.use_backend("torch"):
        z, log_det = flow(x)
        log_prob = flow.log_prob(x)
    z_ref, log_det_ref, log_prior_ref = glow_ref(x, plan, params, mix, const)
    torch.testing.assert_close(z_ref, z)
    torch.testing.assert_close(log_det_ref, log_det)
    torch.testing.assert_close(log_prior_ref + log_det_ref, log_prob)


def test_bad_input_is_named():
    _, plan, (params, mix, const) = _plan_and_params("additive", "reverse", "cpu")
    with pytest.raises(ValueError, match=r"expected \[B, 10\]"):
        ops.glow(torch.randn(4, 9), plan, params, mix)
    with pytest.raises(ValueError, match=r"expected \[B, 10\]"):
        ops.glow(torch.randn(4, 10, 1), plan, params, mix)
    with pytest.raises(ValueError, match="empty batch"):
        ops.glow(torch.randn(0, 10), plan, params, mix)
    with pytest.raises(ValueError, match="packed parameters"):
        ops.glow(torch.randn(4, 10), plan, params[1:], mix)
    with pytest.raises(TypeError, match="list of parameter tensors"):
        ops.glow(torch.randn(4, 10), plan, torch.cat([p.reshape(-1) for p in params]), mix)
    with pytest.raises(ValueError, match="mixed dtypes"):
        ops.glow(torch.randn(4, 10), plan, [params[0].double()] + params[1:], mix)
    with pytest.raises(ValueError, match="packed LU values"):
        ops.glow(torch.randn(4, 10), plan, params, torch.zeros(3))
    with pytest.raises(ValueError, match="floating-point"):
        ops.glow(torch.ones(4, 10, dtype=torch.int64), plan, params, mix)
    with pytest.raises(ValueError, match="hidden width"):
        GlowPlan([10], 1, 65, False, [torch.arange(10)], 3.0, "cpu")
    with pytest.raises(ValueError, match="step 0 parameter shapes"):
        pack_forward(plan, [[torch.zeros(3)] * 11] * plan.steps)


@pytest.mark.parametrize("mixing", ["reverse", "random"])
def test_local_order_lists_each_levels_channels_as_the_cpu_kernel_reads_them(mixing):
    # The C++ kernel's local order: per step, the conditioning then the transformed channels, each in ascending
    # physical order, with the coupling channel of each (the same roles as the Triton kernel's `order`).
    _, plan, _ = _plan_and_params("affine", mixing, "cpu")
    local_order, order, steps = plan.tables.local_order, plan.tables.order, plan.steps
    for s in range(steps):
        cl, c1 = int(plan.meta_host[s, glow_meta.CL]), int(plan.meta_host[s, glow_meta.C1])
        physical, coupling = local_order[s, :cl], local_order[steps + s, :cl]
        for part in (physical[:c1], physical[c1:]):
            assert torch.all(part[1:] > part[:-1])
        assert torch.equal(order[s, coupling.long()], physical)
        assert sorted(coupling[:c1].tolist()) == list(range(c1))
        assert sorted(coupling[c1:].tolist()) == list(range(c1, cl))
        assert torch.all(local_order[:, cl:][[s, steps + s]] == -1)
        if mixing == "reverse":   # each part one contiguous range: the kernel reads and writes the state in place
            for part in (physical[:c1], physical[c1:]):
                assert part.tolist() == list(range(int(part[0]), int(part[0]) + len(part)))


@pytest.mark.skipif("cpp" not in GLOW_BACKENDS, reason="needs the compiled extension")
def test_compiled_glow_names_a_bad_plan_table():
    def compiled_forward(mixing):
        """The compiled forward on a plan (and its parameters) whose tables `run` replaces by keyword."""
        _, plan, (params, mix, _) = _plan_and_params("additive", mixing, "cpu")

        def run(**tables):
            torch.ops.flowkern_C.glow_fwd(torch.randn(4, 10), params, mix, list(plan.tables._replace(**tables)),
                                          plan.level_steps, plan.level_channels, plan.hidden, plan.affine, plan.lu,
                                          plan.logscale_factor, False)
        return plan, mix, run

    plan, _, run = compiled_forward("reverse")
    run()
    for bad_entry in (-1, 10):   # a physical channel outside [0, C)
        local_order = plan.tables.local_order.clone()
        local_order[1, 0] = bad_entry
        with pytest.raises(ValueError, match="local order table out of range, repeated or not ascending at step 1"):
            run(local_order=local_order)
    local_order = plan.tables.local_order.clone()
    local_order[plan.steps + 1, 1] = local_order[plan.steps + 1, 0]   # a coupling channel given twice
    with pytest.raises(ValueError, match="local order table out of range, repeated"):
        run(local_order=local_order)
    local_order = plan.tables.local_order.clone()
    local_order[plan.steps, 0] = plan.level_channels[0] - 1   # a conditioning channel given a transformed role
    with pytest.raises(ValueError, match="local order table out of range"):
        run(local_order=local_order)
    an_idx = plan.tables.an_idx.clone()
    an_idx[0, 3] = 10
    with pytest.raises(ValueError, match="local order table out of range"):
        run(an_idx=an_idx)
    meta = plan.tables.meta.clone()
    meta[0, glow_meta.CL] = 11
    with pytest.raises(ValueError, match="meta table at step 0 gives C1 = 5, CL = 11"):
        run(meta=meta)
    meta = plan.tables.meta.clone()
    meta[1, glow_meta.OFF_W3] = plan.params_numel - 1   # W3's values would run past the packed parameters
    with pytest.raises(ValueError, match=f"meta table at step 1, column {glow_meta.OFF_W3}: offset "
                                         f"{plan.params_numel - 1} of .* outside the {plan.params_numel} packed"):
        run(meta=meta)
    lu_plan, lu_mix, lu_run = compiled_forward("lu")
    lu_run()
    meta = lu_plan.tables.meta.clone()
    meta[0, glow_meta.OFF_MIX_B] = lu_mix.numel()
    with pytest.raises(ValueError, match=f"outside the {lu_mix.numel()} mixing values"):
        lu_run(meta=meta)
    with pytest.raises(ValueError, match=r"local_order must be int32 \[2 \* steps, C\]"):
        run(local_order=plan.tables.local_order[:plan.steps].contiguous())


def test_compiled_kernel_names_the_meta_columns_as_python_does():
    # csrc/cpu/glow.cpp's `enum Meta` spells each column of flowkern/kernels/glow_meta.py in C++ style
    # (OFF_ACTNORM_BIAS: kOffActnormBias) with the same value.
    source = (Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "glow.cpp").read_text()
    body = re.search(r"enum Meta : int \{([^}]*)\}", source).group(1)
    cpp = {name: int(value) for name, value in re.findall(r"(k\w+) = (\d+)", body)}
    python = {"k" + "".join(part.capitalize() for part in name.split("_")): value
              for name, value in vars(glow_meta).items() if name.isupper()}
    assert cpp == python
    assert sorted(v for k, v in python.items() if k != "kCount") == list(range(glow_meta.COUNT))


@each_backend
@pytest.mark.parametrize("coupling, mixing", [("affine", "random"), ("additive", "lu")])
def test_custom_ops_pass_opcheck(impl, coupling, mixing):
    device = device_for(impl)
    _, plan, (params, mix, _) = _plan_and_params(coupling, mixing, device)
    x = make((5, 10), device=device)
    plan_args = (list(plan.tables), plan.level_steps, plan.level_channels, plan.hidden, plan.affine, plan.lu,
                 plan.logscale_factor)
    leaves = [p.detach().clone().requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.flowkern.glow_fwd.default,
                          (x.requires_grad_(), leaves, mix.detach().requires_grad_(), *plan_args, True, impl))
    torch.library.opcheck(torch.ops.flowkern.glow_inv.default,
                          (x.detach(), [p.detach() for p in params], mix.detach(), *plan_args, impl))


@each_backend
def test_fused_glow_compiles_without_graph_breaks(impl):
    device = device_for(impl)
    flow = random_glow(10, 2, "affine", "reverse", device)
    x = make((9, 10), device=device)
    flowkern.set_backend(impl)
    flowkern.set_finite_checks(False)
    flow.log_prob(x)  # eager first call: reads the ActNorms' initialized flags (a compiled graph cannot)
    compiled = torch.compile(lambda t: -flow.log_prob(t).mean(), fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    reference = copy.deepcopy(flow).cpu().double()
    with flowkern.use_backend("torch"):
        expected = -reference.log_prob(x.cpu().double()).mean()
    expected_grads = torch.autograd.grad(expected, list(reference.parameters()))
    terms = 10 + flow.config["hidden"]
    assert_close(loss.detach(), expected.detach(), torch.float32, terms=terms)
    for grad, grad64 in zip(grads, expected_grads):
        assert_close(grad, grad64, torch.float32, terms=terms * x.shape[0])


# ---- the kernels as the GPU runs them, compiled for Hopper here ----

def _hopper_cases() -> list[dict]:
    kernels = importlib.import_module("flowkern.kernels.triton.glow")
    pointers = dict(meta_ptr="i64", order_ptr="i32")
    # (kernel, its blocks, extra constexprs, activation pointers)
    glow_kernels = [("_glow_fwd_kernel", kernels._blocks(True, 32), dict(SAVE=True), ("x_ptr", "z_ptr")),
                    ("_glow_inv_kernel", kernels._blocks(True, 32), {}, ("x_ptr", "z_ptr")),
                    ("_glow_bwd_kernel", kernels._blocks(True, 32, backward=True), {}, ("dz_ptr", "z_ptr", "dx_ptr"))]
    cases = []
    # Every kernel, activation dtype and option, and every pair of them, compiled once.
    for (kernel, blocks, extra, activation_args), dtype, affine, lu in all_pairs(
            [glow_kernels, list(HOPPER_ACTIVATIONS), [False, True], [False, True]]):
        constexprs = dict(AFFINE=affine, LU=lu, ACC="tl.float32", PRECISION=kernels.dot_precision(dtype), **extra)
        cases.append(hopper_case(kernels.__name__, kernel, blocks, constexprs, HOPPER_ACTIVATIONS[dtype],
                                 activation_args, pointers))
    return cases


start_in_background, test_kernels_compile_for_hopper_without_spills = hopper_spill_check(_hopper_cases)


def _nan_workspace(monkeypatch):
    """The Triton kernels' workspace filled with NaN: a read of a location the kernel did not write first (a
    missing barrier's stale value, a channel outside the level's) then shows in the outputs."""
    kernels = importlib.import_module("flowkern.kernels.triton.glow")
    allocate = kernels._workspace
    monkeypatch.setattr(kernels, "_workspace", lambda *args: allocate(*args).fill_(float("nan")))


@needs_triton
@pytest.mark.parametrize("coupling, mixing", [("affine", "random"), ("additive", "lu")])
def test_kernels_read_only_workspace_they_wrote(coupling, mixing, monkeypatch):
    _nan_workspace(monkeypatch)
    device = device_for("triton")
    _compare(random_glow(131, 3, coupling, mixing, device), make((37, 131), device=device), torch.float32)


# ---- real sizes on a GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu"), ("affine", "random")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bert_flow_size(coupling, mixing, dtype):
    flow = random_glow(768, 3, coupling, mixing, "cuda", hidden=32, depth=3)
    _compare(flow, make((4099, 768), dtype, device="cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("coupling, mixing", [("additive", "reverse"), ("affine", "lu")])
def test_gpu_kernels_read_only_workspace_they_wrote(coupling, mixing, monkeypatch):
    _nan_workspace(monkeypatch)
    _compare(random_glow(768, 3, coupling, mixing, "cuda", hidden=32, depth=3), make((4099, 768), device="cuda"),
             torch.float32)


@pytest.mark.gpu
def test_gpu_odd_size():
    _compare(random_glow(131, 3, "affine", "random", "cuda", hidden=64), make((20001, 131), torch.bfloat16,
                                                                         layout="strided", device="cuda"),
             torch.bfloat16)
