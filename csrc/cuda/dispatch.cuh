// Shared by the CUDA kernels of csrc/cuda: dtype dispatch, launch checks, grid sizes, vector loads and stores,
// fixed-order reductions. CUDA-only; the per-element math is common/math.cuh (shared with the CPU code).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/math.cuh"
#include "flowkern.h"

namespace flowkern::cuda {

// Threads of the memory-bound kernels' blocks; 8 such blocks fill an SM's 2048 threads.
constexpr int kBlockThreads = 256;
constexpr int kBlocksPerMultiprocessor = 2048 / kBlockThreads;

// Blocks that own one partial-sum buffer in the parameter-gradient reductions. A constant, not the SM count, so
// workspace sizes and the summation order (hence the bits of every gradient) are the same on every GPU.
constexpr int64_t kPartialBlocks = 1024;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline cudaStream_t cuda_stream(Stream stream) { return static_cast<cudaStream_t>(stream); }

// Calls fn(T{}) with the storage type T of dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f16: fn(Half{}); return;
    case DType::bf16: fn(BFloat16{}); return;
    case DType::f32: fn(float{}); return;
    case DType::f64: fn(double{}); return;
  }
  throw std::invalid_argument(std::string("flowkern::cuda::") + op + ": unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

// Device side of dispatch_dtype: kernels that take a second data type at run time (a uniform branch) instead of as
// a template parameter, which would multiply their instantiations by four.
template <typename Fn>
__device__ __forceinline__ void visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f16: fn(Half{}); break;
    case DType::bf16: fn(BFloat16{}); break;
    case DType::f32: fn(float{}); break;
    case DType::f64: fn(double{}); break;
  }
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("flowkern::cuda: ") + what + " failed: " + cudaGetErrorString(status));
  }
}

// After a launch: a bad configuration (or an earlier asynchronous error) surfaces here, named by kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("flowkern::cuda: launch of ") + kernel +
                             " failed: " + cudaGetErrorString(status));
  }
}

inline int multiprocessor_count() {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return count;
}

// Blocks of a grid-stride loop over `work` items handled `per_block` at a time: enough to fill every SM, no more.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t wanted = std::max<int64_t>(1, ceil_div(work, per_block));
  return static_cast<unsigned>(std::min<int64_t>(wanted, int64_t(multiprocessor_count()) * kBlocksPerMultiprocessor));
}

// Kernels with more than the default 48 KiB of dynamic shared memory must opt in, per kernel.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
}

// ---- Vector access ----

// N values of T moved as one access (two or more 16-byte accesses when wider): the natural alignment of N * T.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T per 16-byte access: the vector width of the memory-bound kernels.
template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

inline size_t dtype_size(DType dtype) { return dtype == DType::f64 ? 8 : dtype == DType::f32 ? 4 : 2; }

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// out[0:count] = p[0:count] widened to A (the rest zero): one vector access when `vector` (p aligned to the pack)
// and the pack is full, scalar loads otherwise (a row's tail, misaligned data).
template <int N, typename A, typename T>
__device__ __forceinline__ void load_widened(A (&out)[N], const T* __restrict__ p, int count, bool vector) {
  if (vector && count == N) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = load_as<A>(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < count ? load_as<A>(p[k]) : A(0);
  }
}

// p[0:count] = values[0:count] rounded once to T; vector store under the same conditions as load_widened.
template <int N, typename T, typename A>
__device__ __forceinline__ void store_rounded(T* __restrict__ p, const A (&values)[N], int count, bool vector) {
  if (vector && count == N) {
    Pack<T, N> pack;
#pragma unroll
    for (int k = 0; k < N; ++k) pack.v[k] = store_as<T>(values[k]);
    *reinterpret_cast<Pack<T, N>*>(p) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) p[k] = store_as<T>(values[k]);
    }
  }
}

// ---- Channel of a flat index ----

// How far (channels, pixels) move when a flat index of [*, C, P] data advances by a fixed step.
struct ChannelStep {
  int64_t channels, pixels;
  __device__ ChannelStep(int64_t step, int64_t num_channels, int64_t num_pixels)
      : channels((step / num_pixels) % num_channels), pixels(step % num_pixels) {}
};

// The channel and pixel of flat index i of [*, C, P] data, carried along as a loop advances i, so that a thread
// divides once instead of once per element.
struct ChannelCursor {
  int64_t channel, pixel;
  __device__ ChannelCursor(int64_t i, int64_t num_channels, int64_t num_pixels)
      : channel((i / num_pixels) % num_channels), pixel(i % num_pixels) {}
  // i += 1
  __device__ __forceinline__ void next(int64_t num_channels, int64_t num_pixels) {
    if (++pixel == num_pixels) {
      pixel = 0;
      if (++channel == num_channels) channel = 0;
    }
  }
  // i += the step (both parts of `step` are below their bounds, so one carry each suffices)
  __device__ __forceinline__ void advance(const ChannelStep& step, int64_t num_channels, int64_t num_pixels) {
    pixel += step.pixels;
    int64_t carry = 0;
    if (pixel >= num_pixels) {
      pixel -= num_pixels;
      carry = 1;
    }
    channel += step.channels + carry;
    if (channel >= num_channels) channel -= num_channels;
  }
};

// ---- Fixed-order reductions (deterministic: the same tree for the same launch shape) ----

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block, returned to every thread. All threads call it; blockDim.x a multiple of 32.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A total = A(0);
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums is free again for the next call
  return total;
}

// Sum over each team of `team` consecutive threads (a power of two >= 32 dividing blockDim.x), returned to every
// thread of the team. All threads of the block call it.
template <typename A>
__device__ A team_sum(A v, int team) {
  __shared__ A warp_sums[32];
  v = warp_sum(v);
  if (team == 32) return v;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps_per_team = team / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int first = warp - warp % warps_per_team;
  A total = A(0);
  for (int w = first; w < first + warps_per_team; ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

// Largest team of the row-team kernels: a block of it leaves them 128 registers a thread.
constexpr int kMaxRowTeam = 512;

// Threads per row for the kernels that give each row a team (row reductions): about four vectors a thread, from one
// warp (short rows, many rows a block) up to kMaxRowTeam (long rows).
inline int row_team_threads(int64_t vectors_per_row) {
  int team = 32;
  while (team < kMaxRowTeam && int64_t(team) * 4 < vectors_per_row) team *= 2;
  return team;
}

}  // namespace flowkern::cuda
