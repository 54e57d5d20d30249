"""The Triton engine of the channelwise ops (csrc/common/channelwise.cuh has the C++ side of the same idea): an op
is the arithmetic of one element; the engine does the addressing, the tiles and the fixed-order sums.

An op's `element(ins, params, rows, scalars)` is a @triton.jit function of tuples, returning (outs, row_terms,
channel_terms), each a tuple:
  - ins: every data input as a [BLOCK_B, BLOCK_N] tile in the compute type (fp64 for fp64 data, else fp32);
  - params: every per-channel parameter as a [1, BLOCK_N] row, the channel's value at each column;
  - rows: every row input ([B], e.g. an upstream log-det gradient) as a [BLOCK_B, 1] column;
  - scalars: the op's float arguments.
What it returns broadcasts to the tile; the engine drops the padding lanes. Row sums (log-dets) add each row's
terms over its C*P columns; `finish_row(k, sum, n)` turns the sum of n terms into row sum k, and must be additive
over a split of the columns (long rows are split across programs). Channel sums (parameter gradients) add each
channel's terms over every row and pixel; `finish_channel(k, sum, scalars)` turns that into channel sum k. A row sum
that depends on the parameters only (an affine op's log-det) is `row_term(params, scalars)` instead: each element's
term from its channel's parameters ([BLOCK_C] vectors), summed over the channels once per row block. An op has row
sums or channel sums (at most two), not both.

Every tensor is seen as [B, C, P] with its own strides (see _layout); outputs are contiguous. No atomics: channel
sums go through per-program partials reduced by a second kernel, so results are deterministic.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from ._layout import (accumulate_dtype, as_rows, blocks, column_splits, compute_type, inner_contiguous,
                      sample_offsets, strides, target_programs, warps)

MAX_SUMS = 2   # row sums or channel sums of one op (the kernels keep each in its own accumulator)
# No kernel argument may be called `params`: Triton 3.6's argument binder names its own dict so, and a launch then
# fails to specialize it (only on a GPU: the interpreter does not bind).


@triton.jit
def _identity_row(k: tl.constexpr, total, n):
    return total


@triton.jit
def _identity_channel(k: tl.constexpr, total, scalars):
    return total


@triton.jit
def _tiles(ins, in_strides, INNER: tl.constexpr, per_channel_in, rows_in, row_strides, rows, cols, P, row_mask,
           col_mask, COMPUTE: tl.constexpr):
    """The element function's arguments for one [rows x cols] tile: (ins, params, rows)."""
    mask = row_mask[:, None] & col_mask[None, :]
    values = ()
    for k in tl.static_range(len(ins)):
        stride_b, stride_c, stride_p = in_strides[k]
        offsets = sample_offsets(rows, cols, P, stride_b, stride_c, stride_p, INNER[k])
        values = values + (tl.load(ins[k] + offsets, mask=mask, other=0.0).to(COMPUTE),)
    channels = cols // P
    per_channel = ()
    for k in tl.static_range(len(per_channel_in)):
        values_k = tl.load(per_channel_in[k] + channels, mask=col_mask, other=0.0)
        per_channel = per_channel + (values_k.to(COMPUTE)[None, :],)
    per_row = ()
    for k in tl.static_range(len(rows_in)):
        row_values = tl.load(rows_in[k] + rows.to(tl.int64) * row_strides[k], mask=row_mask, other=0.0)
        per_row = per_row + (row_values.to(COMPUTE)[:, None],)
    return values, per_channel, per_row


@triton.jit
def _apply(ins, in_strides, per_channel_in, rows_in, row_strides, outs, scalars, rows, cols, P, N, row_mask,
           col_mask, ELEMENT: tl.constexpr, INNER: tl.constexpr, COMPUTE: tl.constexpr):
    """One tile: loads, the op, stores its outputs (contiguous rows of N); returns its (row terms, channel terms)."""
    values, per_channel, per_row = _tiles(ins, in_strides, INNER, per_channel_in, rows_in, row_strides, rows, cols, P,
                                          row_mask, col_mask, COMPUTE)
    results, row_terms, channel_terms = ELEMENT(values, per_channel, per_row, scalars)
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    for k in tl.static_range(len(outs)):
        tl.store(outs[k] + offsets, results[k].to(outs[k].dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])
    return row_terms, channel_terms


@triton.jit
def _add_terms(sum0, sum1, terms, row_mask, col_mask):
    """The running sums of terms 0 and 1 (an op has at most MAX_SUMS), padding lanes left out."""
    mask = row_mask[:, None] & col_mask[None, :]
    if len(terms) > 0:
        sum0 += tl.where(mask, terms[0], 0.0)
    if len(terms) > 1:
        sum1 += tl.where(mask, terms[1], 0.0)
    return sum0, sum1


@triton.jit
def _map_kernel(ins, in_strides, per_channel_in, rows_in, row_strides, outs, row_sums_ptr, scalars, B, C, P,
                ELEMENT: tl.constexpr, ROW_TERM: tl.constexpr, INNER: tl.constexpr, COMPUTE: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The elementwise pass; with ROW_TERM, the programs of column block 0 also write their rows' sum over
    channels of ROW_TERM(the channel's parameters, scalars), times P (a row sum that is the same for every row)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < B, cols < C * P
    _apply(ins, in_strides, per_channel_in, rows_in, row_strides, outs, scalars, rows, cols, P, C * P, row_mask,
           col_mask, ELEMENT, INNER, COMPUTE)
    if ROW_TERM is not None:
        if tl.program_id(1) == 0:
            total = tl.zeros([BLOCK_C], dtype=COMPUTE)
            for c0 in range(0, C, BLOCK_C):
                channels = c0 + tl.arange(0, BLOCK_C)
                channel_params = ()
                for k in tl.static_range(len(per_channel_in)):
                    channel_params = channel_params + (
                        tl.load(per_channel_in[k] + channels, mask=channels < C, other=0.0).to(COMPUTE),)
                total += tl.where(channels < C, ROW_TERM(channel_params, scalars), 0.0)
            row_sum = tl.sum(total, axis=0) * P
            tl.store(row_sums_ptr + rows, tl.zeros([BLOCK_B], dtype=COMPUTE) + row_sum, mask=row_mask)


@triton.jit
def _row_sums_kernel(ins, in_strides, per_channel_in, rows_in, row_strides, outs, partial_ptr, scalars, B, C,
                     P, columns_per_split, ELEMENT: tl.constexpr, FINISH: tl.constexpr, SUMS: tl.constexpr,
                     INNER: tl.constexpr, COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[split, k, b]: row sum k of row b over the columns of one split (finished for that split)."""
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    N = C * P
    sum0 = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    sum1 = sum0
    first = pid_s * columns_per_split
    for n0 in range(first, first + columns_per_split, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        terms, _ = _apply(ins, in_strides, per_channel_in, rows_in, row_strides, outs, scalars, rows, cols, P, N,
                          row_mask, col_mask, ELEMENT, INNER, COMPUTE)
        sum0, sum1 = _add_terms(sum0, sum1, terms, row_mask, col_mask)
    columns_here = tl.minimum(first + columns_per_split, N) - first
    partial = partial_ptr + pid_s.to(tl.int64) * SUMS * B + rows
    tl.store(partial, FINISH(0, tl.sum(sum0, axis=1), columns_here), mask=row_mask)
    if SUMS > 1:
        tl.store(partial + B, FINISH(1, tl.sum(sum1, axis=1), columns_here), mask=row_mask)


@triton.jit
def _channel_partials_kernel(ins, in_strides, per_channel_in, rows_in, row_strides, outs, partial_ptr, scalars,
                             B, C, P, rows_per_program, ELEMENT: tl.constexpr, SUMS: tl.constexpr, INNER: tl.constexpr,
                             COMPUTE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """partial[g, k, n]: the terms k of column n summed over the rows of group g (rows_per_program rows)."""
    pid_g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    N = C * P
    col_mask = cols < N
    sum0 = tl.zeros([BLOCK_B, BLOCK_N], dtype=COMPUTE)
    sum1 = sum0
    for r0 in range(0, rows_per_program, BLOCK_B):
        rows = pid_g * rows_per_program + r0 + tl.arange(0, BLOCK_B)
        _, terms = _apply(ins, in_strides, per_channel_in, rows_in, row_strides, outs, scalars, rows, cols, P, N,
                          rows < B, col_mask, ELEMENT, INNER, COMPUTE)
        sum0, sum1 = _add_terms(sum0, sum1, terms, rows < B, col_mask)
    partial = partial_ptr + pid_g.to(tl.int64) * SUMS * N + cols
    tl.store(partial, tl.sum(sum0, axis=0), mask=col_mask)
    if SUMS > 1:
        tl.store(partial + N, tl.sum(sum1, axis=0), mask=col_mask)


@triton.jit
def _channel_reduce_kernel(partial_ptr, sums, scalars, groups, C, P, FINISH: tl.constexpr, SUMS: tl.constexpr,
                           COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """sums[k][c] = FINISH(k, the partials k of channel c over groups g and pixels p, scalars)."""
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    N = C * P
    for k in tl.static_range(SUMS):
        total = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
        for r0 in range(0, groups * P, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)   # r = g * P + p
            offsets = ((r // P).to(tl.int64) * SUMS + k)[:, None] * N + channels[None, :] * P + (r % P)[:, None]
            total += tl.load(partial_ptr + offsets, mask=(r < groups * P)[:, None] & channel_mask[None, :], other=0.0)
        result = FINISH(k, tl.sum(total, axis=0), scalars)
        tl.store(sums[k] + channels, result.to(sums[k].dtype.element_ty), mask=channel_mask)


@dataclasses.dataclass(frozen=True)
class Channelwise:
    """One channelwise op on the Triton backend. name: the op's (for errors); args: its launcher's arguments in
    order as "name:role", role 'd' a data tensor ([B, C] or [B, C, H, W]; any [B, ...] when `flat`, as one
    channel), 'r' a row tensor [B], 'p' a per-channel parameter [C], 's' a float (the op's kRoles in csrc/ops);
    outputs: data outputs, in the dtype of data input `dtype_from`; row_sums: [B] vectors in the compute dtype;
    channel_sums: [C] vectors, sum k in parameter k's dtype. Calling it checks the arguments (ValueError naming
    the argument), runs the op and returns its results in that order."""
    name: str
    args: str
    element: triton.JITFunction
    outputs: int = 1
    row_sums: int = 0
    channel_sums: int = 0
    dtype_from: int = 0
    flat: bool = False
    finish_row: triton.JITFunction = _identity_row
    finish_channel: triton.JITFunction = _identity_channel
    row_term: triton.JITFunction | None = None

    def __post_init__(self):
        if self.row_sums and self.channel_sums or max(self.row_sums, self.channel_sums) > MAX_SUMS:
            raise ValueError(f"a channelwise op has at most {MAX_SUMS} row sums or channel sums, not both")
        if self.row_term is not None and self.row_sums != 1:
            raise ValueError("row_term gives one row sum")

    @functools.cached_property
    def arguments(self) -> list[tuple[str, str]]:
        """(name, role) of each argument, parsed once."""
        return [tuple(arg.split(":")) for arg in self.args.split()]

    @property
    def roles(self) -> str:
        return "".join(role for _, role in self.arguments)

    def _checked(self, args) -> dict[str, list]:
        """The arguments by role, checked against the data input `dtype_from` (ValueError naming the argument)."""
        named = list(zip(self.arguments, args, strict=True))
        by_role = {role: [(name, a) for (name, r), a in named if r == role] for role in "drps"}
        like_name, like = by_role["d"][self.dtype_from]
        fail = f"{self.name}: "
        if like.dim() < 1 or like.shape[0] == 0 or (not self.flat and like.dim() not in (2, 4)):
            raise ValueError(fail + f"{like_name} must be {'[B, ...]' if self.flat else '[B, C] or [B, C, H, W]'} "
                             f"with B > 0, got shape {tuple(like.shape)}")
        batch, channels = like.shape[0], 1 if self.flat else like.shape[1]
        expected = {"d": tuple(like.shape), "r": (batch,), "p": (channels,)}
        for role in "drp":
            for name, t in by_role[role]:
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise ValueError(fail + f"{name} must be a floating-point tensor, got "
                                     f"{getattr(t, 'dtype', type(t).__name__)}")
                if tuple(t.shape) != expected[role]:
                    raise ValueError(fail + f"{name} must have shape {list(expected[role])}, got {list(t.shape)}")
                if t.device != like.device:
                    raise ValueError(fail + f"{name} is on {t.device} but {like_name} is on {like.device}")
        return {role: [a for _, a in values] for role, values in by_role.items()}

    def __call__(self, *args):
        by_role = self._checked(args)
        data, row_inputs, params, scalars = by_role["d"], by_role["r"], by_role["p"], tuple(map(float, by_role["s"]))
        like = data[self.dtype_from]
        views = [(t.reshape(t.shape[0], 1, -1) if self.flat else as_rows(t)[0]).to(like.dtype) for t in data]
        batch, channels, pixels = views[0].shape
        columns = channels * pixels
        outs = tuple(torch.empty(like.shape, dtype=like.dtype, device=like.device) for _ in range(self.outputs))
        block_b, block_n = blocks(batch, columns)
        tensors = dict(ins=tuple(views), in_strides=tuple(strides(v) for v in views), per_channel_in=tuple(params),
                       rows_in=tuple(row_inputs), row_strides=tuple(r.stride(0) for r in row_inputs), outs=outs)
        constants = dict(ELEMENT=self.element, INNER=tuple(inner_contiguous(v) for v in views),
                         COMPUTE=compute_type(like.dtype), BLOCK_B=block_b, BLOCK_N=block_n,
                         num_warps=warps(block_b, block_n))
        row_blocks, column_blocks = triton.cdiv(batch, block_b), triton.cdiv(columns, block_n)
        acc = accumulate_dtype(like.dtype)
        if self.row_sums and self.row_term is None:
            splits, columns_per_split = column_splits(row_blocks, columns, block_n, like.device)
            partial = torch.empty((splits, self.row_sums, batch), dtype=acc, device=like.device)
            _row_sums_kernel[(row_blocks, splits)](
                **tensors, partial_ptr=partial, scalars=scalars, B=batch, C=channels, P=pixels,
                columns_per_split=columns_per_split, FINISH=self.finish_row, SUMS=self.row_sums, **constants)
            return self._results(*outs, *(partial[0] if splits == 1 else partial.sum(0)))
        if self.channel_sums:
            # Each program walks a group of rows so the partials stay small ([groups, sums, C*P]) at large batch.
            groups = max(1, min(row_blocks, triton.cdiv(target_programs(like.device), column_blocks)))
            rows_per_program = triton.cdiv(row_blocks, groups) * block_b
            groups = triton.cdiv(batch, rows_per_program)
            partial = torch.empty((groups, self.channel_sums, columns), dtype=acc, device=like.device)
            _channel_partials_kernel[(groups, column_blocks)](
                **tensors, partial_ptr=partial, scalars=scalars, B=batch, C=channels, P=pixels,
                rows_per_program=rows_per_program, SUMS=self.channel_sums, **constants)
            sums = tuple(torch.empty(channels, dtype=p.dtype, device=like.device) for p in params[:self.channel_sums])
            if pixels == 1:   # partial columns are channels: a block of channels per program, loads along channels
                block_c = min(triton.next_power_of_2(channels), 128)
                block_r = max(2, min(triton.next_power_of_2(groups), 32))
            else:             # each channel owns P adjacent columns: two channels per program, loads along pixels
                block_c, block_r = 2, max(2, min(triton.next_power_of_2(groups * pixels), 128))
            _channel_reduce_kernel[(triton.cdiv(channels, block_c),)](
                partial, sums, scalars, groups, channels, pixels, FINISH=self.finish_channel, SUMS=self.channel_sums,
                COMPUTE=constants["COMPUTE"], BLOCK_R=block_r, BLOCK_C=block_c)
            return self._results(*outs, *sums)
        row_sums = (torch.empty(batch, dtype=acc, device=like.device),) if self.row_term is not None else ()
        _map_kernel[(row_blocks, column_blocks)](
            **tensors, row_sums_ptr=row_sums[0] if row_sums else None, scalars=scalars, B=batch, C=channels, P=pixels,
            ROW_TERM=self.row_term, BLOCK_C=min(triton.next_power_of_2(channels), 1024), **constants)
        return self._results(*outs, *row_sums)

    @staticmethod
    def _results(*results):
        return results[0] if len(results) == 1 else results
