"""One declaration per op: `OpSpec` makes the autograd-visible custom op `flowkern::<name>`, its fake, its autograd
registration, and the fake of the compiled op `flowkern_C::<name>` (whose schema csrc/bindings.cpp defines;
tests/ops/test_spec.py checks it against `OpSpec.schema`).

An op's arguments are declared once, in order, as (name, type): torch.Tensor; a tensor group, a NamedTuple of
tensors such as `MlpParams` (one `Tensor[]` argument, handed to every backend as that NamedTuple); list[torch.Tensor]
(any number of tensors); float, bool, int or list[int]. The custom op adds a last argument `impl`, the backend, and calls that backend's launcher `<name>`
(flowkern/kernels/triton/<family>.py, or the compiled op) with the declared arguments; each returns the outputs
that `outputs` (the fake) describes.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Callable, NamedTuple

import torch

from .. import backend
from .._checks import compute_dtype

KERNEL_BACKENDS = ("triton", "cuda", "cpp")
BACKENDS = ("torch",) + KERNEL_BACKENDS
SPECS: dict[str, "OpSpec"] = {}   # every declared op by name
_SCHEMA_TYPES = {torch.Tensor: "Tensor", list[torch.Tensor]: "Tensor[]", float: "float", bool: "bool", int: "int",
                 list[int]: "int[]"}


class MlpParams(NamedTuple):
    """The fused MLP subnet (flowkern.nn.subnets.MLPSubnet; csrc/flowkern.h's MlpParams): w1 [H, C1], b1/l1 [H]
    (first Linear, ActNorm), w2 [H, H], b2/l2 [H] (second), w3 [O, H], b3/l3 [O] (ZeroLinear)."""
    w1: torch.Tensor
    b1: torch.Tensor
    l1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    l2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    l3: torch.Tensor


def is_group(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields")


# ---- output rules for fakes ----

def like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape and dtype."""
    return t.new_empty(t.shape)


def per_row(t: torch.Tensor) -> torch.Tensor:
    """A [B] vector in t's compute dtype (log-dets, log-probs)."""
    return t.new_empty(t.shape[0], dtype=compute_dtype(t.dtype))


@dataclasses.dataclass(eq=False)
class OpSpec:
    """name: of the custom op, the compiled op and every backend's launcher; family: the Triton module holding the
    launcher; args: (name, type) in order; outputs: the fake, the outputs' shapes and dtypes from the arguments
    (groups as their NamedTuple); returns: their schema; differentiable: the arguments that get gradients;
    backward: an OpSpec called with (gradient of each output, every argument) that returns the gradients of the
    differentiable arguments in order (a group's as one tensor per member, a list[torch.Tensor]'s as one list),
    or a function of (the arguments, `impl` and `outputs` as a namespace, gradient of each output) returning the
    same; activations: how many of the last outputs are activations saved for that backward function, not results:
    autograd neither differentiates them nor fills zero gradients for them (the backward gets None there)."""
    name: str
    family: str
    args: tuple[tuple[str, object], ...]
    outputs: Callable
    returns: str
    differentiable: tuple[str, ...] = ()
    backward: OpSpec | Callable | None = None
    activations: int = 0

    def __post_init__(self):
        if self.activations and isinstance(self.backward, OpSpec):
            raise ValueError(f"{self.name}: saved activations need a backward function, which sees the outputs")
        SPECS[self.name] = self
        self.op = torch.library.custom_op(f"flowkern::{self.name}", self._launch, mutates_args=(),
                                          schema=self.schema(with_impl=True))
        self.op.register_fake(lambda *args: self.outputs(*self._grouped(args[:-1])))
        if self.backward is not None:
            self.op.register_autograd(self._backward, setup_context=self._setup_context)
        compiled = backend.compiled_ops()
        if compiled is not None and hasattr(compiled, self.name):
            torch.library.register_fake(f"flowkern_C::{self.name}")(lambda *args: self.outputs(*self._grouped(args)))

    def schema(self, with_impl: bool = False) -> str:
        args = [f"{'Tensor[]' if is_group(kind) else _SCHEMA_TYPES[kind]} {name}" for name, kind in self.args]
        return f"({', '.join(args + (['str impl'] if with_impl else []))}) -> {self.returns}"

    def __call__(self, *args, impl: str):
        return self.op(*args, impl)

    def _grouped(self, values) -> list:
        return [kind(*value) if is_group(kind) else value for (_, kind), value in zip(self.args, values)]

    def _launch(self, *args):
        *values, impl = args
        result = getattr(backend.kernels(impl, self.family), self.name)(*self._grouped(values))
        return list(result) if self.returns == "Tensor[]" else result

    def _setup_context(self, ctx, inputs, output):
        *values, ctx.impl = inputs
        tensors, ctx.values = [], []
        for (_, kind), value in zip(self.args, values):
            if kind is torch.Tensor:
                tensors.append(value)
            elif is_group(kind) or kind == list[torch.Tensor]:
                tensors.extend(value)
                value = len(value)   # restored from the saved tensors
            ctx.values.append(value)
        ctx.saves_outputs = not isinstance(self.backward, OpSpec)   # a backward function also sees the outputs
        if ctx.saves_outputs:
            tensors.extend(output if isinstance(output, (tuple, list)) else [output])
        ctx.save_for_backward(*tensors)
        if self.activations:
            # Zero gradients for the activations would cost a fill of [steps, B, C] per backward; the results'
            # missing gradients are filled in _backward instead.
            ctx.mark_non_differentiable(*output[-self.activations:])
            ctx.set_materialize_grads(False)

    def _saved_args(self, ctx) -> tuple[list, list]:
        """(the arguments, the outputs if saved) from the saved tensors."""
        saved = list(ctx.saved_tensors)
        args, used = [], 0
        for (_, kind), value in zip(self.args, ctx.values):
            if kind is torch.Tensor:
                value, used = saved[used], used + 1
            elif is_group(kind) or kind == list[torch.Tensor]:
                members, used = saved[used:used + value], used + value
                value = kind(*members) if is_group(kind) else members
            args.append(value)
        return args, saved[used:]

    def _backward(self, ctx, *grad_outputs):
        args, outputs = self._saved_args(ctx)
        if self.activations:
            results = len(grad_outputs) - self.activations
            grad_outputs = [torch.zeros_like(out) if grad is None and i < results else grad
                            for i, (grad, out) in enumerate(zip(grad_outputs, outputs))]
        if isinstance(self.backward, OpSpec):
            grads = self.backward(*grad_outputs, *args, impl=ctx.impl)
        else:
            named = types.SimpleNamespace(impl=ctx.impl, outputs=outputs,
                                          **{name: value for (name, _), value in zip(self.args, args)})
            grads = self.backward(named, *grad_outputs)
        grads = iter((grads,) if isinstance(grads, torch.Tensor) else grads)
        result = []
        for (name, kind), value in zip(self.args, args):
            if name not in self.differentiable:   # autograd takes None per member of a tensor list
                result.append([None] * len(value) if is_group(kind) or kind == list[torch.Tensor] else None)
            elif is_group(kind):
                result.append([next(grads) for _ in kind._fields])
            else:
                result.append(next(grads))
        return (*result, None)
