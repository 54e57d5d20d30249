"""Static cost of the fused whole-Glow kernels, compiled for sm_90 here: no GPU needed, nothing measured.

    .venv/bin/python bench/static_cost.py --json bench/results/2026-12-02-static-sm90-before.json
    .venv/bin/python bench/static_cost.py --json bench/results/2026-12-02-static-sm90-after.json \
        --compare bench/results/2026-12-02-static-sm90-before.json

The first made the committed "before" of issue 15 item 3 (the JSON names the kernels' commit and sha256); the
second is the "after", with before/after columns. Each writes the JSON, a Markdown table beside it (same name, .md) and prints the
table: about 2-4 minutes on 2 cores, no GPU.

What it does, for BERT-flow's Glow(768, levels=3, depth=3, hidden=32), each of additive/affine coupling x
permutation ("reverse") / LU mixing x fp32 / bf16 activations:
  1. runs the launchers of flowkern/kernels/triton/glow.py (forward with save=True for training and False for
     inference, backward, inverse) on fake CUDA tensors with every @triton.jit kernel replaced by a recorder, an
     H100-class device (132 SMs) assumed: the grid, arguments and constexprs (tiles, num_warps) of each launch are
     the launcher's own, whatever the kernels' signatures;
  2. compiles each recorded launch for sm_90 with Triton's toolchain (specialized as that launch would be: Triton's
     own argument binder; pointers taken as fresh 16-byte aligned allocations) in a child process without
     TRITON_INTERPRET: registers and stack (spill) bytes per thread, shared memory, SASS;
  3. estimates the SASS instructions a thread of each program issues, from the loop structure: SASS loops are the
     backward branches; each is mapped to a source `for` through the SASS line info (the first line, walking back
     from the branch through the loop's own instructions, that is a `for ... in range(...)` header) and weighted by
     that loop's trip count, evaluated from the source's own range bounds with the launch's scalar arguments and
     constexprs, the kernel's scalar assignments, and per step the plan's meta table (names assigned
     `X = _meta(meta_ptr, s, col)`); instructions outside loops count once. From it: `per_row_tile`, the grid's
     total over its row tiles (BLOCK_B rows each), and `warp_instructions_per_row` at each batch, all warps of the
     grid per input row (comparable across tile shapes, warps and grid splits);
  4. occupancy (programs per SM) from registers, shared memory and warps on an H100-class SM, and the grid of
     each launch at B=64 and B=65536.

Limits of the estimate (a count of issued instructions, not a time):
  - both sides of a runtime branch inside a loop count on every iteration (an upper bound for that code);
  - a software-pipelined loop is counted as its SASS body times the full trip count, its peeled prologue and
    epilogue once: a small overcount;
  - the grid's total is the mean of its first and last programs' counts times the programs (exact when every
    program does the same work, as in the forward, or when a grid-stride loop gives the programs two tile counts
    in about equal shares, as in the backward at B=65536: 136 programs take 16 tiles, 128 take 15);
  - a name in a helper's range bound is resolved as the kernel's variable of the same name;
  - memory latency, tensor-core throughput, occupancy effects and stalls are not modelled.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's flowkern and tests, not an installed copy
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from flowkern.kernels import glow_meta  # noqa: E402

NOTICE = "static, compiled for sm_90, not measured"
KERNELS_MODULE = "flowkern.kernels.triton.glow"
# BERT-flow's Glow.
GLOW = dict(channels=768, levels=3, depth=3, hidden=32)
BATCHES = (64, 65536)
COUPLINGS = ("additive", "affine")
MIXINGS = ("reverse", "lu")  # a fixed permutation, LU weights
ACTIVATIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (label, launcher in KERNELS_MODULE, save) for the launcher's `save` parameter.
PASSES = (("fwd train", "glow_fwd", True), ("fwd infer", "glow_fwd", False), ("bwd", "glow_bwd", None),
          ("inv", "glow_inv", None))
# An H100-class SM (sm_90; H200 the same): registers, shared memory and warps per SM, resident programs at most,
# SMs per GPU. Registers are allocated per warp in units of 256; CUDA reserves 1 KB of shared memory per program.
SM = dict(registers=65536, shared_bytes=228 * 1024, warps=64, programs=32, sms=132, register_unit=256,
          reserved_shared_bytes=1024)


class StaticCostError(RuntimeError):
    pass


# ---- 1. the launches, recorded from the launchers ----

@dataclass
class Launch:
    kernel: str
    grid: tuple
    args: list          # positional arguments, tensors as {"tensor": dtype name}
    kwargs: dict        # constexprs and launch options (num_warps, ...)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def values(self, arg_names: list[str]) -> dict:
        """The kernel's arguments by name (tensors as their descriptors)."""
        return {**dict(zip(arg_names, self.args)), **self.kwargs}


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    return value


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.name, tuple(grid), [_describe(a) for a in args],
                                        {k: _describe(v) for k, v in kwargs.items()}))
        return launch


def _glow_plan(coupling: str, mixing: str):
    from flowkern.nn import Glow
    flow = Glow(GLOW["channels"], levels=GLOW["levels"], depth=GLOW["depth"], hidden=GLOW["hidden"],
                coupling=coupling, mixing=mixing)
    return flow._plan(torch.device("cpu"))


def _launcher_arguments(launcher, plan, tensors: dict, save) -> dict:
    """The launcher's parameters by name: the activations and buffers in `tensors`, `save`, else the plan's
    attribute of that name (index tables moved to the fake device)."""
    values = {}
    for name in inspect.signature(launcher).parameters:
        if name in tensors:
            values[name] = tensors[name]
        elif name == "save":
            values[name] = save
        elif name == "plan":   # the plan's tables (flowkern.ops.glow_ops.GlowTables), as every backend takes them
            values[name] = type(plan.tables)(*(t.to(tensors["x"].device) for t in plan.tables))
        elif hasattr(plan, name):
            value = getattr(plan, name)
            values[name] = value.to(tensors["x"].device) if isinstance(value, torch.Tensor) else value
        else:
            raise StaticCostError(f"{launcher.__name__}: no value for its parameter {name!r} (neither a GlowPlan "
                                  f"attribute nor one of {sorted(tensors)}): add it to record_launches")
    return values


def record_launches(plan, dtype: torch.dtype, batch: int) -> dict[str, list[Launch]]:
    """Per pass label, the kernel launches its launcher makes for a [batch, C] input of `dtype` on an H100-class
    GPU, recorded on fake CUDA tensors."""
    kernels = importlib.import_module(KERNELS_MODULE)
    layout = importlib.import_module("flowkern.kernels.triton._layout")
    launches: list[Launch] = []
    jit_functions = [n for n, v in vars(kernels).items() if hasattr(v, "arg_names") and hasattr(v, "fn")]
    patches = [mock.patch.object(kernels, n, _Recorder(n, launches)) for n in jit_functions]
    patches.append(mock.patch.object(layout, "_multiprocessors", lambda index: SM["sms"]))
    recorded = {}
    with FakeTensorMode(allow_non_fake_inputs=True), contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        device, channels, steps = torch.device("cuda", 0), plan.channels, plan.steps
        acc = torch.float32
        tensors = dict(
            x=torch.empty(batch, channels, device=device, dtype=dtype),
            z=torch.empty(batch, channels, device=device, dtype=dtype),
            grad_z=torch.empty(batch, channels, device=device, dtype=dtype),
            grad_log_det=torch.empty(batch, device=device, dtype=acc),
            grad_log_prior=torch.empty(batch, device=device, dtype=acc),
            params=[torch.empty(plan.params_numel, device=device, dtype=acc)],
            mix=torch.empty(plan.mix_numel, device=device, dtype=acc),
            # What the forward saves for the backward (glow_fwd's docstring).
            mid=torch.empty(steps + 1, batch, channels, device=device, dtype=acc),
            inp=torch.empty((steps, batch, channels) if plan.lu else (0,), device=device, dtype=acc))
        for label, launcher_name, save in PASSES:
            launcher = getattr(kernels, launcher_name)
            first = len(launches)
            try:
                launcher(**_launcher_arguments(launcher, plan, tensors, save))
            except RuntimeError as error:
                # Host-side torch work after the kernels (e.g. the backward's dW GEMMs on views) that fake CUDA
                # tensors cannot run in a CPU-only build: the launches before it are recorded (a launch after
                # such work would not be; none is today).
                if "not linked with support for cuda" not in str(error) or len(launches) == first:
                    raise
            recorded[label] = launches[first:]
    return recorded


# ---- 2. compiled for sm_90 (tests/ops/kernel_checks.py runs the compiler in a child process) ----

def compile_launches(launches: list[Launch]) -> list[dict]:
    """Resources and SASS of each launch's kernel, compiled afresh: Triton's cache keys a kernel by its source
    text, not its file, so a cached binary could carry the line info of another checkout's copy."""
    from tests.ops.kernel_checks import hopper_resources
    cases = [dict(module=KERNELS_MODULE, kernel=launch.kernel, launch=dict(args=launch.args, kwargs=launch.kwargs),
                  sass=True) for launch in launches]
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache):
        return hopper_resources(cases)


# ---- 3. SASS loops, weighted by the source loops' trip counts ----

_LINE_INFO = re.compile(r'//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_LABEL = re.compile(r"^\s*(?P<label>\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s*/\*(?P<offset>[0-9a-f]+)\*/\s+(?P<text>[^;]*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((?P<label>\.L_x_\d+)\)")


@dataclass
class Instruction:
    offset: int
    text: str
    file: str | None
    line: int | None

    @property
    def opcode(self) -> str:
        return self.text.split()[1] if self.text.startswith("@") else self.text.split()[0]


@dataclass
class SassLoop:
    start: int          # index of the first instruction of the body (the branch target)
    end: int            # index of the backward branch
    children: list["SassLoop"] = field(default_factory=list)
    source: tuple | None = None   # (file, line) of the source `for` it runs

    def contains(self, other: "SassLoop") -> bool:
        return self.start <= other.start and other.end <= self.end


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """Instructions of the kernel's code section with the source line of each, and the labels' indices."""
    instructions, labels, location = [], {}, (None, None)
    for raw in text.splitlines():
        if m := _LINE_INFO.search(raw):
            location = (m["file"], int(m["line"]))
        elif m := _LABEL.match(raw):
            labels[m["label"]] = len(instructions)
        elif m := _INSTRUCTION.match(raw):
            instructions.append(Instruction(int(m["offset"], 16), m["text"], *location))
    return instructions, labels


def find_loops(instructions: list[Instruction], labels: dict[str, int]) -> list[SassLoop]:
    """Top-level SASS loops (backward branches), each with its nested loops. The unconditional branch to itself
    that ends every kernel (after EXIT, never reached) is not a loop."""
    loops = []
    for index, instruction in enumerate(instructions):
        branch = _BRANCH.search(instruction.text)
        if branch and labels[branch["label"]] <= index:
            start = labels[branch["label"]]
            if start == index and not instruction.text.startswith("@"):
                continue
            loops.append(SassLoop(start, index))
    loops.sort(key=lambda loop: (loop.start, -loop.end))
    roots: list[SassLoop] = []
    open_loops: list[SassLoop] = []
    for loop in loops:
        while open_loops and not open_loops[-1].contains(loop):
            if loop.start <= open_loops[-1].end:
                raise StaticCostError(f"SASS loops overlap without nesting at instructions {loop.start}-{loop.end}")
            open_loops.pop()
        (open_loops[-1].children if open_loops else roots).append(loop)
        open_loops.append(loop)
    return roots


def _walk(loops):
    for loop in loops:
        yield loop
        yield from _walk(loop.children)


def _own_indices(loop: SassLoop):
    """Indices of the loop's own instructions (not in a nested loop), last first."""
    nested = [(child.start, child.end) for child in loop.children]
    for index in range(loop.end, loop.start - 1, -1):
        if not any(start <= index <= end for start, end in nested):
            yield index


@dataclass
class SourceLoop:
    file: str
    node: ast.For

    @property
    def where(self) -> str:
        path = Path(self.file)
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{self.node.lineno}"


@functools.cache
def _parsed(file: str) -> ast.Module:
    """A source file's syntax tree, parsed once: its nodes live as long as the process, so the caches below may
    key on their ids."""
    return ast.parse(Path(file).read_text())


def source_loops(files) -> dict[tuple, SourceLoop]:
    """(file, line) -> the `for ... in range(...)` / `tl.range(...)` loop whose header is there, in the
    repository's Python files among `files`."""
    loops = {}
    for file in files:
        path = Path(file)
        if not (path.suffix == ".py" and path.is_relative_to(ROOT) and path.exists()):
            continue
        for node in ast.walk(_parsed(file)):
            if isinstance(node, ast.For) and _range_arguments(node) is not None:
                loops[(file, node.lineno)] = SourceLoop(file, node)
    return loops


def _range_arguments(node: ast.For):
    call = node.iter
    if not isinstance(call, ast.Call):
        return None
    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
    return call.args if name == "range" else None


def map_loops(roots: list[SassLoop], instructions: list[Instruction], loops: dict[tuple, SourceLoop]) -> None:
    """Sets each SASS loop's source: the first `for` header line met walking back from its backward branch
    through its own instructions (those of nested loops belong to them)."""
    for loop in _walk(roots):
        for index in _own_indices(loop):
            key = (instructions[index].file, instructions[index].line)
            if key in loops:
                loop.source = key
                break
        else:
            raise StaticCostError(f"SASS loop at 0x{instructions[loop.start].offset:x}-"
                                  f"0x{instructions[loop.end].offset:x}: no source `for` line among its own "
                                  f"instructions")
    for loop in _walk(roots):
        for child in loop.children:
            # Two back edges of one loop would read as a loop nested in itself, its trip count squared.
            if child.start == loop.start and child.source == loop.source:
                raise StaticCostError(f"SASS loop at 0x{instructions[loop.start].offset:x}: two backward "
                                      f"branches of {loop.source}; the estimate does not handle them")


class _Unknown(Exception):
    pass


_COMPILED: dict[int, object] = {}


def _evaluate(expression: ast.expr, env: dict):
    code = _COMPILED.get(id(expression))
    if code is None:
        code = _COMPILED[id(expression)] = compile(ast.Expression(expression), "<kernel source>", "eval")
    try:
        return eval(code, {"__builtins__": {}}, env)
    except Exception as error:  # a tensor expression, or a name the launch and plan do not give
        raise _Unknown(f"{ast.unparse(expression)}: {error}") from None


_SCALAR_NODES = (ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.IfExp, ast.operator,
                 ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)
_GRID_QUERIES = ("program_id", "num_programs")
_SCALAR_ASSIGNMENTS: dict[int, list] = {}


def _is_scalar(expression: ast.expr) -> bool:
    """Whether `expression` can be a host scalar: names, constants, arithmetic, _meta(...), the meta table's column
    names (column.X, flowkern/kernels/glow_meta.py), tl.program_id and tl.num_programs (tensor expressions are left out before any evaluation: this runs ~10^5 times a kernel)."""
    for node in ast.walk(expression):
        if isinstance(node, ast.Call):
            func = node.func
            if not (getattr(func, "id", None) == "_meta" or (isinstance(func, ast.Attribute) and
                                                               func.attr in _GRID_QUERIES)):
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _GRID_QUERIES and getattr(node.value, "id", None) != "column":
                return False
        elif not isinstance(node, _SCALAR_NODES):
            return False
    return True


def _scalar_assignments(statements: list[ast.stmt]) -> list:
    """(target, value) of the single-name assignments among `statements`, value None where it is not a scalar."""
    key = id(statements)
    if key not in _SCALAR_ASSIGNMENTS:
        _SCALAR_ASSIGNMENTS[key] = [
            (statement.targets[0].id, statement.value if _is_scalar(statement.value) else None)
            for statement in statements
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)]
    return _SCALAR_ASSIGNMENTS[key]


def _assign_body(statements, env: dict, plan_meta) -> dict:
    """env after the straight-line scalar assignments among `statements` (X = _meta(meta_ptr, s, col) from the
    plan's meta table, or expressions of known names); anything else leaves its target unknown."""
    env = dict(env)
    for target, value in _scalar_assignments(statements):
        env.pop(target, None)
        if value is None:
            continue
        try:
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "_meta":
                step, column = (_evaluate(arg, env) for arg in value.args[1:])
                env[target] = int(plan_meta[step][column])
            else:
                env[target] = _evaluate(value, env)
        except _Unknown:
            pass
    return env


def _iterations(loop: SourceLoop, env: dict, plan_meta) -> list[dict]:
    """The environment of each iteration of `loop`."""
    try:
        bounds = range(*(int(_evaluate(arg, env)) for arg in _range_arguments(loop.node)))
    except _Unknown as error:
        raise StaticCostError(f"{loop.where}: cannot evaluate the loop's range bound ({error}); give the name "
                              f"a value as a kernel argument or as `_meta(meta_ptr, s, col)`") from None
    variable = loop.node.target.id if isinstance(loop.node.target, ast.Name) else None
    return [_assign_body(loop.node.body, {**env, variable: value} if variable else env, plan_meta)
            for value in bounds]


def _counted(indices, instructions) -> int:
    return sum(instructions[i].opcode != "NOP" for i in indices)


@dataclass
class SassProgram:
    """A kernel's SASS: instructions, loop tree mapped to source loops, and the kernel's source."""
    instructions: list[Instruction]
    roots: list[SassLoop]
    loops: dict[tuple, SourceLoop]
    kernel: object               # the @triton.jit function
    function: ast.FunctionDef    # its definition

    @property
    def static_instructions(self) -> int:
        return _counted(range(len(self.instructions)), self.instructions)


def analyse_sass(sass: str, kernel) -> SassProgram:
    """`kernel`'s SASS (nvdisasm with line info) parsed into loops, each mapped to its source loop."""
    instructions, labels = parse_sass(sass)
    roots = find_loops(instructions, labels)
    loops = source_loops({i.file for i in instructions if i.file})
    map_loops(roots, instructions, loops)
    file = inspect.getsourcefile(kernel.fn)
    function = next(f for f in ast.walk(_parsed(file))
                    if isinstance(f, ast.FunctionDef) and f.name == kernel.fn.__name__)
    return SassProgram(instructions, roots, loops, kernel, function)


class _Program:
    """`tl` in the evaluated source: one program (its index along axis 0) of the launch's grid."""

    def __init__(self, grid, index: int):
        self.grid, self.index = grid, index

    def program_id(self, axis):
        return self.index if axis == 0 else 0

    def num_programs(self, axis):
        return self.grid[axis] if axis < len(self.grid) else 1


def estimate(program: SassProgram, launch: Launch, plan_meta, program_id: int = 0) -> tuple[int, list[dict]]:
    """(instructions a thread of program `program_id` (along axis 0) issues, the loop table): straight-line code
    once, each SASS loop's own instructions once per iteration of its source loop, nested loops in each
    iteration's environment. The environment: the launch's scalar arguments and constexprs, `tl` as that program
    of its grid, the kernel's scalar assignments."""
    instructions = program.instructions
    env = {name: value for name, value in launch.values(program.kernel.arg_names).items()
           if isinstance(value, (int, float, bool, str))}
    env = _assign_body(program.function.body, {**env, "tl": _Program(launch.grid, program_id), "column": glow_meta},
                       plan_meta)
    rows: dict[int, dict] = {}

    def issued(loop: SassLoop, env: dict, depth: int) -> int:
        source = program.loops[loop.source]
        own = _counted(_own_indices(loop), instructions)
        iterations = _iterations(source, env, plan_meta)
        row = rows.setdefault(id(loop), dict(
            sass=f"0x{instructions[loop.start].offset:04x}-0x{instructions[loop.end].offset:04x}", depth=depth,
            own_instructions=own, source=source.where, trip_counts=set()))
        row["trip_counts"].add(len(iterations))
        return sum(own + sum(issued(child, inner, depth + 1) for child in loop.children) for inner in iterations)

    in_loops = {i for loop in program.roots for i in range(loop.start, loop.end + 1)}
    straight = _counted((i for i in range(len(instructions)) if i not in in_loops), instructions)
    total = straight + sum(issued(loop, env, 0) for loop in program.roots)
    table = [{**row, "trip_counts": sorted(row["trip_counts"])} for row in rows.values()]
    return total, table


# ---- 4. occupancy and grids ----

def programs_per_sm(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """(resident programs per SM, what limits them) on an H100-class SM."""
    warp_registers = math.ceil(registers * 32 / SM["register_unit"]) * SM["register_unit"]
    limits = {"registers": SM["registers"] // (warp_registers * num_warps),
              "shared memory": SM["shared_bytes"] // (shared_bytes + SM["reserved_shared_bytes"]),
              "warps": SM["warps"] // num_warps, "programs": SM["programs"]}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def grid_figures(programs: int, resident: int) -> dict:
    return dict(programs=programs, per_sm=round(programs / SM["sms"], 3), busy_sms=min(programs, SM["sms"]),
                waves=math.ceil(programs / (SM["sms"] * resident)) if resident else None)


# ---- the report ----

def build_report() -> dict:
    kernels = importlib.import_module(KERNELS_MODULE)
    rows = []
    for coupling in COUPLINGS:
        for mixing in MIXINGS:
            plan = _glow_plan(coupling, mixing)
            for activation, dtype in ACTIVATIONS.items():
                by_batch = {batch: record_launches(plan, dtype, batch) for batch in BATCHES}
                for label, _, _ in PASSES:
                    for position, launch in enumerate(by_batch[BATCHES[-1]][label]):
                        rows.append(dict(key={"pass": label, "coupling": coupling, "mixing": mixing,
                                              "activation": activation, "kernel": launch.kernel},
                                         launches={batch: by_batch[batch][label][position] for batch in BATCHES},
                                         plan_meta=plan.meta_host.tolist()))
    # B=64 and B=65536 (both multiples of 16) specialize alike: one compile, from the large batch's launch.
    print(f"compiling {len(rows)} kernels for sm_90 ...", file=sys.stderr, flush=True)
    resources = compile_launches([row["launches"][BATCHES[-1]] for row in rows])
    return dict(
        notice=NOTICE, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        kernels_source=str(Path(inspect.getsourcefile(kernels)).relative_to(ROOT)),
        kernels_source_sha256=hashlib.sha256(Path(inspect.getsourcefile(kernels)).read_bytes()).hexdigest(),
        git=_git_state(Path(inspect.getsourcefile(kernels))), triton=triton.__version__, glow=GLOW, sm=SM,
        method=__doc__.split("What it does", 1)[1].strip(),
        kernels=[_kernel_row(kernels, row, compiled) for row, compiled in zip(rows, resources)])


def _kernel_row(kernels, row: dict, compiled: dict) -> dict:
    launch = row["launches"][BATCHES[-1]]
    program = analyse_sass(compiled["sass"], getattr(kernels, launch.kernel))
    shared = compiled["static_shared"] + compiled["dynamic_shared"]
    warps = compiled["num_warps"]
    resident, limiter = programs_per_sm(compiled["registers"], shared, warps)
    constexprs = {k: v for k, v in launch.kwargs.items() if not k.startswith("num_")}
    batches, loop_tables = {}, {}
    for batch, batch_launch in row["launches"].items():
        first, loop_tables[batch] = estimate(program, batch_launch, row["plan_meta"])
        last, _ = estimate(program, batch_launch, row["plan_meta"], batch_launch.grid[0] - 1)
        grid_instructions = round((first + last) / 2 * batch_launch.programs)
        batches[str(batch)] = dict(grid_figures(batch_launch.programs, resident), first_program=first,
                                   last_program=last, grid_instructions=grid_instructions,
                                   warp_instructions_per_row=round(grid_instructions * warps / batch))
    large = BATCHES[-1]
    rows_per_tile = constexprs.get("BLOCK_B")
    return dict(
        row["key"], config=dict(constexprs=constexprs, num_warps=warps, num_stages=compiled["num_stages"]),
        registers=compiled["registers"], spill_bytes=compiled["stack"], shared_bytes=shared,
        sass_instructions=program.static_instructions,
        per_row_tile=(round(batches[str(large)]["grid_instructions"] * rows_per_tile / large)
                      if rows_per_tile else None),
        programs_per_sm=resident, occupancy_limiter=limiter, batches=batches, loops=loop_tables[large])


def _git_state(source: Path) -> str:
    """The commit, and whether the kernels' source differs from it (an "after" run before its commit)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "not a git checkout"
    modified = git("status", "--porcelain", "--", str(source)).stdout.strip()
    return head.stdout.strip() + (f" with {source.relative_to(ROOT)} modified" if modified else "")


def _key(row: dict) -> tuple:
    return row["pass"], row["coupling"], row["mixing"], row["activation"], row["kernel"]


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, (int, float)) else "-"


def markdown(report: dict) -> str:
    small, large = (str(b) for b in BATCHES)
    lines = [f"# Fused Glow kernels: {report['notice']}", "",
             f"Glow({GLOW['channels']}, levels={GLOW['levels']}, depth={GLOW['depth']}, hidden={GLOW['hidden']}); "
             f"{report['kernels_source']} sha256 {report['kernels_source_sha256'][:12]} (git: {report['git']}); "
             f"Triton {report['triton']}; {report['date']}. Occupancy and grids on an H100-class GPU ({SM['sms']} "
             f"SMs). `instr/row tile`: SASS instructions a thread issues per row tile (the grid's total over its "
             f"row tiles), estimated from the loop structure (bench/static_cost.py says how, and its limits); "
             f"`warp-instr/row`: instructions issued by all warps of the grid per input row at that batch. "
             f"Instruction counts are not times.", "",
             f"| pass | coupling | mixing | act | kernel | tile rows x chunk, warps | regs | spill B | smem B "
             f"| SASS instr | instr/row tile | warp-instr/row B={small} | warp-instr/row B={large} "
             f"| programs/SM (limit) | B={small}: programs (SMs busy) | B={large}: programs (waves) |",
             "|" + "---|" * 16]
    for row in report["kernels"]:
        c = row["config"]["constexprs"]
        a, b = row["batches"][small], row["batches"][large]
        lines.append(
            f"| {row['pass']} | {row['coupling']} | {row['mixing']} | {row['activation']} | {row['kernel']} "
            f"| {c.get('BLOCK_B', '-')} x {c.get('BLOCK_C', '-')}, {row['config']['num_warps']} "
            f"| {row['registers']} | {row['spill_bytes']} | {_n(row['shared_bytes'])} | {_n(row['sass_instructions'])} "
            f"| {_n(row['per_row_tile'])} | {_n(a['warp_instructions_per_row'])} "
            f"| {_n(b['warp_instructions_per_row'])} | {row['programs_per_sm']} ({row['occupancy_limiter']}) "
            f"| {a['programs']} ({a['busy_sms']}) | {b['programs']} ({b['waves']}) |")
    return "\n".join(lines) + "\n"


def comparison(before: dict, after: dict) -> str:
    """Before/after columns per kernel (matched by pass, coupling, mixing, activation and kernel name)."""
    small, large = (str(b) for b in BATCHES)
    earlier = {_key(row): row for row in before["kernels"]}
    lines = [f"# Before (kernels sha256 {before['kernels_source_sha256'][:12]}, git: {before['git']}) and after "
             f"(sha256 {after['kernels_source_sha256'][:12]}, git: {after['git']}): {NOTICE}", "",
             f"| pass | coupling | mixing | act | kernel | instr/row tile before | after | after/before "
             f"| warp-instr/row B={large} before | after | after/before | warp-instr/row B={small} before | after "
             f"| B={small} programs before | after | regs before | after | spill B before | after |",
             "|" + "---|" * 19]

    def ratio(new, old):
        return f"{new / old:.2f}" if isinstance(new, (int, float)) and isinstance(old, (int, float)) else "-"

    for row in after["kernels"]:
        old = earlier.get(_key(row))
        if old is None:
            old = {"batches": {small: {}, large: {}}}
        a_old, a_new = old["batches"][large], row["batches"][large]
        s_old, s_new = old["batches"][small], row["batches"][small]
        lines.append(
            f"| {' | '.join(_key(row))} | {_n(old.get('per_row_tile'))} | {_n(row['per_row_tile'])} "
            f"| {ratio(row['per_row_tile'], old.get('per_row_tile'))} | {_n(a_old.get('warp_instructions_per_row'))} "
            f"| {_n(a_new['warp_instructions_per_row'])} "
            f"| {ratio(a_new['warp_instructions_per_row'], a_old.get('warp_instructions_per_row'))} "
            f"| {_n(s_old.get('warp_instructions_per_row'))} | {_n(s_new['warp_instructions_per_row'])} "
            f"| {_n(s_old.get('programs'))} | {_n(s_new['programs'])} | {_n(old.get('registers'))} "
            f"| {row['registers']} | {_n(old.get('spill_bytes'))} | {row['spill_bytes']} |")
    for key in sorted(earlier.keys() - {_key(row) for row in after["kernels"]}):
        lines.append(f"| {' | '.join(key)} | (before only) |" + " |" * 13)

    # Per pass, whatever kernels carry it (item 3 may split, rename or add kernels).
    def per_pass(report: dict, batch: str) -> dict:
        totals: dict[tuple, int] = {}
        for row in report["kernels"]:
            key = _key(row)[:4]
            totals[key] = totals.get(key, 0) + row["batches"][batch]["warp_instructions_per_row"]
        return totals

    lines += ["", "Per pass, all its kernels: warp instructions per row.", "",
              f"| pass | coupling | mixing | act | B={large} before | after | after/before | B={small} before | after "
              f"| after/before |", "|" + "---|" * 10]
    old_large, new_large = per_pass(before, large), per_pass(after, large)
    old_small, new_small = per_pass(before, small), per_pass(after, small)
    for key in dict.fromkeys([*new_large, *old_large]):
        lines.append(f"| {' | '.join(key)} | {_n(old_large.get(key))} | {_n(new_large.get(key))} "
                     f"| {ratio(new_large.get(key), old_large.get(key))} | {_n(old_small.get(key))} "
                     f"| {_n(new_small.get(key))} | {ratio(new_small.get(key), old_small.get(key))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the report (a .md goes beside it)")
    parser.add_argument("--compare", type=Path, help="an earlier report: print and write before/after columns")
    args = parser.parse_args(argv)
    report = build_report()
    table = markdown(report)
    if args.compare:
        table += "\n" + comparison(json.loads(args.compare.read_text()), report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    args.json.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
