// The CUDA engine of the channelwise ops (common/channelwise.cuh; the ops in ops/registry.h).
//
// Three kernels, by what the op returns:
//   - data only: one grid-stride pass over the flat data in 16-byte vectors; a cursor carries each element's row,
//     channel and pixel (no division per element), and the channel's values are remade only when it changes;
//   - row sums: a team of threads per row (one warp for short rows, up to kMaxRowTeam) walks the row in vectors and
//     sums its terms in a fixed order;
//   - channel sums: each thread owns a vector's worth of columns and walks a group of rows; per-group partials go to
//     the workspace and a second kernel sums them per channel in a fixed order (no atomics: deterministic).
#include "cuda/dispatch.cuh"
#include "ops/registry.h"

namespace flowkern::cuda {
namespace {

// Row, channel and pixel of a flat index of [B, C, P] data, carried along as a loop advances it.
struct FlatCursor {
  int64_t row, channel, pixel;
  __device__ FlatCursor(int64_t i, int64_t channels, int64_t pixels)
      : row(i / (channels * pixels)), channel((i / pixels) % channels), pixel(i % pixels) {}
  __device__ __forceinline__ void next(int64_t channels, int64_t pixels) {
    if (++pixel == pixels) {
      pixel = 0;
      if (++channel == channels) channel = 0, ++row;
    }
  }
};

// How far a FlatCursor moves for a fixed step of the flat index.
struct FlatStep {
  int64_t rows, channels, pixels;
  __device__ FlatStep(int64_t step, int64_t num_channels, int64_t num_pixels)
      : rows(step / (num_channels * num_pixels)), channels((step / num_pixels) % num_channels),
        pixels(step % num_pixels) {}
};

__device__ __forceinline__ void advance(FlatCursor& at, const FlatStep& step, int64_t channels, int64_t pixels) {
  at.pixel += step.pixels;
  int64_t carry = 0;
  if (at.pixel >= pixels) at.pixel -= pixels, carry = 1;
  at.channel += step.channels + carry;
  carry = 0;
  if (at.channel >= channels) at.channel -= channels, carry = 1;
  at.row += step.rows + carry;
}

template <class Op, typename A>
struct Params {
  const A* values[slots(Roles<Op>::params)];
  __device__ explicit Params(const ChannelwiseArgs& a) {
#pragma unroll
    for (int k = 0; k < Roles<Op>::params; ++k) values[k] = static_cast<const A*>(a.params[k]);
  }
  __device__ typename Op::template Channel<A> channel(int64_t c, const double* scalars) const {
    return Op::template channel<A>(values, c, scalars);
  }
};

template <class Op, typename A>
__device__ __forceinline__ void load_rows(const ChannelwiseArgs& a, int64_t row, A (&values)[slots(Roles<Op>::rows)]) {
#pragma unroll
  for (int k = 0; k < Roles<Op>::rows; ++k) values[k] = static_cast<const A*>(a.rows[k])[row];
}

// Whether every data pointer of the op is aligned for 16-byte vectors.
template <class Op, typename T>
bool vectors_aligned(const ChannelwiseArgs& a) {
  bool aligned = true;
  for (int k = 0; k < Roles<Op>::inputs; ++k) aligned = aligned && is_aligned(a.inputs[k], sizeof(Pack<T, kVec<T>>));
  for (int k = 0; k < Op::kOutputs; ++k) aligned = aligned && is_aligned(a.outputs[k], sizeof(Pack<T, kVec<T>>));
  return aligned;
}

// V elements from flat index i: loads every input, calls fn(e, in, out) for each element e < count (the op and its
// terms are the caller's), stores every output.
template <class Op, typename T, typename Fn>
__device__ __forceinline__ void vector_of(const ChannelwiseArgs& a, int64_t i, int count, bool vector, Fn&& fn) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>, kIn = Roles<Op>::inputs, kOut = Op::kOutputs;
  A in[slots(kIn)][V], out[slots(kOut)][V];
#pragma unroll
  for (int k = 0; k < kIn; ++k) load_widened(in[k], static_cast<const T*>(a.inputs[k]) + i, count, vector);
#pragma unroll
  for (int e = 0; e < V; ++e) {
    if (e < count) {
      A x[slots(kIn)], y[slots(kOut)];
#pragma unroll
      for (int k = 0; k < kIn; ++k) x[k] = in[k][e];
      fn(e, x, y);
#pragma unroll
      for (int k = 0; k < kOut; ++k) out[k][e] = y[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kOut; ++k) store_rounded(static_cast<T*>(a.outputs[k]) + i, out[k], count, vector);
}

template <class Op, typename T>
__global__ void __launch_bounds__(kBlockThreads) channelwise_map_kernel(ChannelwiseArgs a, bool vector) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t total = a.batch * a.channels * a.pixels, vectors = ceil_div(total, V);
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  const Params<Op, A> params(a);
  if (first < vectors) {   // (the cursor divides by C and P, which may be 0 when there is no data)
    FlatCursor cursor(first * V, a.channels, a.pixels);
    const FlatStep step(stride * V, a.channels, a.pixels);
    // Consecutive elements mostly share a channel and a row: their values are remade only when those change.
    int64_t cached_channel = -1, cached_row = -1;
    typename Op::template Channel<A> ch{};
    A rows[slots(Roles<Op>::rows)], unused[1];
    for (int64_t v = first; v < vectors; v += stride, advance(cursor, step, a.channels, a.pixels)) {
      FlatCursor at = cursor;
      vector_of<Op, T>(a, v * V, int(min(int64_t(V), total - v * V)), vector, [&](int, const A* x, A* y) {
        if (at.channel != cached_channel) cached_channel = at.channel, ch = params.channel(at.channel, a.scalars);
        if (at.row != cached_row) cached_row = at.row, load_rows<Op>(a, at.row, rows);
        Op::element(x, ch, rows, y, unused, unused);
        at.next(a.channels, a.pixels);
      });
    }
  }
  if constexpr (Op::kRowSums > 0) {
    // Row sums from the channels only: every block whose first thread is below the batch sums the channels' terms
    // in the same order, so they all write the same values; the grid-stride loop over b reaches every row.
    if (int64_t(blockIdx.x) * blockDim.x < a.batch) {
#pragma unroll
      for (int k = 0; k < Op::kRowSums; ++k) {
        A partial = A(0);
        for (int64_t c = threadIdx.x; c < a.channels; c += blockDim.x)
          partial += Op::row_term(k, params.values, c, a.scalars);
        const A value = block_sum(partial) * A(a.pixels);
        for (int64_t b = first; b < a.batch; b += stride) static_cast<A*>(a.row_sums[k])[b] = value;
      }
    }
  }
}

template <class Op, typename T>
__global__ void __launch_bounds__(kMaxRowTeam) channelwise_row_sums_kernel(ChannelwiseArgs a, int team, bool vector) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>, S = Op::kRowSums;
  const int64_t columns = a.channels * a.pixels;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const int lane = threadIdx.x % team;
  A sums[S] = {};
  if (row < a.batch && int64_t(lane) * V < columns) {
    const Params<Op, A> params(a);
    A rows[slots(Roles<Op>::rows)], unused[1];
    load_rows<Op>(a, row, rows);
    ChannelCursor cursor(int64_t(lane) * V, a.channels, a.pixels);
    const ChannelStep step(int64_t(team) * V, a.channels, a.pixels);
    int64_t cached_channel = -1;
    typename Op::template Channel<A> ch{};
    for (int64_t n = int64_t(lane) * V; n < columns;
         n += int64_t(team) * V, cursor.advance(step, a.channels, a.pixels)) {
      ChannelCursor at = cursor;
      vector_of<Op, T>(a, row * columns + n, int(min(int64_t(V), columns - n)), vector, [&](int, const A* x, A* y) {
        if (at.channel != cached_channel) cached_channel = at.channel, ch = params.channel(at.channel, a.scalars);
        A terms[S];
        Op::element(x, ch, rows, y, terms, unused);
#pragma unroll
        for (int k = 0; k < S; ++k) sums[k] += terms[k];
        at.next(a.channels, a.pixels);
      });
    }
  }
#pragma unroll
  for (int k = 0; k < S; ++k) {   // every thread of the block takes part in the team sums
    const A total = team_sum(sums[k], team);
    if (row < a.batch && lane == 0) static_cast<A*>(a.row_sums[k])[row] = Op::finish_row(k, total, columns);
  }
}

// Geometry of the channel sums, from the sizes only (the workspace size has no pointers): a block is tile_x
// threads across columns (V columns each) times tile_y across rows; blockIdx.y picks a group of rows.
struct ChannelSumPlan {
  int64_t columns, tile_x, tile_y, column_tiles, groups, rows_per_group;

  ChannelSumPlan(int64_t batch, int64_t channels, int64_t pixels, int vec) {
    columns = channels * pixels;
    const int64_t column_vectors = ceil_div(columns, vec);
    tile_x = std::min<int64_t>(kBlockThreads, std::max<int64_t>(1, column_vectors));
    tile_y = kBlockThreads / tile_x;
    column_tiles = std::max<int64_t>(1, ceil_div(column_vectors, tile_x));
    // Enough groups for about kPartialBlocks blocks, and no more groups than batch / tile_y (fewer rows than
    // thread rows would leave whole thread rows idle in every group).
    const int64_t wanted = std::min(ceil_div(kPartialBlocks, column_tiles), ceil_div(batch, tile_y));
    rows_per_group = std::max<int64_t>(1, ceil_div(batch, std::max<int64_t>(1, wanted)));
    groups = ceil_div(batch, rows_per_group);
  }
};

// partials [groups][S][columns]: each column's sums of terms over the rows of a group, the group's thread rows
// added in order.
template <class Op, typename T>
__global__ void __launch_bounds__(kBlockThreads)
    channelwise_partials_kernel(ChannelwiseArgs a, int tile_x, int64_t rows_per_group, bool vector,
                                acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>, S = Op::kChannelSums;
  const int64_t columns = a.channels * a.pixels;
  const int tile_y = kBlockThreads / tile_x;
  const int tx = threadIdx.x % tile_x, ty = threadIdx.x / tile_x;   // ty == tile_y: a spare thread
  const int64_t column = (int64_t(blockIdx.x) * tile_x + tx) * V;
  const int count = ty < tile_y ? int(max(int64_t(0), min(int64_t(V), columns - column))) : 0;
  const int64_t group = blockIdx.y;
  const int64_t row_begin = group * rows_per_group, row_end = min(a.batch, row_begin + rows_per_group);

  A sums[S][V] = {};
  if (count > 0) {
    const Params<Op, A> params(a);
    typename Op::template Channel<A> ch[V];
#pragma unroll
    for (int e = 0; e < V; ++e) ch[e] = params.channel(e < count ? (column + e) / a.pixels : 0, a.scalars);
    for (int64_t row = row_begin + ty; row < row_end; row += tile_y) {
      A rows[slots(Roles<Op>::rows)], unused[1];
      load_rows<Op>(a, row, rows);
      vector_of<Op, T>(a, row * columns + column, count, vector, [&](int e, const A* x, A* y) {
        A terms[S];
        Op::element(x, ch[e], rows, y, unused, terms);
#pragma unroll
        for (int k = 0; k < S; ++k) sums[k][e] += terms[k];
      });
    }
  }

  __shared__ A column_sums[S][kBlockThreads * V];
#pragma unroll
  for (int k = 0; k < S; ++k)
#pragma unroll
    for (int e = 0; e < V; ++e) column_sums[k][threadIdx.x * V + e] = sums[k][e];
  __syncthreads();
  if (ty == 0) {
    for (int e = 0; e < count; ++e)
#pragma unroll
      for (int k = 0; k < S; ++k) {
        A total = A(0);
        for (int t = 0; t < tile_y; ++t) total += column_sums[k][(t * tile_x + tx) * V + e];
        partials[(group * S + k) * columns + column + e] = total;
      }
  }
}

// One warp per channel: channel_sums[k][c] = sum over groups g and pixels p of partials[g][k][c P + p].
template <class Op, typename A>
__global__ void __launch_bounds__(kBlockThreads)
    channelwise_reduce_kernel(ChannelwiseArgs a, const A* __restrict__ partials, int64_t groups) {
  const int64_t channel = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (channel >= a.channels) return;   // whole warps leave together
  const int64_t columns = a.channels * a.pixels;
  constexpr int S = Op::kChannelSums;
#pragma unroll
  for (int k = 0; k < S; ++k) {
    A total = A(0);
    for (int64_t e = lane; e < groups * a.pixels; e += 32)
      total += partials[(e / a.pixels * S + k) * columns + channel * a.pixels + e % a.pixels];
    total = warp_sum(total);
    if (lane == 0) static_cast<A*>(a.channel_sums[k])[channel] = Op::template finish_channel<A>(k, total, a.scalars);
  }
}

}  // namespace

template <class Op>
int64_t channelwise_workspace_bytes(DType dtype, int64_t batch, int64_t channels, int64_t pixels) {
  int64_t bytes = 0;
  if constexpr (Op::kChannelSums > 0) {
    dispatch_dtype(dtype, "channelwise_workspace_bytes", [&](auto tag) {
      using T = decltype(tag);
      const ChannelSumPlan plan(batch, channels, pixels, kVec<T>);
      bytes = plan.groups * Op::kChannelSums * plan.columns * int64_t(sizeof(acc_t<T>));
    });
  }
  return bytes;
}

template <class Op>
void channelwise(DType dtype, const ChannelwiseArgs& args, void* workspace, Stream stream) {
  dispatch_dtype(dtype, "channelwise", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = kVec<T>;
    const int64_t columns = args.channels * args.pixels;
    const cudaStream_t cuda = cuda_stream(stream);
    if constexpr (Op::kChannelSums > 0) {
      const ChannelSumPlan plan(args.batch, args.channels, args.pixels, V);
      // Vector access needs every row to start on a 16-byte boundary.
      const bool vector = columns % V == 0 && vectors_aligned<Op, T>(args);
      A* partials = static_cast<A*>(workspace);
      const dim3 grid(static_cast<unsigned>(plan.column_tiles), static_cast<unsigned>(plan.groups));
      if (args.batch > 0) {
        channelwise_partials_kernel<Op, T><<<grid, kBlockThreads, 0, cuda>>>(
            args, static_cast<int>(plan.tile_x), plan.rows_per_group, vector, partials);
        check_launch("channelwise_partials_kernel");
      }
      const unsigned reduce_grid = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(args.channels * 32, kBlockThreads)));
      channelwise_reduce_kernel<Op, A><<<reduce_grid, kBlockThreads, 0, cuda>>>(
          args, partials, args.batch > 0 ? plan.groups : 0);
      check_launch("channelwise_reduce_kernel");
    } else if constexpr (Op::kRowSums > 0 && !Op::kRowSumsFromChannels) {
      const bool vector = columns % V == 0 && vectors_aligned<Op, T>(args);
      const int team = row_team_threads(ceil_div(columns, V));
      const int block = std::max(team, kBlockThreads);
      const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(args.batch, block / team)));
      channelwise_row_sums_kernel<Op, T><<<grid, block, 0, cuda>>>(args, team, vector);
      check_launch("channelwise_row_sums_kernel");
    } else {
      const bool vector = vectors_aligned<Op, T>(args);
      // Row sums from the channels need a thread per row as well.
      const int64_t threads = std::max(ceil_div(args.batch * columns, V), Op::kRowSums > 0 ? args.batch : int64_t(0));
      const unsigned grid = grid_for(threads, kBlockThreads);
      channelwise_map_kernel<Op, T><<<grid, kBlockThreads, 0, cuda>>>(args, vector);
      check_launch("channelwise_map_kernel");
    }
  });
}

#define FLOWKERN_INSTANTIATE(Op)                                                                  \
  template int64_t channelwise_workspace_bytes<Op>(DType, int64_t, int64_t, int64_t);           \
  template void channelwise<Op>(DType, const ChannelwiseArgs&, void*, Stream);
FLOWKERN_CHANNELWISE_OPS(FLOWKERN_INSTANTIATE)
#undef FLOWKERN_INSTANTIATE

}  // namespace flowkern::cuda
