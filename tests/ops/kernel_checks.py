"""Checks shared by the kernel tests: launcher call counts, a training step against the torch backend, and
compiling kernels for Hopper (sm_90) with Triton's bundled toolchain, which needs no GPU."""
from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import triton.language as tl

import flowkern
from flowkern.nn import Glow
from tests.background import BACKGROUND
from tests.helpers import randomize_
from tests.ops.kernel_cases import assert_close, pixels


class LauncherCalls:
    """Counts calls of the Triton launchers `names` while still running them."""

    def __init__(self, monkeypatch, module: str, names):
        kernels = importlib.import_module(module)
        self.counts = dict.fromkeys(names, 0)
        for name in names:
            launcher = getattr(kernels, name)

            def counted(*args, _name=name, _launcher=launcher, **kwargs):
                self.counts[_name] += 1
                return _launcher(*args, **kwargs)

            monkeypatch.setattr(kernels, name, counted)


def assert_compiled_matches_float64(loss, reference, inputs: list[torch.Tensor], terms: int) -> None:
    """torch.compile(loss, fullgraph=True) (loss built from flowkern's custom ops) against `reference`, the same
    math on the ops' float64 references: the loss and its gradient to every input. `terms`: values summed into the
    loss (scales the tolerance)."""
    backend = "aot_eager" if inputs[0].device.type == "cpu" else "inductor"
    value = torch.compile(loss, fullgraph=True, backend=backend)(*inputs)
    grads = torch.autograd.grad(value, inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    value64 = reference(*inputs64)
    grads64 = torch.autograd.grad(value64, inputs64)
    assert_close(value.detach(), value64.detach(), torch.float32, terms=terms)
    for grad, grad64 in zip(grads, grads64):
        assert_close(grad, grad64, torch.float32, terms=terms)


def assert_training_step_matches_torch(model: Glow, x: torch.Tensor) -> None:
    """One training step's loss and parameter gradients under "triton" equal those under "torch" (after the
    data-dependent init, which runs unfused), and the inverse restores x."""
    with flowkern.use_backend("torch"):
        model.log_prob(x)  # data-dependent init
    randomize_(model)
    models = {"torch": model, "triton": copy.deepcopy(model)}
    losses, grads = {}, {}
    for name, m in models.items():
        with flowkern.use_backend(name):
            loss = -m.log_prob(x).mean()
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = {n: p.grad for n, p in m.named_parameters()}
            restored = m.inverse(m(x)[0])
        assert_close(restored, x, torch.float32, terms=100)
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    for n, g in grads["torch"].items():
        assert_close(grads["triton"][n], g, torch.float32, terms=x.shape[0] * pixels(x.shape) * x.shape[1])



# ---- the kernels as the GPU runs them, compiled for Hopper here (Triton ships ptxas; no GPU needed) ----

# Runs in a child process: this one has TRITON_INTERPRET=1 (no GPU), under which @triton.jit gives interpreted
# functions that cannot be compiled. argv[1]: JSON list of cases; prints, per case, the resources of the compiled
# kernel (registers and stack bytes per thread, static and dynamic shared memory bytes; its SASS with source lines
# where the case asks for "sass").
_HOPPER_COMPILE = r"""
import importlib, json, re, subprocess, sys, tempfile
from pathlib import Path
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

target = GPUTarget("cuda", 90, 32)
toolchain = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def from_signature(kernel, case):
    constexprs = {k: getattr(tl, v[3:]) if str(v).startswith("tl.") else v for k, v in case["constexprs"].items()}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            pointee = (case["pointers"].get(name) or (case["activation"] if name in case["activation_args"] else
                       "i64" if "perm" in name else "fp32"))
            signature[name] = "*" + pointee
        else:
            signature[name] = "fp32" if name == "logscale_factor" else "i32"
    return (ASTSource(kernel, signature, constexprs),
            dict(num_warps=case["num_warps"], num_stages=case["num_stages"]))


def decode(value):
    if isinstance(value, dict) and "tensor" in value:  # a fresh, 16-byte aligned allocation
        return MockTensor(getattr(torch, value["tensor"]))
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.dtype(value["tl_dtype"])
    if isinstance(value, dict) and "tuple" in value:   # Triton specializes tensors in tuples natively: real ones
        return tuple(torch.empty(16, dtype=getattr(torch, v["tensor"])) if isinstance(v, dict) and "tensor" in v
                     else decode(v) for v in value["tuple"])
    if isinstance(value, dict) and "jit" in value:  # a @triton.jit function passed as a constexpr
        module, name = value["jit"]
        return getattr(importlib.import_module(module), name)
    return value


def from_launch(kernel, launch):
    # Specialized as a launch with these arguments would be (divisibility, constant strides of 1): Triton's own
    # argument binder, with the target given instead of read from a GPU driver.
    args = [decode(a) for a in launch["args"]]
    kwargs = {k: decode(v) for k, v in launch["kwargs"].items()}
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


results = []
for case in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    source, options = from_launch(kernel, case["launch"]) if "launch" in case else from_signature(kernel, case)
    compiled = triton.compile(source, target=target, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(toolchain / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        result = dict(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                      stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                      static_shared=int(re.search(r"SHARED:(\d+)", usage).group(1)),
                      dynamic_shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                      num_stages=compiled.metadata.num_stages)
        if case.get("sass"):
            result["sass"] = subprocess.run([str(toolchain / "nvdisasm"), "--print-code", "--print-line-info-inline",
                                             str(cubin)], capture_output=True, text=True, check=True).stdout
    results.append(result)
print(json.dumps(results))
"""


def _hopper_toolchain_present() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


needs_hopper_toolchain = pytest.mark.skipif(not _hopper_toolchain_present(),
                                            reason="needs Triton's NVIDIA toolchain (ptxas)")
# Register spills allowed in a kernel as the launchers configure it for the GPU (bytes of stack per thread).
MAX_SPILL_BYTES = 64
# The activation dtypes the compile checks sample, as hopper_case names them.
HOPPER_ACTIVATIONS = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def hopper_case(module: str, kernel: str, blocks: dict, constexprs: dict, activation: str = "fp32",
                activation_args=(), pointers: dict | None = None) -> dict:
    """One kernel to compile: `blocks` as a launcher passes them (tile constexprs, num_warps, num_stages),
    plus the other constexprs (Triton types written "tl.float32"). Pointers in activation_args get
    `activation` ("bf16", "fp32"), those named in `pointers` the given type ("i32"), perm pointers i64, the
    rest fp32."""
    tiles = {k: v for k, v in blocks.items() if k not in ("num_warps", "num_stages")}
    return dict(module=module, kernel=kernel, constexprs={**tiles, **constexprs}, activation=activation,
                activation_args=list(activation_args), pointers=pointers or {}, num_warps=blocks["num_warps"],
                num_stages=blocks.get("num_stages", 3))


def hopper_resources(cases: list[dict]) -> list[dict]:
    """Compiles each case for sm_90 in a child process without the interpreter; returns per case its registers
    and stack bytes per thread, static and dynamic shared memory bytes, num_warps, num_stages, and "sass"
    (nvdisasm with source lines) for cases with sass=True. A case is a hopper_case, or dict(module, kernel,
    launch=dict(args, kwargs)): the arguments of a launch (tensors as {"tensor": torch dtype name}, tl dtypes as
    {"tl_dtype": name}, tuples as {"tuple": [...]}, jit functions as {"jit": [module, name]}; see describe_launch),
    which Triton specializes as it would that launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE, json.dumps(cases)], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe_argument(value):
    """A launch argument as hopper_resources' child process rebuilds it."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if isinstance(value, (tuple, list)):
        return {"tuple": [describe_argument(v) for v in value]}
    if hasattr(value, "fn") and callable(value.fn):   # a @triton.jit function (interpreted here)
        return {"jit": [value.fn.__module__, value.fn.__name__]}
    return value


def recorded_launches(module: str, run: Callable[[], object]) -> list[dict]:
    """Runs `run` with the @triton.jit kernels of `module` recording their launches instead of running them;
    returns them as hopper_resources cases."""
    kernels = importlib.import_module(module)
    cases = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                cases.append(dict(module=module, kernel=self.name, launch=dict(
                    args=[describe_argument(a) for a in args],
                    kwargs={k: describe_argument(v) for k, v in kwargs.items()})))
            return launch

    with pytest.MonkeyPatch.context() as patch:
        for name in dir(kernels):
            if name.endswith("_kernel") and hasattr(getattr(kernels, name), "fn"):
                patch.setattr(kernels, name, Recorder(name))
        run()
    return cases


def compile_for_hopper(cases: list[dict]) -> list[int]:
    """Compiles each case for sm_90 in a child process without the interpreter; returns the spill bytes."""
    return [resources["stack"] for resources in hopper_resources(cases)]


def hopper_spill_check(cases_of: Callable[[], list[dict]]):
    """What a kernel test module binds as `start_in_background, test_kernels_compile_for_hopper_without_spills`:
    the hook tests/background.py calls at collection, which queues the sm_90 compile of the cases cases_of()
    returns, and the test that asserts they spill at most MAX_SPILL_BYTES (compiling now if nothing was queued)."""
    module = cases_of.__module__

    def start_in_background(item) -> None:
        if item.originalname == "test_kernels_compile_for_hopper_without_spills" and _hopper_toolchain_present():
            BACKGROUND.submit(f"sm_90 {module}", functools.partial(compile_for_hopper, cases_of()))

    @needs_hopper_toolchain
    def test_kernels_compile_for_hopper_without_spills():
        assert_no_hopper_spills(module, cases_of())

    return start_in_background, test_kernels_compile_for_hopper_without_spills


def assert_no_hopper_spills(module: str, cases: list[dict]) -> None:
    """The cases of the test module `module`, compiled for sm_90 in the background run its start queued (else
    now), spill at most MAX_SPILL_BYTES."""
    spills = BACKGROUND.result(f"sm_90 {module}", functools.partial(compile_for_hopper, cases))
    assert max(spills) <= MAX_SPILL_BYTES, list(zip([(c["kernel"], c["constexprs"]) for c in cases], spills))
