// ActNorm on the CPU: y = (x + bias) s per channel with s = exp(f logs), its inverse and its backward.
//
// Forward and inverse: one elementwise pass over flat chunks of the [B, C*P] data, with the per-channel scales
// computed once per call. Backward: dx and the parameter-gradient sums in one pass. Rows are split into a fixed
// number of groups (from the batch size only); each (group, channel block) task owns its slice of that group's
// partial sums, and the groups are added in order at the end: the same result for any thread count.
#include <algorithm>
#include <vector>

#include "cpu/dispatch.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;
constexpr int64_t kRowsPerGroup = 8;     // granule of the backward's row groups
constexpr int64_t kMaxGroups = 64;       // at most this many partial-sum rows of 2 C values

template <typename A>
std::vector<A> exp_scaled(const A* logs, int64_t channels, A factor) {
  std::vector<A> scale(channels);
  for (int64_t c = 0; c < channels; ++c) scale[c] = exp_(factor * logs[c]);
  return scale;
}

// Forward: out = (in + bias) scale; inverse: out = in scale - bias (scale = exp(-f logs) there, as the reference).
template <bool kInverse, typename T, typename A>
void apply(const T* in, const A* bias, const A* scale, int64_t batch, int64_t channels, int64_t pixels, T* out,
           const ParallelFor& par) {
  const auto op = [](A v, A b, A s) {
    if constexpr (kInverse) return v * s - b;
    else return (v + b) * s;
  };
  const int64_t N = channels * pixels;
  par(batch * N, kElementsPerTask, [&](int64_t flat_begin, int64_t flat_end) {
    for_row_segments(flat_begin, flat_end, N, [&](int64_t row, int64_t begin, int64_t end) {
      const T* __restrict src = in + row * N;
      T* __restrict dst = out + row * N;
      if (pixels == 1) {  // columns are channels: vectorize along them
        for (int64_t n = begin; n < end; ++n) dst[n] = store_as<T>(op(load_as<A>(src[n]), bias[n], scale[n]));
        return;
      }
      for_channel_runs(begin, end, pixels, [&](int64_t c, int64_t run_begin, int64_t run_end) {
        const A b = bias[c], s = scale[c];
        for (int64_t n = run_begin; n < run_end; ++n) dst[n] = store_as<T>(op(load_as<A>(src[n]), b, s));
      });
    });
  });
}

template <typename T>
void forward(const T* x, const acc_t<T>* bias, const acc_t<T>* logs, int64_t batch, int64_t channels,
             int64_t pixels, double logscale_factor, T* y, acc_t<T>* log_det, const ParallelFor& par) {
  using A = acc_t<T>;
  const A factor = A(logscale_factor);
  const std::vector<A> scale = exp_scaled(logs, channels, factor);
  apply<false>(x, bias, scale.data(), batch, channels, pixels, y, par);
  // As the reference: (f logs).sum() * P, the same for every sample.
  A scaled_logs_sum = 0;
  for (int64_t c = 0; c < channels; ++c) scaled_logs_sum += factor * logs[c];
  std::fill(log_det, log_det + batch, scaled_logs_sum * A(pixels));
}

template <typename T>
void inverse(const T* y, const acc_t<T>* bias, const acc_t<T>* logs, int64_t batch, int64_t channels,
             int64_t pixels, double logscale_factor, T* x, const ParallelFor& par) {
  using A = acc_t<T>;
  const std::vector<A> inv_scale = exp_scaled(logs, channels, A(-logscale_factor));
  apply<true>(y, bias, inv_scale.data(), batch, channels, pixels, x, par);
}

// One row of [B, C] data (a value per channel), channels [0, n): dx = dy s, sum_ds += dy s, sum_dsy += dy s (x + b).
// A function of its own so the restrict-qualified parameters let GCC vectorize without a runtime alias check.
template <typename T, typename A>
void channels_backward(int64_t n, const T* __restrict dy, const T* __restrict x, const A* __restrict scale,
                       const A* __restrict bias, T* __restrict dx, A* __restrict sum_ds, A* __restrict sum_dsy) {
  for (int64_t c = 0; c < n; ++c) {
    const A ds = load_as<A>(dy[c]) * scale[c];
    dx[c] = store_as<T>(ds);
    sum_ds[c] += ds;
    sum_dsy[c] += ds * (load_as<A>(x[c]) + bias[c]);
  }
}

// One channel's P pixels of a row: dx = dy s, and sum_ds += sum dy s, sum_dsy += sum dy s (x + b) in kLanes
// fixed partial sums.
template <typename T, typename A>
void pixels_backward(int64_t pixels, const T* __restrict dy, const T* __restrict x, A s, A b, T* __restrict dx,
                     A& sum_ds, A& sum_dsy) {
  A lanes_ds[kLanes] = {}, lanes_dsy[kLanes] = {};
  const auto step = [&](int64_t p, int j) {
    const A ds = load_as<A>(dy[p]) * s;
    dx[p] = store_as<T>(ds);
    lanes_ds[j] += ds;
    lanes_dsy[j] += ds * (load_as<A>(x[p]) + b);
  };
  int64_t p = 0;
  for (; p + kLanes <= pixels; p += kLanes)
    for (int j = 0; j < kLanes; ++j) step(p + j, j);
  for (int j = 0; p + j < pixels; ++j) step(p + j, j);
  sum_ds += sum_lanes(lanes_ds);
  sum_dsy += sum_lanes(lanes_dsy);
}

// dx = dy s; per group g: sum_ds[c] = sum dy s, sum_dsy[c] = sum dy s (x + bias) over the group's rows and pixels.
template <typename T>
void backward(const T* dy, const acc_t<T>* dlog_det, const T* x, const acc_t<T>* bias, const acc_t<T>* logs,
              int64_t batch, int64_t channels, int64_t pixels, double logscale_factor, T* dx, acc_t<T>* dbias,
              acc_t<T>* dlogs, const ParallelFor& par) {
  using A = acc_t<T>;
  const A factor = A(logscale_factor);
  const std::vector<A> scale = exp_scaled(logs, channels, factor);
  const int64_t N = channels * pixels;
  const RowGroups groups = row_groups(batch, kRowsPerGroup, kMaxGroups);
  std::vector<A> partial(groups.count * 2 * channels, A(0));  // [group][sum_ds | sum_dsy][channel]
  // Channel blocks split a group's work across threads; a channel's sums never depend on the block it is in.
  const int64_t block = std::max<int64_t>(64, kElementsPerTask / std::max<int64_t>(1, groups.rows_per_group * pixels));
  const int64_t blocks = ceil_div(channels, block);
  par(groups.count * blocks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t g = task / blocks;
      const int64_t c0 = (task % blocks) * block, c1 = std::min(channels, c0 + block);
      A* sum_ds = partial.data() + g * 2 * channels;
      A* sum_dsy = sum_ds + channels;
      for (int64_t row = groups.begin(g); row < groups.end(g); ++row) {
        const T* dy_row = dy + row * N;
        const T* x_row = x + row * N;
        T* dx_row = dx + row * N;
        if (pixels == 1) {  // one value per channel and row: accumulate along the channels
          channels_backward(c1 - c0, dy_row + c0, x_row + c0, scale.data() + c0, bias + c0, dx_row + c0, sum_ds + c0,
                            sum_dsy + c0);
          continue;
        }
        for (int64_t c = c0; c < c1; ++c)
          pixels_backward(pixels, dy_row + c * pixels, x_row + c * pixels, scale[c], bias[c], dx_row + c * pixels,
                          sum_ds[c], sum_dsy[c]);
      }
    }
  });
  // Fixed-order sums over groups; the log-det term f P sum_b dlog_det[b] is the same for every channel.
  A sum_dlog_det = 0;
  for (int64_t b = 0; b < batch; ++b) sum_dlog_det += dlog_det[b];
  std::fill(dbias, dbias + channels, A(0));
  std::fill(dlogs, dlogs + channels, A(0));
  for (int64_t g = 0; g < groups.count; ++g) {
    const A* sum_ds = partial.data() + g * 2 * channels;
    const A* sum_dsy = sum_ds + channels;
    for (int64_t c = 0; c < channels; ++c) {
      dbias[c] += sum_ds[c];
      dlogs[c] += sum_dsy[c];
    }
  }
  const A log_det_term = A(pixels) * sum_dlog_det;
  for (int64_t c = 0; c < channels; ++c) dlogs[c] = factor * (dlogs[c] + log_det_term);
}

}  // namespace

void actnorm_fwd(const void* x, DType dtype, const void* bias, const void* logs, int64_t batch, int64_t channels,
                 int64_t pixels, double logscale_factor, void* y, void* log_det, const ParallelFor& par) {
  dispatch_dtype(dtype, "actnorm_fwd", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    forward(static_cast<const T*>(x), static_cast<const A*>(bias), static_cast<const A*>(logs), batch, channels,
            pixels, logscale_factor, static_cast<T*>(y), static_cast<A*>(log_det), par);
  });
}

void actnorm_inv(const void* y, DType dtype, const void* bias, const void* logs, int64_t batch, int64_t channels,
                 int64_t pixels, double logscale_factor, void* x, const ParallelFor& par) {
  dispatch_dtype(dtype, "actnorm_inv", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    inverse(static_cast<const T*>(y), static_cast<const A*>(bias), static_cast<const A*>(logs), batch, channels,
            pixels, logscale_factor, static_cast<T*>(x), par);
  });
}

void actnorm_bwd(const void* dy, const void* dlog_det, const void* x, DType dtype, const void* bias, const void* logs,
                 int64_t batch, int64_t channels, int64_t pixels, double logscale_factor, void* dx, void* dbias,
                 void* dlogs, const ParallelFor& par) {
  dispatch_dtype(dtype, "actnorm_bwd", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    backward(static_cast<const T*>(dy), static_cast<const A*>(dlog_det), static_cast<const T*>(x),
             static_cast<const A*>(bias), static_cast<const A*>(logs), batch, channels, pixels, logscale_factor,
             static_cast<T*>(dx), static_cast<A*>(dbias), static_cast<A*>(dlogs), par);
  });
}

}  // namespace flowkern::cpu
