"""Shared by the memory-bound Triton kernels: how a [B, C] / [B, C, H, W] tensor is addressed, and tile sizes.

Every tensor is seen as [B, C, P] (P = H*W pixels, 1 for [B, C]) with arbitrary strides, and tiled as rows (samples)
x columns (the C*P values of a sample, column n = channel n // P, pixel n % P). Kernels read inputs through their
strides (slices, transposes, channels_last and stride-0 broadcasts need no copy) and write contiguous outputs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Elements per program tile: 16 rows x 256 columns keeps 16-byte vector loads with enough bytes in flight per SM;
# 8 warps (16 elements a thread) keep the affine kernels near 128 registers a thread (4 warps need ~230).
TILE_ELEMENTS = 4096
MAX_BLOCK_COLUMNS = 256
# Under the interpreter every program costs ~1 ms, so only a few; still more than one, so the partial-sum
# reductions across programs are exercised by the CPU tests.
_INTERPRETED_PROGRAMS = 4


def _fix_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter converts a runtime scalar (a 1-element array) to a loop bound with int(array), which
    NumPy >= 2.4 rejects (triton-lang/triton#9171), so `for i in range(0, n, BLOCK)` fails on CPU. Convert via a
    0-d view instead, as the upstream fix does. Compiled (GPU) Triton is unaffected."""
    from triton.runtime import interpreter

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None or getattr(patch_lang_tensor, "_flowkern_fixed", False):
        return

    def patch_with_scalar_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patch_with_scalar_index._flowkern_fixed = True
    interpreter._patch_lang_tensor = patch_with_scalar_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_loop_bounds()


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x as [B, C, P] (a view; a copy only when H and W cannot be merged into one stride) and P."""
    if x.dim() == 2:
        return x.unsqueeze(2), 1
    return x.flatten(2), x.shape[2] * x.shape[3]


def strides(x3: torch.Tensor) -> tuple[int, int, int]:
    return x3.stride(0), x3.stride(1), x3.stride(2)


def inner_contiguous(x3: torch.Tensor) -> bool:
    """Whether a sample's C*P values are contiguous in memory, so a column index is its offset within the row."""
    _, c, p = x3.shape
    return (p == 1 or x3.stride(2) == 1) and (c == 1 or x3.stride(1) == p)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute (and keep log-dets and partial sums) in float64 for float64 data, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_type(dtype: torch.dtype):
    """accumulate_dtype as a Triton type (fp16/bf16 are loaded and widened to float32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def blocks(rows: int, columns: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_N) for a rows x columns problem: power-of-two tiles of about TILE_ELEMENTS elements."""
    block_n = min(triton.next_power_of_2(columns), MAX_BLOCK_COLUMNS)
    # At least 2 rows, so a tile is never a single-row arange (a shape compiled nowhere else in these kernels).
    block_b = max(2, min(triton.next_power_of_2(rows), TILE_ELEMENTS // block_n))
    return block_b, block_n


def warps(block_b: int, block_n: int) -> int:
    return 8 if block_b * block_n >= TILE_ELEMENTS else 4


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs saturate the device: reductions split their work to reach about this many."""
    if device.type != "cuda":
        return _INTERPRETED_PROGRAMS
    return 8 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def column_splits(row_blocks: int, columns: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns_per_split) for a row reduction: split long rows when there are too few row blocks."""
    column_blocks = triton.cdiv(columns, block_n)
    wanted = max(1, min(column_blocks, triton.cdiv(target_programs(device), row_blocks)))
    columns_per_split = triton.cdiv(column_blocks, wanted) * block_n
    return triton.cdiv(columns, columns_per_split), columns_per_split


@triton.jit
def sample_offsets(rows, cols, P, stride_b, stride_c, stride_p, INNER_CONTIGUOUS: tl.constexpr):
    """Element offsets of a [rows, cols] tile of a [B, C, P] tensor (cols index the C*P values of a sample)."""
    if INNER_CONTIGUOUS:
        inner = cols.to(tl.int64)
    else:
        inner = (cols // P).to(tl.int64) * stride_c + (cols % P).to(tl.int64) * stride_p
    return rows.to(tl.int64)[:, None] * stride_b + inner[None, :]
