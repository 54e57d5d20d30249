// Helpers of the CPU kernels (csrc/cpu): dtype dispatch, work partitions, the affine coupling's sigmoid and the small
// GEMM of the fused subnets and the LU weight.
//
// Determinism: every sum below adds its terms in an order fixed by the problem size, never by how ParallelFor
// splits the work, so results are bitwise the same for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/math.cuh"
#include "flowkern.h"

namespace flowkern::cpu {

// Calls fn(T{}) with T the storage type of `dtype` (float, double, Half, BFloat16); acc_t<T> is its compute type.
template <typename Fn>
void dispatch_dtype(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f16: return fn(Half{});
    case DType::bf16: return fn(BFloat16{});
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype " + std::to_string(int(dtype)));
}

// Ops on parameters only (lu_weight) take fp32 / fp64, which are their own compute types.
template <typename Fn>
void dispatch_parameter_dtype(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    default: break;
  }
  throw std::invalid_argument(std::string(op) + ": parameters must be fp32 or fp64, got dtype " +
                              std::to_string(int(dtype)));
}

inline void check_hidden(int64_t hidden, const char* op) {
  if (hidden < 1 || hidden > kMaxFusedHidden)
    throw std::invalid_argument(std::string(op) + ": hidden width " + std::to_string(hidden) + " outside [1, " +
                                std::to_string(kMaxFusedHidden) + "]; use the unfused ops");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Elementwise kernels split the flat [rows * row_length] index range; this calls fn(row, begin, end) for the part
// [begin, end) of each row that lies in the flat range [flat_begin, flat_end).
template <typename Fn>
inline void for_row_segments(int64_t flat_begin, int64_t flat_end, int64_t row_length, Fn&& fn) {
  if (row_length <= 0) return;
  for (int64_t row = flat_begin / row_length; row * row_length < flat_end; ++row) {
    const int64_t start = row * row_length;
    fn(row, std::max(flat_begin, start) - start, std::min(flat_end, start + row_length) - start);
  }
}

// Within a row of C channels of P pixels, calls fn(channel, begin, end) for each channel's run of columns
// [begin, end) (columns n = channel * P + pixel) inside [begin, end).
template <typename Fn>
inline void for_channel_runs(int64_t begin, int64_t end, int64_t pixels, Fn&& fn) {
  for (int64_t c = begin / pixels; c * pixels < end; ++c)
    fn(c, std::max(begin, c * pixels), std::min(end, (c + 1) * pixels));
}

// Fixed partition of the rows into contiguous groups for parameter-gradient partial sums: group sizes come from
// the row count only (a multiple of `granule`, at most max_groups groups), never from the thread count.
struct RowGroups {
  int64_t count, rows_per_group, rows;
  int64_t begin(int64_t g) const { return g * rows_per_group; }
  int64_t end(int64_t g) const { return std::min(rows, (g + 1) * rows_per_group); }
};

inline RowGroups row_groups(int64_t rows, int64_t granule, int64_t max_groups) {
  const int64_t wanted = std::max<int64_t>(1, std::min(max_groups, ceil_div(rows, granule)));
  const int64_t per_group = std::max<int64_t>(granule, round_up(ceil_div(rows, wanted), granule));
  return {ceil_div(rows, per_group), per_group, rows};
}

// Task order that pairs cheap and expensive tiles when the cost of tile t grows with t (triangular work): task
// 2i is tile i, task 2i+1 tile n-1-i, so the contiguous chunks ParallelFor hands each thread cost about the same.
inline int64_t balanced_tile(int64_t task, int64_t tiles) {
  return task % 2 == 0 ? task / 2 : tiles - 1 - task / 2;
}

// Independent partial sums of a reduction: the lanes vectorize without reassociation and are added in lane order,
// so the result does not depend on the vector width.
constexpr int kLanes = 8;

template <typename A>
inline A sum_lanes(const A (&lanes)[kLanes]) {
  A total = 0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// The affine coupling's sigmoid(v), 1 - sigmoid(v) and log sigmoid(v) from one exp (and one log for the last), for
// any v without overflow or cancellation (as the Triton kernels' _sigmoid_parts), with e = exp(-|v|):
//   sigmoid = (v >= 0 ? 1 : e) / (1 + e), 1 - sigmoid = (v >= 0 ? e : 1) / (1 + e), log sigmoid = min(v, 0) - log1p(e).
// log1p(e) is log(u) e / (u - 1) with u = 1 + e (u - 1 is exact; Goldberg's correction for the rounding of u, a few
// ulps for e in [0, 1]): glibc's log1pf costs about five logf, and these run once per element. Methods, not
// members, so a backward that needs no log pays for none (libm calls are not dead code under -fmath-errno).
template <typename A>
class SigmoidParts {
 public:
  explicit SigmoidParts(A v) : v_(v), e_(exp_(-std::abs(v))), u_(A(1) + e_) {}
  A sigmoid() const { return (v_ >= A(0) ? A(1) : e_) / u_; }
  A one_minus_sigmoid() const { return (v_ >= A(0) ? e_ : A(1)) / u_; }
  A log_sigmoid() const {
    const A rounded = u_ - A(1);
    return std::min(v_, A(0)) - (rounded == A(0) ? e_ : std::log(u_) * (e_ / rounded));
  }

 private:
  A v_, e_, u_;
};

// ---- A small GEMM for the fused subnets and the LU weight: out[r, 0:n] (+)= sum_k x[r, k] w[k, 0:n] ----
// Output columns go in blocks of kGemmColumns<A> (two 32-byte vectors), rows kGemmRows at a time, so the
// accumulators stay in registers and each row of w is loaded once for kGemmRows rows. Every output adds its terms
// in k order: no reassociation, the same result for any row / block position. Callers pad n (and the w / out
// rows they read and write) to a multiple of kGemmColumns<A>.
// The micro-kernel is written with GCC / Clang vector types: left to the auto-vectorizer, GCC 12 vectorizes its k
// loop as an in-order reduction or across the rows instead (1.6x slower standalone, worse where inlined).
template <typename A>
struct Simd {
  typedef A type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / int64_t(sizeof(A));
};
template <typename A>
constexpr int64_t kGemmColumns = 2 * Simd<A>::lanes;
constexpr int64_t kGemmRows = 4;

// Unaligned vector load / store through references (vector values in signatures would trip -Wpsabi without AVX).
template <typename A>
inline void load_vector(typename Simd<A>::type& v, const A* p) {
  std::memcpy(&v, p, sizeof v);
}
template <typename A>
inline void store_vector(A* p, const typename Simd<A>::type& v) {
  std::memcpy(p, &v, sizeof v);
}

template <int64_t kRows, typename A>
inline void gemm_block(int64_t depth, const A* x, int64_t ldx, const A* w, int64_t ldw, A* out, int64_t ldo,
                       bool accumulate) {
  using V = typename Simd<A>::type;
  constexpr int64_t kWidth = Simd<A>::lanes;
  V acc[kRows][2] = {};
  if (accumulate)
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t v = 0; v < 2; ++v) load_vector(acc[r][v], out + r * ldo + v * kWidth);
  for (int64_t k = 0; k < depth; ++k) {
    V w0, w1;
    load_vector(w0, w + k * ldw);
    load_vector(w1, w + k * ldw + kWidth);
    for (int64_t r = 0; r < kRows; ++r) {
      const A xr = x[r * ldx + k];
      acc[r][0] += xr * w0;
      acc[r][1] += xr * w1;
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t v = 0; v < 2; ++v) store_vector(out + r * ldo + v * kWidth, acc[r][v]);
}

// rows x n outputs (n a multiple of kGemmColumns<A>), depth terms each; accumulate adds to out's values.
template <typename A>
void gemm(int64_t rows, int64_t n, int64_t depth, const A* x, int64_t ldx, const A* w, int64_t ldw, A* out,
          int64_t ldo, bool accumulate) {
  for (int64_t c = 0; c < n; c += kGemmColumns<A>) {
    int64_t r = 0;
    for (; r + kGemmRows <= rows; r += kGemmRows)
      gemm_block<kGemmRows>(depth, x + r * ldx, ldx, w + c, ldw, out + r * ldo + c, ldo, accumulate);
    const A* xr = x + r * ldx;
    A* o = out + r * ldo + c;
    static_assert(kGemmRows == 4, "one case per remainder below");
    switch (rows - r) {   // the remaining rows in one block
      case 1: gemm_block<1>(depth, xr, ldx, w + c, ldw, o, ldo, accumulate); break;
      case 2: gemm_block<2>(depth, xr, ldx, w + c, ldw, o, ldo, accumulate); break;
      case 3: gemm_block<3>(depth, xr, ldx, w + c, ldw, o, ldo, accumulate); break;
      default: break;
    }
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for r < rows, c < cols, in cache-sized square blocks.
template <typename A>
void transpose(const A* src, int64_t ld_src, int64_t rows, int64_t cols, A* dst, int64_t ld_dst) {
  constexpr int64_t kTile = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

}  // namespace flowkern::cpu
