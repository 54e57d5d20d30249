"""The compiled backends: "cpp" (CPU tensors) and "cuda" (CUDA tensors), from the extension flowkern._C.

flowkern._C registers its kernels as torch ops `torch.ops.flowkern_C.<op>` (csrc/bindings.cpp: one schema, a CPU
and a CUDA implementation) with the same names and arguments as the Triton launchers in flowkern/kernels/triton/,
so the dispatcher (flowkern.backend.kernels) hands this module to the autograd-visible ops `flowkern::<op>`
unchanged: `compiled.<op>` is `torch.ops.flowkern_C.<op>`. Their fakes come from the ops' declarations
(flowkern.ops.spec). Importing this module fails with ImportError when the extension was not built.
"""
from __future__ import annotations

import torch

from .. import _C

has_cuda: bool = _C.has_cuda


def __getattr__(name: str):
    return getattr(torch.ops.flowkern_C, name)
