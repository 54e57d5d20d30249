// Coupling epilogue on the CPU: z2 from x2 and the subnet output h, its inverse and the affine backward.
//
// additive: z2 = x2 + h. affine: h [B, 2 C2, P] holds the shift of channel c at channel 2c and its raw scale at
// 2c+1, so in a row the shift of column n = c P + p sits at 2 c P + p and the raw scale P further:
// z2 = (x2 + shift) s, s = sigmoid(raw + 2), log_det[b] = sum log s. Elementwise passes split the flat data;
// the affine forward reduces each row's log-det in its own task, in column order. h may have another storage
// type than x2; everything is computed in x2's compute type.
#include <algorithm>

#include "cpu/dispatch.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kElementsPerTask = 1 << 14;

// Calls fn(column, shift index) for the columns [begin, end) of a row: the index of column n's shift in h's row.
template <typename Fn>
inline void for_shift_columns(int64_t begin, int64_t end, int64_t pixels, Fn&& fn) {
  if (pixels == 1) {  // [B, 2 C2] h: column n's pair is (2n, 2n + 1); no per-channel runs of one column
    for (int64_t n = begin; n < end; ++n) fn(n, 2 * n);
    return;
  }
  for_channel_runs(begin, end, pixels, [&](int64_t c, int64_t run_begin, int64_t run_end) {
    for (int64_t n = run_begin; n < run_end; ++n) fn(n, n + c * pixels);
  });
}

template <typename T, typename H>
void forward(const T* x2, const H* h, int64_t batch, int64_t channels, int64_t pixels, bool affine, T* z2,
             acc_t<T>* log_det, const ParallelFor& par) {
  using A = acc_t<T>;
  const int64_t N = channels * pixels;
  if (!affine) {
    par(batch * N, kElementsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) z2[i] = store_as<T>(load_as<A>(x2[i]) + load_as<A>(h[i]));
    });
    std::fill(log_det, log_det + batch, A(0));
    return;
  }
  par(batch, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, N)), [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      const T* x_row = x2 + row * N;
      const H* h_row = h + row * 2 * N;
      T* z_row = z2 + row * N;
      A sum_log_scale = 0;
      for_shift_columns(0, N, pixels, [&](int64_t n, int64_t shift_at) {
        const SigmoidParts<A> scale(load_as<A>(h_row[shift_at + pixels]) + A(kAffineScaleOffset));
        z_row[n] = store_as<T>((load_as<A>(x_row[n]) + load_as<A>(h_row[shift_at])) * scale.sigmoid());
        sum_log_scale += scale.log_sigmoid();
      });
      log_det[row] = sum_log_scale;
    }
  });
}

// x2 = z2 - h, or z2 / sigmoid(raw + 2) - shift (as the reference).
template <typename T, typename H>
void inverse(const T* z2, const H* h, int64_t batch, int64_t channels, int64_t pixels, bool affine, T* x2,
             const ParallelFor& par) {
  using A = acc_t<T>;
  const int64_t N = channels * pixels;
  if (!affine) {
    par(batch * N, kElementsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) x2[i] = store_as<T>(load_as<A>(z2[i]) - load_as<A>(h[i]));
    });
    return;
  }
  par(batch * N, kElementsPerTask, [&](int64_t flat_begin, int64_t flat_end) {
    for_row_segments(flat_begin, flat_end, N, [&](int64_t row, int64_t begin, int64_t end) {
      const T* z_row = z2 + row * N;
      const H* h_row = h + row * 2 * N;
      T* x_row = x2 + row * N;
      for_shift_columns(begin, end, pixels, [&](int64_t n, int64_t shift_at) {
        const A s = sigmoid(load_as<A>(h_row[shift_at + pixels]) + A(kAffineScaleOffset));
        x_row[n] = store_as<T>(load_as<A>(z_row[n]) / s - load_as<A>(h_row[shift_at]));
      });
    });
  });
}

// dx2 = dz2 s, dshift = dz2 s, draw = dz2 (x2 + shift) s (1 - s) + dlog_det[b] (1 - s).
template <typename T, typename H>
void backward(const T* dz2, const acc_t<T>* dlog_det, const T* x2, const H* h, int64_t batch, int64_t channels,
              int64_t pixels, T* dx2, H* dh, const ParallelFor& par) {
  using A = acc_t<T>;
  const int64_t N = channels * pixels;
  par(batch * N, kElementsPerTask, [&](int64_t flat_begin, int64_t flat_end) {
    for_row_segments(flat_begin, flat_end, N, [&](int64_t row, int64_t begin, int64_t end) {
      const T* dz_row = dz2 + row * N;
      const T* x_row = x2 + row * N;
      const H* h_row = h + row * 2 * N;
      T* dx_row = dx2 + row * N;
      H* dh_row = dh + row * 2 * N;
      const A dld = dlog_det[row];
      for_shift_columns(begin, end, pixels, [&](int64_t n, int64_t shift_at) {
        const A shift = load_as<A>(h_row[shift_at]);
        const SigmoidParts<A> scale(load_as<A>(h_row[shift_at + pixels]) + A(kAffineScaleOffset));
        const A dz_s = load_as<A>(dz_row[n]) * scale.sigmoid(), one_minus_s = scale.one_minus_sigmoid();
        dx_row[n] = store_as<T>(dz_s);
        dh_row[shift_at] = store_as<H>(dz_s);
        const A d_raw = dz_s * (load_as<A>(x_row[n]) + shift) * one_minus_s + dld * one_minus_s;
        dh_row[shift_at + pixels] = store_as<H>(d_raw);
      });
    });
  });
}

// Calls fn(T{}, H{}) for the storage types of the data and of h.
template <typename Fn>
void dispatch_data_and_h(DType dtype, DType h_dtype, const char* op, Fn&& fn) {
  dispatch_dtype(dtype, op, [&](auto t) { dispatch_dtype(h_dtype, op, [&](auto h) { fn(t, h); }); });
}

}  // namespace

void coupling_epilogue_fwd(const void* x2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* z2, void* log_det, const ParallelFor& par) {
  dispatch_data_and_h(dtype, h_dtype, "coupling_epilogue_fwd", [&](auto t, auto hv) {
    using T = decltype(t);
    using H = decltype(hv);
    forward(static_cast<const T*>(x2), static_cast<const H*>(h), batch, channels, pixels, affine,
            static_cast<T*>(z2), static_cast<acc_t<T>*>(log_det), par);
  });
}

void coupling_epilogue_inv(const void* z2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* x2, const ParallelFor& par) {
  dispatch_data_and_h(dtype, h_dtype, "coupling_epilogue_inv", [&](auto t, auto hv) {
    using T = decltype(t);
    using H = decltype(hv);
    inverse(static_cast<const T*>(z2), static_cast<const H*>(h), batch, channels, pixels, affine,
            static_cast<T*>(x2), par);
  });
}

void coupling_epilogue_bwd(const void* dz2, const void* dlog_det, const void* x2, DType dtype, const void* h,
                           DType h_dtype, int64_t batch, int64_t channels, int64_t pixels, void* dx2, void* dh,
                           const ParallelFor& par) {
  dispatch_data_and_h(dtype, h_dtype, "coupling_epilogue_bwd", [&](auto t, auto hv) {
    using T = decltype(t);
    using H = decltype(hv);
    backward(static_cast<const T*>(dz2), static_cast<const acc_t<T>*>(dlog_det), static_cast<const T*>(x2),
             static_cast<const H*>(h), batch, channels, pixels, static_cast<T*>(dx2), static_cast<H*>(dh), par);
  });
}

}  // namespace flowkern::cpu
