// The 1x1 convolution (family invconv): its weight from its LU factors, and the backward (fp32 or fp64
// parameters, C up to ~1024).
//
// With L = tril(lower, -1) + I, U' = triu(upper, 1) + diag(sign_s exp(log_s)) and row i of W = row perm[i] of L U':
//   weight:  W[i][j]         = sum_k L[perm[i]][k] U'[k][j],  k <= min(perm[i], j)
//   dlower:  dlower[perm[i]] = tril(G, -1) rows, G[i][k] = sum_j dW[i][j] U'[k][j],  j >= k
//   dupper:  D[k][j] = sum_i L[perm[i]][k] dW[i][j];  dupper = triu(D, 1), dlog_s[k] = D[k][k] U'[k][k] + dlog_det
// (dM[perm[i]] = dW[i], so sums over the rows r of dM are sums over i.) Each is a 64 x 64-tile GEMM whose operands
// are generated from the factors as they are loaded into shared memory, zero outside their triangles; the
// contraction skips the k ranges that the triangles make zero for the whole tile.
#include "cuda/dispatch.cuh"

namespace flowkern::cuda {
namespace {

constexpr int kTile = 64;        // output tile edge
constexpr int kDepth = 16;       // contraction slice held in shared memory
constexpr int kThreadsEdge = 16;  // 16 x 16 threads, each 4 x 4 outputs
constexpr int kPerThread = kTile / kThreadsEdge;

enum class LuProduct { weight, dlower, dupper };

template <typename A>
struct LuArgs {
  const int64_t* perm;
  const A *lower, *upper, *sign_s, *log_s, *dweight, *dlog_det;
  int64_t channels;
  A *weight, *log_det, *dlower, *dupper, *dlog_s;
};

// L[r][k] of the unit lower factor.
template <typename A>
__device__ __forceinline__ A unit_lower(const LuArgs<A>& a, int64_t r, int64_t k) {
  return k < r ? a.lower[r * a.channels + k] : (k == r ? A(1) : A(0));
}

// U'[k][j] of the upper factor with its diagonal sign_s exp(log_s).
template <typename A>
__device__ __forceinline__ A upper_with_diag(const LuArgs<A>& a, int64_t k, int64_t j) {
  return k < j ? a.upper[k * a.channels + j] : (k == j ? a.sign_s[k] * exp_(a.log_s[k]) : A(0));
}

// out[m][n] = sum_k lhs[m][k] rhs[k][n] for the tile (blockIdx.y, blockIdx.x), lhs / rhs / out per LuProduct.
template <typename A, LuProduct Product>
__global__ void __launch_bounds__(kThreadsEdge * kThreadsEdge) lu_product_kernel(LuArgs<A> args) {
  __shared__ A lhs[kDepth][kTile + 1];  // lhs[kk][mm]: the +1 staggers the banks of the transposed stores
  __shared__ A rhs[kDepth][kTile + 1];  // rhs[kk][nn]
  __shared__ int64_t tile_perm[kTile];   // perm of the tile's rows m (weight, dlower)
  __shared__ int64_t contraction_end;

  const int64_t C = args.channels;
  const int64_t m0 = int64_t(blockIdx.y) * kTile, n0 = int64_t(blockIdx.x) * kTile;
  const int tid = threadIdx.x, tx = tid % kThreadsEdge, ty = tid / kThreadsEdge;

  if (tid < kTile) tile_perm[tid] = m0 + tid < C ? args.perm[m0 + tid] : -1;
  __syncthreads();
  // Contraction range [begin, end): weight needs k <= perm[i] and k <= j; dlower needs j >= k >= n0.
  int64_t begin = 0;
  if (tid == 0) {
    int64_t end = C;
    if constexpr (Product == LuProduct::weight) {
      int64_t max_row = 0;
      for (int mm = 0; mm < kTile; ++mm) max_row = max(max_row, tile_perm[mm]);
      end = min(C, min(n0 + kTile, max_row + 1));
    }
    contraction_end = end;
  }
  if constexpr (Product == LuProduct::dlower) begin = n0;
  __syncthreads();
  const int64_t end = contraction_end;

  A acc[kPerThread][kPerThread] = {};
  for (int64_t k0 = begin; k0 < end; k0 += kDepth) {
    // Each operand slice is kTile x kDepth = 1024 values: 4 per thread, read along the contiguous axis.
    for (int e = tid; e < kTile * kDepth; e += kThreadsEdge * kThreadsEdge) {
      if constexpr (Product == LuProduct::weight) {
        const int mm = e / kDepth, kk = e % kDepth;  // L rows perm[i]: contiguous along k
        const int64_t k = k0 + kk;
        lhs[kk][mm] = tile_perm[mm] >= 0 && k < C ? unit_lower(args, tile_perm[mm], k) : A(0);
        const int kr = e / kTile, nn = e % kTile;  // U' rows: contiguous along j
        rhs[kr][nn] = k0 + kr < C && n0 + nn < C ? upper_with_diag(args, k0 + kr, n0 + nn) : A(0);
      } else if constexpr (Product == LuProduct::dlower) {
        const int mm = e / kDepth, jj = e % kDepth;  // dW rows: contiguous along j
        const int64_t j = k0 + jj;
        lhs[jj][mm] = m0 + mm < C && j < C ? args.dweight[(m0 + mm) * C + j] : A(0);
        const int nn = e / kDepth;  // U'[k][j] for k = n0 + nn: contiguous along j
        rhs[jj][nn] = n0 + nn < C && j < C ? upper_with_diag(args, n0 + nn, j) : A(0);
      } else {
        const int ii = e / kTile, col = e % kTile;  // L rows perm[i]: contiguous along the output's k (= m)
        const int64_t i = k0 + ii;
        const bool row_ok = i < C;
        lhs[ii][col] = row_ok && m0 + col < C ? unit_lower(args, args.perm[i], m0 + col) : A(0);
        rhs[ii][col] = row_ok && n0 + col < C ? args.dweight[i * C + n0 + col] : A(0);  // dW rows along j
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      A lhs_values[kPerThread], rhs_values[kPerThread];
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        lhs_values[t] = lhs[kk][ty + kThreadsEdge * t];
        rhs_values[t] = rhs[kk][tx + kThreadsEdge * t];
      }
#pragma unroll
      for (int a = 0; a < kPerThread; ++a) {
#pragma unroll
        for (int b = 0; b < kPerThread; ++b) acc[a][b] += lhs_values[a] * rhs_values[b];
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int a = 0; a < kPerThread; ++a) {
    const int mm = ty + kThreadsEdge * a;
    const int64_t m = m0 + mm;
    if (m >= C) continue;
#pragma unroll
    for (int b = 0; b < kPerThread; ++b) {
      const int64_t n = n0 + tx + kThreadsEdge * b;
      if (n >= C) continue;
      if constexpr (Product == LuProduct::weight) {
        args.weight[m * C + n] = acc[a][b];
      } else if constexpr (Product == LuProduct::dlower) {
        const int64_t r = tile_perm[mm];
        args.dlower[r * C + n] = n < r ? acc[a][b] : A(0);
      } else {
        args.dupper[m * C + n] = n > m ? acc[a][b] : A(0);
        if (n == m) args.dlog_s[m] = acc[a][b] * args.sign_s[m] * exp_(args.log_s[m]) + args.dlog_det[0];
      }
    }
  }

  if constexpr (Product == LuProduct::weight) {
    // log_det = sum(log_s), by the first block in a fixed order.
    if (blockIdx.x == 0 && blockIdx.y == 0) {
      A partial = A(0);
      for (int64_t k = tid; k < C; k += blockDim.x) partial += args.log_s[k];
      partial = block_sum(partial);
      if (tid == 0) args.log_det[0] = partial;
    }
  }
}

template <typename A, LuProduct Product>
void launch_product(const LuArgs<A>& args, Stream stream, const char* kernel) {
  const unsigned tiles = static_cast<unsigned>(ceil_div(args.channels, kTile));
  lu_product_kernel<A, Product>
      <<<dim3(tiles, tiles), kThreadsEdge * kThreadsEdge, 0, cuda_stream(stream)>>>(args);
  check_launch(kernel);
}

// Calls fn(A{}) for the two parameter dtypes.
template <typename Fn>
void dispatch_parameter_dtype(DType dtype, const char* op, Fn&& fn) {
  if (dtype == DType::f32) return fn(float{});
  if (dtype == DType::f64) return fn(double{});
  throw std::invalid_argument(std::string("flowkern::cuda::") + op +
                              ": LU factors must be float32 or float64, got dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

}  // namespace

void lu_weight_fwd(const int64_t* perm, const void* lower, const void* upper, const void* sign_s, const void* log_s,
                   DType dtype, int64_t channels, void* weight, void* log_det, Stream stream) {
  dispatch_parameter_dtype(dtype, "lu_weight_fwd", [&](auto tag) {
    using A = decltype(tag);
    LuArgs<A> args{};
    args.perm = perm;
    args.lower = static_cast<const A*>(lower);
    args.upper = static_cast<const A*>(upper);
    args.sign_s = static_cast<const A*>(sign_s);
    args.log_s = static_cast<const A*>(log_s);
    args.channels = channels;
    args.weight = static_cast<A*>(weight);
    args.log_det = static_cast<A*>(log_det);
    launch_product<A, LuProduct::weight>(args, stream, "lu_product_kernel<weight>");
  });
}

void lu_weight_bwd(const void* dweight, const void* dlog_det, const int64_t* perm, const void* lower,
                   const void* upper, const void* sign_s, const void* log_s, DType dtype, int64_t channels,
                   void* dlower, void* dupper, void* dlog_s, Stream stream) {
  dispatch_parameter_dtype(dtype, "lu_weight_bwd", [&](auto tag) {
    using A = decltype(tag);
    LuArgs<A> args{};
    args.perm = perm;
    args.lower = static_cast<const A*>(lower);
    args.upper = static_cast<const A*>(upper);
    args.sign_s = static_cast<const A*>(sign_s);
    args.log_s = static_cast<const A*>(log_s);
    args.dweight = static_cast<const A*>(dweight);
    args.dlog_det = static_cast<const A*>(dlog_det);
    args.channels = channels;
    args.dlower = static_cast<A*>(dlower);
    args.dupper = static_cast<A*>(dupper);
    args.dlog_s = static_cast<A*>(dlog_s);
    launch_product<A, LuProduct::dlower>(args, stream, "lu_product_kernel<dlower>");
    launch_product<A, LuProduct::dupper>(args, stream, "lu_product_kernel<dupper>");
  });
}

}  // namespace flowkern::cuda
