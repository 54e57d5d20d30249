// N(0, I) prior on the CPU: log_prob[b] = -0.5 sum_n (z^2 + log 2 pi) and dz = -z dlog_prob[b].
//
// The forward reduces each row in one task, in kLanes fixed partial sums (vectorized, the same result for any
// thread count); the backward is elementwise over flat chunks.
#include "cpu/dispatch.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;

template <typename T>
void forward(const T* z, int64_t batch, int64_t numel, acc_t<T>* log_prob, const ParallelFor& par) {
  using A = acc_t<T>;
  const A constant = A(-kHalfLog2Pi * double(numel));
  par(batch, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, numel)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* __restrict z_row = z + row * numel;
      A lanes[kLanes] = {};
      int64_t n = 0;
      for (; n + kLanes <= numel; n += kLanes)
        for (int j = 0; j < kLanes; ++j) {
          const A v = load_as<A>(z_row[n + j]);
          lanes[j] += v * v;
        }
      for (int j = 0; n + j < numel; ++j) {
        const A v = load_as<A>(z_row[n + j]);
        lanes[j] += v * v;
      }
      log_prob[row] = A(-0.5) * sum_lanes(lanes) + constant;
    }
  });
}

template <typename T>
void backward(const acc_t<T>* dlog_prob, const T* z, int64_t batch, int64_t numel, T* dz, const ParallelFor& par) {
  using A = acc_t<T>;
  par(batch * numel, kElementsPerTask, [&](int64_t flat_begin, int64_t flat_end) {
    for_row_segments(flat_begin, flat_end, numel, [&](int64_t row, int64_t begin, int64_t end) {
      const T* __restrict z_row = z + row * numel;
      T* __restrict dz_row = dz + row * numel;
      const A minus_d = -dlog_prob[row];
      for (int64_t n = begin; n < end; ++n) dz_row[n] = store_as<T>(load_as<A>(z_row[n]) * minus_d);
    });
  });
}

}  // namespace

void gaussian_log_prob_fwd(const void* z, DType dtype, int64_t batch, int64_t numel, void* log_prob,
                           const ParallelFor& par) {
  dispatch_dtype(dtype, "gaussian_log_prob_fwd", [&](auto t) {
    using T = decltype(t);
    forward(static_cast<const T*>(z), batch, numel, static_cast<acc_t<T>*>(log_prob), par);
  });
}

void gaussian_log_prob_bwd(const void* dlog_prob, const void* z, DType dtype, int64_t batch, int64_t numel, void* dz,
                           const ParallelFor& par) {
  dispatch_dtype(dtype, "gaussian_log_prob_bwd", [&](auto t) {
    using T = decltype(t);
    backward(static_cast<const acc_t<T>*>(dlog_prob), static_cast<const T*>(z), batch, numel, static_cast<T*>(dz),
             par);
  });
}

}  // namespace flowkern::cpu
