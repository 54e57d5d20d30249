// ActNorm on B rows of N = C * P values: y = (x + bias) exp(f logs) per channel, its inverse, and the backward.
//
// Forward / inverse: one grid-stride pass over the flat data in 16-byte vectors (a ChannelCursor gives each
// element's channel without a division per element); the forward's blocks also write the log-det rows.
// Backward: each thread owns a vector's worth of columns and walks a group of rows, writing dx and summing the
// parameter-gradient terms of its columns; per-group partials go to the workspace and a second kernel sums them
// per channel in a fixed order (no atomics: deterministic).
#include "cuda/dispatch.cuh"

namespace flowkern::cuda {
namespace {

template <typename T, bool Inverse>
__global__ void __launch_bounds__(kBlockThreads)
    actnorm_apply_kernel(const T* __restrict__ in, const acc_t<T>* __restrict__ bias,
                         const acc_t<T>* __restrict__ logs, int64_t batch, int64_t channels, int64_t pixels,
                         acc_t<T> logscale_factor, bool vector, T* __restrict__ out, acc_t<T>* __restrict__ log_det) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t total = batch * channels * pixels;
  const int64_t vectors = ceil_div(total, V);
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;

  if (first < vectors) {  // (the cursor divides by C and P, which may be 0 when there is no data)
    ChannelCursor cursor(first * V, channels, pixels);
    const ChannelStep step(stride * V, channels, pixels);
    // Consecutive elements mostly share a channel when P > 1: reload the parameters only when it changes.
    int64_t cached_channel = -1;
    A shift = A(0), scale = A(1);
    for (int64_t v = first; v < vectors; v += stride, cursor.advance(step, channels, pixels)) {
      const int64_t i = v * V;
      const int count = int(min(int64_t(V), total - i));
      A values[V];
      load_widened(values, in + i, count, vector);
      ChannelCursor at = cursor;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          if (at.channel != cached_channel) {
            cached_channel = at.channel;
            shift = bias[cached_channel];
            scale = exp_(Inverse ? -logscale_factor * logs[cached_channel] : logscale_factor * logs[cached_channel]);
          }
          values[k] = Inverse ? values[k] * scale - shift : (values[k] + shift) * scale;
        }
        at.next(channels, pixels);
      }
      store_rounded(out + i, values, count, vector);
    }
  }

  if constexpr (!Inverse) {
    // log_det[b] = P * sum_c f logs[c], the same for every row. Every block that owns rows sums logs in the same
    // order, so they all write the same value.
    if (int64_t(blockIdx.x) * blockDim.x < batch) {
      A partial = A(0);
      for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) partial += logscale_factor * logs[c];
      const A value = block_sum(partial) * A(pixels);
      for (int64_t b = first; b < batch; b += stride) log_det[b] = value;
    }
  }
}

// Geometry of the backward, from the sizes only (actnorm_bwd_workspace_bytes has no pointers): a block is
// tile_x threads across columns (V columns each) times tile_y across rows; blockIdx.y picks a group of rows.
struct BackwardPlan {
  int64_t columns, tile_x, tile_y, column_tiles, groups, rows_per_group;

  BackwardPlan(int64_t batch, int64_t channels, int64_t pixels, int vec) {
    columns = channels * pixels;
    const int64_t column_vectors = ceil_div(columns, vec);
    tile_x = std::min<int64_t>(kBlockThreads, std::max<int64_t>(1, column_vectors));
    tile_y = kBlockThreads / tile_x;
    column_tiles = std::max<int64_t>(1, ceil_div(column_vectors, tile_x));
    // Enough groups for about kPartialBlocks blocks, each with at least one row per thread row.
    const int64_t wanted = std::min(ceil_div(kPartialBlocks, column_tiles), ceil_div(batch, tile_y));
    rows_per_group = ceil_div(batch, std::max<int64_t>(1, wanted));
    groups = ceil_div(batch, rows_per_group);
  }

  // partials: [groups][2][columns] (sum dy s, sum dy (x + bias) s per column), then [groups] sums of dlog_det.
  int64_t partial_count() const { return groups * (2 * columns + 1); }
};

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    actnorm_bwd_partials_kernel(const T* __restrict__ dy, const acc_t<T>* __restrict__ dlog_det,
                                const T* __restrict__ x, const acc_t<T>* __restrict__ bias,
                                const acc_t<T>* __restrict__ logs, int64_t batch, int64_t channels, int64_t pixels,
                                acc_t<T> logscale_factor, int tile_x, int64_t rows_per_group, bool vector,
                                T* __restrict__ dx, acc_t<T>* __restrict__ partials) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t columns = channels * pixels;
  const int tile_y = kBlockThreads / tile_x;
  const int tx = threadIdx.x % tile_x, ty = threadIdx.x / tile_x;  // ty == tile_y: a spare thread
  const int64_t column = (int64_t(blockIdx.x) * tile_x + tx) * V;
  const int count = ty < tile_y ? int(max(int64_t(0), min(int64_t(V), columns - column))) : 0;
  const int64_t group = blockIdx.y, groups = gridDim.y;
  const int64_t row_begin = group * rows_per_group, row_end = min(batch, row_begin + rows_per_group);

  A shift[V], scale[V], sum_dy_scaled[V], sum_dy_y[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t channel = k < count ? (column + k) / pixels : 0;
    shift[k] = k < count ? bias[channel] : A(0);
    scale[k] = k < count ? exp_(logscale_factor * logs[channel]) : A(0);
    sum_dy_scaled[k] = sum_dy_y[k] = A(0);
  }
  if (count > 0) {
    for (int64_t row = row_begin + ty; row < row_end; row += tile_y) {
      const int64_t offset = row * columns + column;
      A grad[V], value[V];
      load_widened(grad, dy + offset, count, vector);
      load_widened(value, x + offset, count, vector);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        grad[k] *= scale[k];  // dx = dy s
        sum_dy_scaled[k] += grad[k];
        sum_dy_y[k] += grad[k] * (value[k] + shift[k]);
      }
      store_rounded(dx + offset, grad, count, vector);
    }
  }

  // Sum the tile_y thread rows of each column, in thread-row order.
  __shared__ A column_sums[2][kBlockThreads * V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    column_sums[0][threadIdx.x * V + k] = sum_dy_scaled[k];
    column_sums[1][threadIdx.x * V + k] = sum_dy_y[k];
  }
  __syncthreads();
  if (ty == 0) {
    for (int k = 0; k < count; ++k) {
      A dbias = A(0), dlogs = A(0);
      for (int t = 0; t < tile_y; ++t) {
        dbias += column_sums[0][(t * tile_x + tx) * V + k];
        dlogs += column_sums[1][(t * tile_x + tx) * V + k];
      }
      partials[(group * 2) * columns + column + k] = dbias;
      partials[(group * 2 + 1) * columns + column + k] = dlogs;
    }
  }

  // One block per group also sums the group's dlog_det (the P f sum_b dlog_det[b] term of every dlogs[c]).
  if (blockIdx.x == 0) {
    A partial = A(0);
    for (int64_t row = row_begin + threadIdx.x; row < row_end; row += blockDim.x) partial += dlog_det[row];
    partial = block_sum(partial);
    if (threadIdx.x == 0) partials[groups * 2 * columns + group] = partial;
  }
}

// One warp per channel: dbias[c] = sum over groups g and pixels p of partials[g][0][c P + p], dlogs likewise from
// partials[g][1] times f, plus f P sum_g (dlog_det sum of group g).
template <typename A>
__global__ void __launch_bounds__(kBlockThreads)
    actnorm_param_grads_kernel(const A* __restrict__ partials, int64_t groups, int64_t channels, int64_t pixels,
                               A logscale_factor, A* __restrict__ dbias, A* __restrict__ dlogs) {
  const int64_t channel = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (channel >= channels) return;  // whole warps leave together
  const int64_t columns = channels * pixels;
  A sum_dbias = A(0), sum_dlogs = A(0), sum_dlog_det = A(0);
  for (int64_t e = lane; e < groups * pixels; e += 32) {
    const int64_t group = e / pixels, column = channel * pixels + e % pixels;
    sum_dbias += partials[(group * 2) * columns + column];
    sum_dlogs += partials[(group * 2 + 1) * columns + column];
  }
  for (int64_t group = lane; group < groups; group += 32) sum_dlog_det += partials[groups * 2 * columns + group];
  sum_dbias = warp_sum(sum_dbias);
  sum_dlogs = warp_sum(sum_dlogs);
  sum_dlog_det = warp_sum(sum_dlog_det);
  if (lane == 0) {
    dbias[channel] = sum_dbias;
    dlogs[channel] = logscale_factor * sum_dlogs + logscale_factor * A(pixels) * sum_dlog_det;
  }
}

template <typename T, bool Inverse>
void launch_apply(const void* in, const void* bias, const void* logs, int64_t batch, int64_t channels, int64_t pixels,
                  double logscale_factor, void* out, void* log_det, Stream stream) {
  using A = acc_t<T>;
  const bool vector = is_aligned(in, sizeof(Pack<T, kVec<T>>)) && is_aligned(out, sizeof(Pack<T, kVec<T>>));
  const int64_t vectors = ceil_div(batch * channels * pixels, kVec<T>);
  // The forward also needs threads for the log-det rows.
  const unsigned grid = grid_for(std::max(vectors, Inverse ? int64_t(0) : batch), kBlockThreads);
  actnorm_apply_kernel<T, Inverse><<<grid, kBlockThreads, 0, cuda_stream(stream)>>>(
      static_cast<const T*>(in), static_cast<const A*>(bias), static_cast<const A*>(logs), batch, channels, pixels,
      A(logscale_factor), vector, static_cast<T*>(out), static_cast<A*>(log_det));
  check_launch("actnorm_apply_kernel");
}

}  // namespace

void actnorm_fwd(const void* x, DType dtype, const void* bias, const void* logs, int64_t batch, int64_t channels,
                 int64_t pixels, double logscale_factor, void* y, void* log_det, Stream stream) {
  dispatch_dtype(dtype, "actnorm_fwd", [&](auto tag) {
    launch_apply<decltype(tag), false>(x, bias, logs, batch, channels, pixels, logscale_factor, y, log_det, stream);
  });
}

void actnorm_inv(const void* y, DType dtype, const void* bias, const void* logs, int64_t batch, int64_t channels,
                 int64_t pixels, double logscale_factor, void* x, Stream stream) {
  dispatch_dtype(dtype, "actnorm_inv", [&](auto tag) {
    launch_apply<decltype(tag), true>(y, bias, logs, batch, channels, pixels, logscale_factor, x, nullptr, stream);
  });
}

int64_t actnorm_bwd_workspace_bytes(DType dtype, int64_t batch, int64_t channels, int64_t pixels) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, "actnorm_bwd_workspace_bytes", [&](auto tag) {
    using T = decltype(tag);
    bytes = BackwardPlan(batch, channels, pixels, kVec<T>).partial_count() * int64_t(sizeof(acc_t<T>));
  });
  return bytes;
}

void actnorm_bwd(const void* dy, const void* dlog_det, const void* x, DType dtype, const void* bias, const void* logs,
                 int64_t batch, int64_t channels, int64_t pixels, double logscale_factor, void* dx, void* dbias,
                 void* dlogs, void* workspace, Stream stream) {
  dispatch_dtype(dtype, "actnorm_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = kVec<T>;
    const BackwardPlan plan(batch, channels, pixels, V);
    // Vector access needs every row to start on a 16-byte boundary.
    const bool vector = plan.columns % V == 0 && is_aligned(dy, sizeof(Pack<T, V>)) &&
                        is_aligned(x, sizeof(Pack<T, V>)) && is_aligned(dx, sizeof(Pack<T, V>));
    A* partials = static_cast<A*>(workspace);
    const dim3 grid(static_cast<unsigned>(plan.column_tiles), static_cast<unsigned>(plan.groups));
    actnorm_bwd_partials_kernel<T><<<grid, kBlockThreads, 0, cuda_stream(stream)>>>(
        static_cast<const T*>(dy), static_cast<const A*>(dlog_det), static_cast<const T*>(x),
        static_cast<const A*>(bias), static_cast<const A*>(logs), batch, channels, pixels, A(logscale_factor),
        static_cast<int>(plan.tile_x), plan.rows_per_group, vector, static_cast<T*>(dx), partials);
    check_launch("actnorm_bwd_partials_kernel");
    const unsigned reduce_grid = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(channels * 32, kBlockThreads)));
    actnorm_param_grads_kernel<A><<<reduce_grid, kBlockThreads, 0, cuda_stream(stream)>>>(
        partials, plan.groups, channels, pixels, A(logscale_factor), static_cast<A*>(dbias), static_cast<A*>(dlogs));
    check_launch("actnorm_param_grads_kernel");
  });
}

}  // namespace flowkern::cuda
