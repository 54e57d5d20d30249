// The 1x1 convolution (family invconv) on the CPU, its LU weight: W = P L U' and its backward, with
// L = tril(lower, -1) + I, U' = triu(upper, 1) + diag(sign_s exp(log_s)) and row i of P M = M[perm[i]].
//
// Both are GEMMs on tiles of kTileRows rows (csrc/cpu/dispatch.h: accumulators in registers, terms summed in
// index order) whose depth and column blocks are cut by the triangular structure; their right-hand sides are packed
// in panels of kGemmColumns columns (panel[b][k][j] = M[k][b * kGemmColumns + j], zero-padded), so each column block
// streams one contiguous panel:
//   forward  M[r, c]       = sum_{k <= min(r, c)} L[r, k] U'[k, c], stored as W[inv_perm[r]] = M[r];
//   backward with G = P^T dW (G[r] = dW[inv_perm[r]]):
//            dlower[r, k]  = sum_{c >= k} G[r, c] U'[k, c]   for k < r   (G U'^T)
//            dupper[k, c]  = sum_{r >= k} L[r, k] G[r, c]    for c > k   (L^T G), its diagonal gives dlog_s.
// Tiles cost more the further they are down (forward, dlower) or up (dupper) the triangle: balanced_tile orders
// the tasks so each thread's chunk mixes cheap and expensive tiles.
#include <vector>

#include "cpu/dispatch.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kTileRows = 16;

template <typename A>
std::vector<A> diagonal(const A* sign_s, const A* log_s, int64_t C) {
  std::vector<A> diag(C);
  for (int64_t k = 0; k < C; ++k) diag[k] = sign_s[k] * exp_(log_s[k]);
  return diag;
}

std::vector<int64_t> inverse_permutation(const int64_t* perm, int64_t C) {
  std::vector<int64_t> inv(C);
  for (int64_t i = 0; i < C; ++i) inv[perm[i]] = i;
  return inv;
}

// Panels of a [C, C] right-hand side: panels(b) is the contiguous [C, kGemmColumns] block of columns b.
template <typename A>
struct Panels {
  int64_t C;
  std::vector<A> data;
  explicit Panels(int64_t channels)
      : C(channels), data(round_up(channels, kGemmColumns<A>) * channels, A(0)) {}
  int64_t count() const { return ceil_div(C, kGemmColumns<A>); }
  A& at(int64_t k, int64_t c) { return data[((c / kGemmColumns<A>) * C + k) * kGemmColumns<A> + c % kGemmColumns<A>]; }
  const A* panel(int64_t b) const { return data.data() + b * C * kGemmColumns<A>; }
};

template <typename A>
void forward(const int64_t* perm, const A* lower, const A* upper, const A* sign_s, const A* log_s, int64_t C,
             A* weight, A* log_det, const ParallelFor& par) {
  constexpr int64_t kCols = kGemmColumns<A>;
  const int64_t CP = round_up(C, kCols);
  const std::vector<A> diag = diagonal(sign_s, log_s, C);
  const std::vector<int64_t> inv_perm = inverse_permutation(perm, C);
  Panels<A> u(C);  // U'
  par(C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      u.at(k, k) = diag[k];
      for (int64_t c = k + 1; c < C; ++c) u.at(k, c) = upper[k * C + c];
    }
  });
  const int64_t tiles = ceil_div(C, kTileRows);
  par(tiles, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> l_rows(kTileRows * C), out(kTileRows * CP);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t r0 = balanced_tile(task, tiles) * kTileRows, rows = std::min(kTileRows, C - r0);
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t r = r0 + j;
        A* l = l_rows.data() + j * C;
        std::copy(lower + r * C, lower + r * C + r, l);
        l[r] = A(1);
        std::fill(l + r + 1, l + C, A(0));
      }
      // Column block b needs k <= min(r, c): depth up to the tile's last row and the block's last column.
      for (int64_t b = 0; b < u.count(); ++b)
        gemm(rows, kCols, std::min(r0 + rows, (b + 1) * kCols), l_rows.data(), C, u.panel(b), kCols,
             out.data() + b * kCols, CP, false);
      for (int64_t j = 0; j < rows; ++j)
        std::copy(out.data() + j * CP, out.data() + j * CP + C, weight + inv_perm[r0 + j] * C);
    }
  });
  A total = 0;
  for (int64_t k = 0; k < C; ++k) total += log_s[k];
  *log_det = total;
}

template <typename A>
void backward(const A* dweight, const A* dlog_det, const int64_t* perm, const A* lower, const A* upper,
              const A* sign_s, const A* log_s, int64_t C, A* dlower, A* dupper, A* dlog_s, const ParallelFor& par) {
  constexpr int64_t kCols = kGemmColumns<A>;
  const int64_t CP = round_up(C, kCols);
  const std::vector<A> diag = diagonal(sign_s, log_s, C);
  const std::vector<int64_t> inv_perm = inverse_permutation(perm, C);
  // G = P^T dW, row-major (left-hand side of dlower) and in panels (right-hand side of dupper); U'^T in panels.
  std::vector<A> g(C * C);
  Panels<A> g_panels(C), ut(C);
  par(C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const A* dw_row = dweight + inv_perm[r] * C;
      std::copy(dw_row, dw_row + C, g.data() + r * C);
      for (int64_t c = 0; c < C; ++c) g_panels.at(r, c) = dw_row[c];
    }
  });
  // ut(c, k) = U'[k, c]: panel by panel, walking kCols rows of upper side by side.
  par(ut.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = b * kCols; k < std::min(C, (b + 1) * kCols); ++k)
          ut.at(c, k) = k < c ? upper[k * C + c] : k == c ? diag[k] : A(0);
  });
  const A dld = *dlog_det;
  const int64_t tiles = ceil_div(C, kTileRows);
  // Task 2i: a tile of dlower rows; task 2i+1: a tile of dupper rows.
  par(2 * tiles, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<A> lt_rows(kTileRows * C), out(kTileRows * CP);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t t0 = balanced_tile(task / 2, tiles) * kTileRows, rows = std::min(kTileRows, C - t0);
      if (task % 2 == 0) {
        // dlower rows r = t0 + j: blocks of k < r, each summing over c >= k0 (U'[k, c] = 0 for c < k).
        for (int64_t k0 = 0; k0 < t0 + rows - 1; k0 += kCols)
          gemm(rows, kCols, C - k0, g.data() + t0 * C + k0, C, ut.panel(k0 / kCols) + k0 * kCols, kCols,
               out.data() + k0, CP, false);
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t r = t0 + j;
          std::copy(out.data() + j * CP, out.data() + j * CP + r, dlower + r * C);
          std::fill(dlower + r * C + r, dlower + (r + 1) * C, A(0));
        }
        continue;
      }
      // dupper rows k = t0 + j: L^T rows (lt[j, r] = L[r, k], zero for r < k), summing over r >= t0.
      for (int64_t r = t0; r < C; ++r)
        for (int64_t j = 0; j < rows; ++j) {
          const int64_t k = t0 + j;
          lt_rows[j * C + r] = r > k ? lower[r * C + k] : A(r == k);
        }
      for (int64_t b = t0 / kCols; b < g_panels.count(); ++b)  // blocks holding some c >= k
        gemm(rows, kCols, C - t0, lt_rows.data() + t0, C, g_panels.panel(b) + t0 * kCols, kCols,
             out.data() + b * kCols, CP, false);
      for (int64_t j = 0; j < rows; ++j) {
        const int64_t k = t0 + j;
        std::fill(dupper + k * C, dupper + k * C + k + 1, A(0));
        std::copy(out.data() + j * CP + k + 1, out.data() + j * CP + C, dupper + k * C + k + 1);
        dlog_s[k] = out[j * CP + k] * diag[k] + dld;
      }
    }
  });
}

}  // namespace

void lu_weight_fwd(const int64_t* perm, const void* lower, const void* upper, const void* sign_s, const void* log_s,
                   DType dtype, int64_t channels, void* weight, void* log_det, const ParallelFor& par) {
  dispatch_parameter_dtype(dtype, "lu_weight_fwd", [&](auto a) {
    using A = decltype(a);
    forward(perm, static_cast<const A*>(lower), static_cast<const A*>(upper), static_cast<const A*>(sign_s),
            static_cast<const A*>(log_s), channels, static_cast<A*>(weight), static_cast<A*>(log_det), par);
  });
}

void lu_weight_bwd(const void* dweight, const void* dlog_det, const int64_t* perm, const void* lower,
                   const void* upper, const void* sign_s, const void* log_s, DType dtype, int64_t channels,
                   void* dlower, void* dupper, void* dlog_s, const ParallelFor& par) {
  dispatch_parameter_dtype(dtype, "lu_weight_bwd", [&](auto a) {
    using A = decltype(a);
    backward(static_cast<const A*>(dweight), static_cast<const A*>(dlog_det), perm, static_cast<const A*>(lower),
             static_cast<const A*>(upper), static_cast<const A*>(sign_s), static_cast<const A*>(log_s), channels,
             static_cast<A*>(dlower), static_cast<A*>(dupper), static_cast<A*>(dlog_s), par);
  });
}

}  // namespace flowkern::cpu
