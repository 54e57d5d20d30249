"""bench/static_cost.py, the static cost report of the fused Glow kernels: its launch recording, its SASS loop
weighting (on a small kernel compiled for sm_90) and its occupancy arithmetic. The fused Glow kernels' spills are
bounded by test_glow.py's Hopper compile test."""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

from tests.ops.kernel_checks import hopper_resources, needs_hopper_toolchain

ROOT = Path(__file__).resolve().parents[2]


def _load_report():
    spec = importlib.util.spec_from_file_location("static_cost", ROOT / "bench" / "static_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


static_cost = _load_report()


@triton.jit
def _meta(meta_ptr, s, col):
    """A per-step table entry, read as the Glow kernels read theirs: the report evaluates `_meta` calls by name."""
    return tl.load(meta_ptr + s * 16 + col)


@triton.jit
def _per_step_chunks_kernel(x_ptr, meta_ptr, S, n_tiles, BLOCK: tl.constexpr):
    """A grid-stride loop over tiles around a step loop whose chunk loop's bound comes from the per-step meta
    table, as in the Glow kernels."""
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        for s in range(S):
            channels = _meta(meta_ptr, s, 14)
            for c0 in range(0, channels, BLOCK):
                total += tl.load(x_ptr + tile * BLOCK + c0 + offsets)
    tl.store(x_ptr + offsets, total)


def _for_lines(function) -> list[int]:
    source, first = inspect.getsourcelines(function)
    return [first + i for i, line in enumerate(source) if line.lstrip().startswith("for ")]


@needs_hopper_toolchain
def test_sass_loops_are_weighted_by_the_source_trip_counts(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # line info of this file, not a cached copy's
    meta = [[0] * 14 + [channels, 0] for channels in (256, 128, 64)]
    # 5 tiles on 2 programs: program 0 takes 3, program 1 takes 2.
    launch = static_cost.Launch("_per_step_chunks_kernel", (2,), [{"tensor": "float32"}, {"tensor": "int64"},
                                                                  len(meta), 5], dict(BLOCK=32, num_warps=1))
    case = dict(module="tests.ops.test_static_cost", kernel=launch.kernel,
                launch=dict(args=launch.args, kwargs=launch.kwargs), sass=True)
    program = static_cost.analyse_sass(hopper_resources([case])[0]["sass"], _per_step_chunks_kernel)

    here = Path(__file__).relative_to(ROOT)
    sources = [f"{here}:{line}" for line in _for_lines(_per_step_chunks_kernel.fn)]
    for program_id, tiles in ((0, 3), (1, 2)):
        issued, loops = static_cost.estimate(program, launch, meta, program_id)
        assert [(loop["source"], loop["depth"], loop["trip_counts"]) for loop in loops] == [
            (sources[0], 0, [tiles]), (sources[1], 1, [3]), (sources[2], 2, [2, 4, 8])]
        own = [loop["own_instructions"] for loop in loops]
        straight = program.static_instructions - sum(own)
        assert issued == straight + tiles * (own[0] + 3 * own[1] + (8 + 4 + 2) * own[2])


def test_occupancy_counts_registers_by_warp_shared_memory_and_warps():
    # 255 registers: 8192 a warp, so one 8-warp program fills the register file.
    assert static_cost.programs_per_sm(255, 24 * 1024, 8) == (1, "registers")
    # 64 registers x 4 warps would allow 8 programs; 100 KB (+ 1 KB reserved) of shared memory only 2.
    assert static_cost.programs_per_sm(64, 100 * 1024, 4) == (2, "shared memory")
    assert static_cost.programs_per_sm(24, 0, 16) == (4, "warps")  # registers would allow 5
    assert static_cost.grid_figures(4, 1) == dict(programs=4, per_sm=0.03, busy_sms=4, waves=1)
    assert static_cost.grid_figures(4096, 2)["waves"] == 16


def test_every_pass_records_launches_with_all_kernel_arguments():
    kernels = importlib.import_module(static_cost.KERNELS_MODULE)
    plan = static_cost._glow_plan("affine", "lu")
    recorded = static_cost.record_launches(plan, torch.bfloat16, 64)
    assert set(recorded) == {label for label, _, _ in static_cost.PASSES}
    for label, launches in recorded.items():
        assert launches, label
        for launch in launches:
            kernel = getattr(kernels, launch.kernel)
            values = launch.values(kernel.arg_names)
            assert set(kernel.arg_names) <= set(values), (label, set(kernel.arg_names) - set(values))
            assert "num_warps" in launch.kwargs, label
            tensors = [v["tensor"] for v in values.values() if isinstance(v, dict) and "tensor" in v]
            assert "bfloat16" in tensors, (label, tensors)
