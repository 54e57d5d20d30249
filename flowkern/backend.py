"""The one place that decides which backend runs an op.

Backends:
  "torch"  eager PyTorch reference (the oracle), runs anywhere;
  "triton" Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow, for tests);
  "cuda"   the compiled extension flowkern._C on CUDA tensors;
  "cpp"    the compiled extension flowkern._C on CPU tensors;
  "auto"   the fastest usable backend for each tensor's device.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from typing import Iterator

import torch

NAMES = ("torch", "triton", "cuda", "cpp")
# The tensor devices each backend's kernels take, whatever is installed ("triton" takes CPU tensors only under the
# interpreter, for tests). usable_on adds what this machine has.
DEVICE_TYPES = {"torch": ("cpu", "cuda"), "triton": ("cuda", "cpu"), "cuda": ("cuda",), "cpp": ("cpu",)}
# Fastest first; "auto" never picks the Triton interpreter on CPU because it is ~1000x slower than eager. On CUDA
# the Triton kernels come first until the CUDA C++ kernels are measured faster on a GPU.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# Ops for which "auto" passes over a backend that is measured no faster than the next one on that device
# (bench/cpu_compare.py on the 2-core CI machine: the standalone coupling epilogue and the BERT-flow MLP coupling
# were no faster than eager torch in two of three runs; inside the whole-Glow kernel they are fused).
_AUTO_SKIP = {("cpu", "cpp"): frozenset({"coupling_epilogue", "coupling_epilogue_inverse",
                                         "mlp_coupling", "mlp_coupling_inverse"})}

# The user's process-wide choice is a plain module global, not a ContextVar: torch.compile (dynamo) traces a
# global read and guards on its value, so a compiled model recompiles when the backend changes, while a
# ContextVar read breaks the graph.
_current = "auto"
# Library code (a model's reference path, an integration) must not switch the user's choice for the whole process,
# so it scopes its own calls with `override`: a ContextVar, seen only by its own thread / asyncio task. It is read
# in eager mode only (see `current`), so compiled graphs never read it and keep tracing the global alone; code that
# needs a backend inside torch.compile takes the user's choice, or compiles under `use_backend`.
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowkern_backend_override", default=None)


def _load_extension():
    """(flowkern.kernels.compiled, None) if flowkern._C was built and loads, else (None, why not)."""
    try:
        return importlib.import_module("flowkern.kernels.compiled"), None
    except ImportError as error:  # not built (ModuleNotFoundError), or built against another torch (undefined symbol)
        return None, str(error)


# Facts fixed for the process, read once at import so that torch.compile traces plain constants.
# TRITON_INTERPRET must be set before triton (and so flowkern) is imported anyway.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_EXTENSION, _EXTENSION_ERROR = _load_extension()


def usable_on(name: str, device: torch.device) -> bool:
    """Whether backend `name` can run ops on tensors of `device`."""
    if device.type not in DEVICE_TYPES.get(name, ()):
        return False
    if name == "torch":
        return True
    if name == "triton":
        return _TRITON_INSTALLED and (torch.cuda.is_available() if device.type == "cuda" else _TRITON_INTERPRETED)
    if name == "cuda":
        return _EXTENSION is not None and _EXTENSION.has_cuda and torch.cuda.is_available()
    return _EXTENSION is not None   # "cpp"


def _devices_here() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def backends() -> list[str]:
    """Backends usable on this machine (on at least one of its devices), fastest-agnostic order."""
    return [n for n in NAMES if any(usable_on(n, d) for d in _devices_here())]


def _why_unusable(name: str) -> str:
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "the triton package is not installed"
        return "it needs a CUDA GPU (or TRITON_INTERPRET=1 set before importing flowkern, for CPU testing)"
    if name in ("cuda", "cpp"):
        if _EXTENSION is None:
            return (f"the compiled extension flowkern._C does not load ({_EXTENSION_ERROR}); build it with "
                    "`pip install --no-build-isolation -e .` (see csrc/README.md)")
        if name == "cuda":
            return ("the compiled extension was built without CUDA (rebuild with a CUDA torch and nvcc)"
                    if not _EXTENSION.has_cuda else "it runs CUDA tensors only")
        return "it runs CPU tensors only"
    return "unknown reason"


def _check_name(name: str) -> None:
    if name not in NAMES + ("auto",):
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES + ('auto',)}")
    if name != "auto" and name not in backends():
        raise ValueError(f"backend {name!r} is not usable here: {_why_unusable(name)}; usable: {backends()}")


def set_backend(name: str) -> None:
    """Choose the backend for all ops in this process ("auto" by default)."""
    global _current
    _check_name(name)
    _current = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Choose the backend inside a with-block (process-wide, like set_backend), then restore the previous one.
    For the user's own code; library code scopes its calls with `override`, which leaves other threads alone."""
    global _current
    _check_name(name)
    previous, _current = _current, name
    try:
        yield
    finally:
        _current = previous


@contextlib.contextmanager
def override(name: str) -> Iterator[None]:
    """Run this thread's (or asyncio task's) eager ops on backend `name` inside a with-block, without touching
    the process-wide choice other threads see; the way for library code to pick a backend for its own calls."""
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def current() -> str:
    """The backend ops resolve: this context's `override` in eager mode, else the process-wide choice."""
    if not torch.compiler.is_compiling():
        local = _override.get()
        if local is not None:
            return local
    return _current


def resolve(x: torch.Tensor, op: str, available: tuple[str, ...] = NAMES) -> str:
    """The concrete backend that runs `op` on tensor `x`.

    `available` lists the backends that implement this op; under "auto" ops without a kernel fall back to torch.
    An explicit choice that cannot run this op on this device raises instead of silently falling back.
    """
    name = current()
    if name == "auto":
        for candidate in _AUTO_ORDER.get(x.device.type, ("torch",)):
            if (candidate in available and usable_on(candidate, x.device)
                    and op not in _AUTO_SKIP.get((x.device.type, candidate), ())):
                return candidate
        return "torch"
    if name not in available:
        raise NotImplementedError(f"op {op!r} has no {name!r} implementation (it has {available})")
    if not usable_on(name, x.device):
        raise RuntimeError(f"backend {name!r} cannot run {op!r} on {x.device.type} tensors: {_why_unusable(name)}")
    return name


def compiled_ops():
    """The compiled extension's ops (flowkern.kernels.compiled), or None when it does not load."""
    return _EXTENSION


def kernels(name: str, family: str):
    """The module holding backend `name`'s launchers for an op family ("actnorm", "coupling_epilogue", "invconv", ...).

    Launchers carry one name per concept across backends: <op>_fwd, <op>_bwd, <op>_inv.
    """
    if name == "triton":
        return importlib.import_module(f"flowkern.kernels.triton.{family}")
    if name in ("cuda", "cpp"):
        if _EXTENSION is None:
            raise RuntimeError(f"backend {name!r}: {_why_unusable(name)}")
        return _EXTENSION
    raise ValueError(f"backend {name!r} has no kernels")
