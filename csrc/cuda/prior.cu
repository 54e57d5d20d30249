// N(0, I) prior on B rows of N values: log_prob[b] = -0.5 sum_n (z^2 + log 2 pi), and dz = -z dlog_prob[b].
//
// Forward: a team of threads per row (one warp for short rows, up to kMaxRowTeam for long ones) sums z^2 in
// 16-byte vectors and reduces in a fixed order. Backward: one grid-stride pass over the flat data, a
// ChannelCursor giving each element's row.
#include "cuda/dispatch.cuh"

namespace flowkern::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kMaxRowTeam)
    gaussian_log_prob_fwd_kernel(const T* __restrict__ z, int64_t batch, int64_t numel, int team, bool vector,
                                 acc_t<T>* __restrict__ log_prob) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const int lane = threadIdx.x % team;
  A sum_squares = A(0);
  if (row < batch) {
    const T* z_row = z + row * numel;
    for (int64_t n = int64_t(lane) * V; n < numel; n += int64_t(team) * V) {
      A values[V];
      load_widened(values, z_row + n, int(min(int64_t(V), numel - n)), vector);
#pragma unroll
      for (int k = 0; k < V; ++k) sum_squares += values[k] * values[k];  // the tail's padding is zero
    }
  }
  sum_squares = team_sum(sum_squares, team);
  if (row < batch && lane == 0) log_prob[row] = A(-0.5) * sum_squares - A(numel) * A(kHalfLog2Pi);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    gaussian_log_prob_bwd_kernel(const acc_t<T>* __restrict__ dlog_prob, const T* __restrict__ z, int64_t batch,
                                 int64_t numel, bool vector, T* __restrict__ dz) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t total = batch * numel;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t vectors = ceil_div(total, V);
  if (first < vectors) {  // (the cursor divides by N, which may be 0)
    // The data as [1, B, N]: the cursor's channel is the row.
    ChannelCursor cursor(first * V, batch, numel);
    const ChannelStep step(stride * V, batch, numel);
    for (int64_t v = first; v < vectors; v += stride, cursor.advance(step, batch, numel)) {
      const int64_t i = v * V;
      const int count = int(min(int64_t(V), total - i));
      A values[V];
      load_widened(values, z + i, count, vector);
      ChannelCursor at = cursor;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) values[k] = -values[k] * dlog_prob[at.channel];
        at.next(batch, numel);
      }
      store_rounded(dz + i, values, count, vector);
    }
  }
}

}  // namespace

void gaussian_log_prob_fwd(const void* z, DType dtype, int64_t batch, int64_t numel, void* log_prob, Stream stream) {
  dispatch_dtype(dtype, "gaussian_log_prob_fwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const bool vector = numel % V == 0 && is_aligned(z, sizeof(Pack<T, V>));  // every row on a 16-byte boundary
    const int team = row_team_threads(ceil_div(numel, V));
    const int block = std::max(team, kBlockThreads);
    const unsigned grid = static_cast<unsigned>(ceil_div(batch, block / team));
    gaussian_log_prob_fwd_kernel<T><<<grid, block, 0, cuda_stream(stream)>>>(
        static_cast<const T*>(z), batch, numel, team, vector, static_cast<acc_t<T>*>(log_prob));
    check_launch("gaussian_log_prob_fwd_kernel");
  });
}

void gaussian_log_prob_bwd(const void* dlog_prob, const void* z, DType dtype, int64_t batch, int64_t numel, void* dz,
                           Stream stream) {
  dispatch_dtype(dtype, "gaussian_log_prob_bwd", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const bool vector = is_aligned(z, sizeof(Pack<T, V>)) && is_aligned(dz, sizeof(Pack<T, V>));
    const unsigned grid = grid_for(ceil_div(batch * numel, V), kBlockThreads);
    gaussian_log_prob_bwd_kernel<T><<<grid, kBlockThreads, 0, cuda_stream(stream)>>>(
        static_cast<const acc_t<T>*>(dlog_prob), static_cast<const T*>(z), batch, numel, vector,
        static_cast<T*>(dz));
    check_launch("gaussian_log_prob_bwd_kernel");
  });
}

}  // namespace flowkern::cuda
