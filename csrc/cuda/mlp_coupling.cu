// The BERT-flow coupling with its MLP subnet, fused: x1 [B, c1], x2 / z2 [B, c2] in the data dtype, the subnet's
// parameters acc-typed (f = logscale_factor, s_l = exp(f l_l)):
//   pre1 = (x1 W1^T + b1) s1, h1 = relu(pre1);  pre2 = (h1 W2^T + b2) s2, h2 = relu(pre2);  o = (h2 W3^T + b3) s3
// additive: z2 = x2 + o; affine: shift = o[:, 0::2], raw = o[:, 1::2] + 2, z2 = (x2 + shift) sigmoid(raw),
// log_det = sum log sigmoid(raw). Inverse: x2 = z2 - o, or z2 / sigmoid(raw) - shift.
//
// A block of 16 x 16 threads owns a tile of kRows rows; each thread holds a 2-row x (HP / 16)-unit piece of every
// hidden layer in registers (HP = hidden rounded up to 32 or 64), with the tile's activations in shared memory.
// x1 and W1 stream through shared memory in kChunk-column slices; the output layer runs kChannels x2-channels at a
// time (both rows 2j, 2j + 1 of W3 for affine), applying the epilogue as each chunk is produced.
// The backward recomputes the hidden layers, walks the output chunks again (epilogue gradient, dW3 / db3 / dl3,
// dh2), then goes down through both ActNorm + ReLU layers and streams x1 / W1 once more for dW1 and dx1. Parameter
// gradients: a fixed grid of blocks, each walking tiles tile = blockIdx.x + k gridDim.x and accumulating into its
// own slab of the workspace; a second kernel sums the slabs in block order. No atomics: deterministic.
#include <type_traits>

#include "cuda/dispatch.cuh"

namespace flowkern::cuda {
namespace {

constexpr int kEdge = 16;                           // threads per block edge
constexpr int kThreads = kEdge * kEdge;
constexpr int kRows = 32;                           // rows of a tile
constexpr int kRowsPerThread = kRows / kEdge;
constexpr int kChunk = 32;                          // x1 columns (and W2 columns) per streamed slice
constexpr int kChannels = 32;                       // x2 channels per output chunk
constexpr int kChannelsPerThread = kChannels / kEdge;
constexpr int kW3Stride = kChannels + 1;            // shared W3 chunk [part][hidden][channel], padded
// Backward blocks: a constant (two per H100 SM) rather than the SM count, so the workspace size and the order of
// the parameter-gradient sums do not depend on the GPU.
constexpr int64_t kBackwardBlocks = 2 * 132;

extern __shared__ __align__(16) unsigned char mlp_shared[];

template <typename A>
struct MlpArgs {
  const A *w1, *b1, *l1, *w2, *b2, *l2, *w3, *b3, *l3;
  int64_t batch, c1, c2;
  int hidden;
  bool affine;
  A logscale_factor;
  DType dtype;  // of the data (x1, x2, z2 and their gradients)
};

// Data access with the dtype chosen at run time (a uniform branch): the kernels are compute-bound, and fp16 / bf16 /
// fp32 data share the fp32 compute, so a template parameter would only triple the instantiations of large kernels.
template <typename A>
__device__ __forceinline__ A load_data(const void* __restrict__ p, int64_t i, DType dtype) {
  if constexpr (std::is_same_v<A, double>) {
    return static_cast<const double*>(p)[i];
  } else {
    switch (dtype) {
      case DType::f16: return load_as<A>(static_cast<const Half*>(p)[i]);
      case DType::bf16: return load_as<A>(static_cast<const BFloat16*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  }
}

template <typename A>
__device__ __forceinline__ void store_data(void* __restrict__ p, int64_t i, DType dtype, A v) {
  if constexpr (std::is_same_v<A, double>) {
    static_cast<double*>(p)[i] = v;
  } else {
    switch (dtype) {
      case DType::f16: static_cast<Half*>(p)[i] = store_as<Half>(v); break;
      case DType::bf16: static_cast<BFloat16*>(p)[i] = store_as<BFloat16>(v); break;
      default: static_cast<float*>(p)[i] = v; break;
    }
  }
}

// Offsets of each parameter's gradient in a slab (one per backward block) and in the reduction.
struct GradLayout {
  int64_t offset[10];  // w1, b1, l1, w2, b2, l2, w3, b3, l3, end
  __host__ __device__ GradLayout(int64_t c1, int64_t hidden, int64_t outputs) {
    const int64_t sizes[9] = {hidden * c1, hidden, hidden, hidden * hidden, hidden, hidden, outputs * hidden,
                              outputs, outputs};
    offset[0] = 0;
    for (int t = 0; t < 9; ++t) offset[t + 1] = offset[t] + sizes[t];
  }
  __host__ __device__ int64_t size() const { return offset[9]; }
};
enum GradIndex { kW1 = 0, kB1, kL1, kW2, kB2, kL2, kW3, kB3, kL3 };

// Shared memory, in acc values. The stage holds, one phase at a time: an x1 slice [kRows][kChunk + 1] with a W1 / W2
// slice ([kChunk][HP + 1] forward, [HP][kChunk + 1] for the backward's W1); a W2 slice alone; a W3 chunk
// [2][HP][kW3Stride].
__host__ __device__ constexpr int max_of(int a, int b) { return a > b ? a : b; }
template <int HP>
constexpr int kStage =
    max_of(kRows * (kChunk + 1) + max_of(kChunk * (HP + 1), HP * (kChunk + 1)), 2 * HP * kW3Stride);
// Row stride of the backward's gradient buffers: a chunk's [2][kW3Stride] or a hidden layer's [HP] per row.
template <int HP>
constexpr int kGradStride = max_of(2 * kW3Stride, HP + 1);
// Forward: h [kRows][HP + 1] (h1, then h2) + stage. Backward: h1, h2, two gradient buffers + stage.
template <int HP>
constexpr int kForwardShared = kRows * (HP + 1) + kStage<HP>;
template <int HP>
constexpr int kBackwardShared = 2 * kRows * (HP + 1) + 2 * kRows * kGradStride<HP> + kStage<HP>;

// pre1, pre2 of this thread's rows (ty + 16 i) and hidden units (tx + 16 j); relu(pre1) into h1 and relu(pre2)
// into h2 (both [kRows][HP + 1]; they may be the same buffer), synchronized on return.
template <int HP, typename A>
__device__ void hidden_layers(const MlpArgs<A>& m, const void* __restrict__ x1, int64_t row0,
                              A (&pre1)[kRowsPerThread][HP / kEdge], A (&pre2)[kRowsPerThread][HP / kEdge], A* h1,
                              A* h2, A* stage) {
  constexpr int HN = HP / kEdge;
  const int tid = threadIdx.x, tx = tid % kEdge, ty = tid / kEdge;
  A* x_slice = stage;                              // [kRows][kChunk + 1]
  A* w_slice = stage + kRows * (kChunk + 1);       // [kChunk][HP + 1]: W^T, unit n contiguous

  A acc[kRowsPerThread][HN] = {};
  for (int64_t k0 = 0; k0 < m.c1; k0 += kChunk) {
    for (int e = tid; e < kRows * kChunk; e += kThreads) {
      const int r = e / kChunk, kk = e % kChunk;
      const int64_t row = row0 + r, k = k0 + kk;
      x_slice[r * (kChunk + 1) + kk] = row < m.batch && k < m.c1 ? load_data<A>(x1, row * m.c1 + k, m.dtype) : A(0);
    }
    for (int e = tid; e < HP * kChunk; e += kThreads) {
      const int n = e / kChunk, kk = e % kChunk;
      const int64_t k = k0 + kk;
      w_slice[kk * (HP + 1) + n] = n < m.hidden && k < m.c1 ? m.w1[n * m.c1 + k] : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kChunk; ++kk) {
      A x_values[kRowsPerThread], w_values[HN];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) x_values[i] = x_slice[(ty + kEdge * i) * (kChunk + 1) + kk];
#pragma unroll
      for (int j = 0; j < HN; ++j) w_values[j] = w_slice[kk * (HP + 1) + tx + kEdge * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < HN; ++j) acc[i][j] += x_values[i] * w_values[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < HN; ++j) {
    const int n = tx + kEdge * j;
    const bool unit = n < m.hidden;  // padding units stay exactly 0
    const A bias = unit ? m.b1[n] : A(0), scale = unit ? exp_(m.logscale_factor * m.l1[n]) : A(0);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      pre1[i][j] = (acc[i][j] + bias) * scale;
      h1[(ty + kEdge * i) * (HP + 1) + n] = relu(pre1[i][j]);
      acc[i][j] = A(0);
    }
  }
  __syncthreads();

  constexpr int K2 = HP < kChunk ? HP : kChunk;
  for (int k0 = 0; k0 < HP; k0 += K2) {
    for (int e = tid; e < HP * K2; e += kThreads) {
      const int n = e / K2, kk = e % K2, k = k0 + kk;
      w_slice[kk * (HP + 1) + n] = n < m.hidden && k < m.hidden ? m.w2[n * m.hidden + k] : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < K2; ++kk) {
      A h_values[kRowsPerThread], w_values[HN];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) h_values[i] = h1[(ty + kEdge * i) * (HP + 1) + k0 + kk];
#pragma unroll
      for (int j = 0; j < HN; ++j) w_values[j] = w_slice[kk * (HP + 1) + tx + kEdge * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < HN; ++j) acc[i][j] += h_values[i] * w_values[j];
      }
    }
    __syncthreads();  // also: every read of h1 is done before h2 overwrites it
  }
#pragma unroll
  for (int j = 0; j < HN; ++j) {
    const int n = tx + kEdge * j;
    const bool unit = n < m.hidden;
    const A bias = unit ? m.b2[n] : A(0), scale = unit ? exp_(m.logscale_factor * m.l2[n]) : A(0);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      pre2[i][j] = (acc[i][j] + bias) * scale;
      h2[(ty + kEdge * i) * (HP + 1) + n] = relu(pre2[i][j]);
    }
  }
  __syncthreads();
}

// Output unit of channel j, part p (0: the shift / additive output, 1: the raw scale).
template <typename A>
__device__ __forceinline__ int64_t output_unit(const MlpArgs<A>& m, int64_t j, int part) {
  return m.affine ? 2 * j + part : j;
}

// W3 rows of channels [j0, j0 + kChannels) into w3[part][k][channel]; synchronized on return.
template <int HP, typename A>
__device__ void load_w3_chunk(const MlpArgs<A>& m, int64_t j0, A* w3) {
  const int parts = m.affine ? 2 : 1;
  for (int e = threadIdx.x; e < parts * kChannels * HP; e += kThreads) {
    const int part_channel = e / HP, k = e % HP;
    const int part = part_channel / kChannels, channel = part_channel % kChannels;
    const int64_t j = j0 + channel;
    w3[(part * HP + k) * kW3Stride + channel] =
        j < m.c2 && k < m.hidden ? m.w3[output_unit(m, j, part) * m.hidden + k] : A(0);
  }
  __syncthreads();
}

// o[part][i][c] = (h2 W3^T + b3) s3 for this thread's rows (ty + 16 i) and channels j0 + tx + 16 c, and s3.
template <int HP, typename A>
__device__ void output_chunk(const MlpArgs<A>& m, int64_t j0, const A* h2, const A* w3,
                             A (&o)[2][kRowsPerThread][kChannelsPerThread], A (&scale)[2][kChannelsPerThread]) {
  const int tx = threadIdx.x % kEdge, ty = threadIdx.x / kEdge;
  const int parts = m.affine ? 2 : 1;
#pragma unroll
  for (int part = 0; part < 2; ++part) {
    if (part >= parts) break;
    A acc[kRowsPerThread][kChannelsPerThread] = {};
#pragma unroll 8
    for (int k = 0; k < HP; ++k) {
      A h_values[kRowsPerThread], w_values[kChannelsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) h_values[i] = h2[(ty + kEdge * i) * (HP + 1) + k];
#pragma unroll
      for (int c = 0; c < kChannelsPerThread; ++c) w_values[c] = w3[(part * HP + k) * kW3Stride + tx + kEdge * c];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int c = 0; c < kChannelsPerThread; ++c) acc[i][c] += h_values[i] * w_values[c];
      }
    }
#pragma unroll
    for (int c = 0; c < kChannelsPerThread; ++c) {
      const int64_t j = j0 + tx + kEdge * c;
      const int64_t unit = output_unit(m, j, part);
      const bool valid = j < m.c2;
      const A bias = valid ? m.b3[unit] : A(0);
      scale[part][c] = valid ? exp_(m.logscale_factor * m.l3[unit]) : A(0);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) o[part][i][c] = (acc[i][c] + bias) * scale[part][c];
    }
  }
}

// Forward (in2 = x2, out2 = z2, log_det) or inverse (in2 = z2, out2 = x2, log_det null) of one tile per block.
template <typename A, int HP>
__global__ void __launch_bounds__(kThreads)
    mlp_coupling_kernel(const void* __restrict__ x1, const void* __restrict__ in2, MlpArgs<A> m, bool inverse,
                        void* __restrict__ out2, A* __restrict__ log_det) {
  constexpr int HN = HP / kEdge;
  A* h = reinterpret_cast<A*>(mlp_shared);  // h1, then h2
  A* stage = h + kRows * (HP + 1);
  const int tx = threadIdx.x % kEdge, ty = threadIdx.x / kEdge;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;

  A pre1[kRowsPerThread][HN], pre2[kRowsPerThread][HN];
  hidden_layers<HP>(m, x1, row0, pre1, pre2, h, h, stage);

  A log_det_part[kRowsPerThread] = {};
  for (int64_t j0 = 0; j0 < m.c2; j0 += kChannels) {
    load_w3_chunk<HP>(m, j0, stage);
    A o[2][kRowsPerThread][kChannelsPerThread], scale[2][kChannelsPerThread];
    output_chunk<HP>(m, j0, h, stage, o, scale);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + kEdge * i;
#pragma unroll
      for (int c = 0; c < kChannelsPerThread; ++c) {
        const int64_t j = j0 + tx + kEdge * c;
        if (row >= m.batch || j >= m.c2) continue;
        const A v = load_data<A>(in2, row * m.c2 + j, m.dtype);
        A result;
        if (m.affine) {
          const A shift = o[0][i][c], raw = o[1][i][c] + A(kAffineScaleOffset);
          const A s = sigmoid(raw);
          if (inverse) {
            result = v / s - shift;
          } else {
            result = (v + shift) * s;
            log_det_part[i] += log_sigmoid(raw);
          }
        } else {
          result = inverse ? v - o[0][i][c] : v + o[0][i][c];
        }
        store_data(out2, row * m.c2 + j, m.dtype, result);
      }
    }
    __syncthreads();  // the next chunk overwrites the W3 chunk
  }

  // Each row's log-det: its 16 threads (one half-warp, tx = lane % 16) summed as a fixed tree.
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    A total = log_det_part[i];
#pragma unroll
    for (int offset = kEdge / 2; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    const int64_t row = row0 + ty + kEdge * i;
    if (!inverse && tx == 0 && row < m.batch) log_det[row] = total;
  }
}

// slab[index] = value on a block's first tile, += on its later ones (only this block touches its slab).
template <typename A>
__device__ __forceinline__ void accumulate(A* slab, int64_t index, A value, bool first_tile) {
  slab[index] = first_tile ? value : slab[index] + value;
}

// Backward of mlp_coupling_kernel given dout = d(out2) and, forward affine, dlog_det: writes dother = d(in2), dx1
// (through the subnet) and this block's parameter-gradient slab. Two blocks per SM: ptxas fits fp32 in 128
// registers with a few dozen bytes of spills, which beats the single resident block of its unconstrained ~200.
template <typename A, int HP>
__global__ void __launch_bounds__(kThreads, 2)
    mlp_coupling_bwd_kernel(const void* __restrict__ dout, const A* __restrict__ dlog_det,
                            const void* __restrict__ x1, const void* __restrict__ in2, MlpArgs<A> m, bool inverse,
                            void* __restrict__ dx1, void* __restrict__ din2, GradLayout layout,
                            A* __restrict__ slabs, int64_t tiles) {
  constexpr int HN = HP / kEdge;
  constexpr int GS = kGradStride<HP>;
  A* h1 = reinterpret_cast<A*>(mlp_shared);   // [kRows][HP + 1]
  A* h2 = h1 + kRows * (HP + 1);              // [kRows][HP + 1]
  A* grad_a = h2 + kRows * (HP + 1);          // [kRows][GS]: d(pre-scale output / hidden pre-activation)
  A* grad_b = grad_a + kRows * GS;            // [kRows][GS]: the matching d(log-scale) terms
  A* stage = grad_b + kRows * GS;
  const int tid = threadIdx.x, tx = tid % kEdge, ty = tid / kEdge;
  const int parts = m.affine ? 2 : 1;
  A* slab = slabs + int64_t(blockIdx.x) * layout.size();
  const bool log_det_grad = m.affine && !inverse;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bool first_tile = tile == blockIdx.x;
    const int64_t row0 = tile * kRows;
    A pre1[kRowsPerThread][HN], pre2[kRowsPerThread][HN];
    hidden_layers<HP>(m, x1, row0, pre1, pre2, h1, h2, stage);

    A row_dlog_det[kRowsPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + kEdge * i;
      row_dlog_det[i] = log_det_grad && row < m.batch ? dlog_det[row] : A(0);
    }

    // ---- Output layer and epilogue, chunk by chunk ----
    A dh2[kRowsPerThread][HN] = {};
    for (int64_t j0 = 0; j0 < m.c2; j0 += kChannels) {
      load_w3_chunk<HP>(m, j0, stage);
      A o[2][kRowsPerThread][kChannelsPerThread], scale[2][kChannelsPerThread];
      output_chunk<HP>(m, j0, h2, stage, o, scale);
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + kEdge * i;
        const int64_t row = row0 + r;
#pragma unroll
        for (int c = 0; c < kChannelsPerThread; ++c) {
          const int channel = tx + kEdge * c;
          const int64_t j = j0 + channel;
          A d_o[2] = {A(0), A(0)};  // d(o) of the channel's parts; zero outside the data
          if (row < m.batch && j < m.c2) {
            const A g = load_data<A>(dout, row * m.c2 + j, m.dtype), v = load_data<A>(in2, row * m.c2 + j, m.dtype);
            A d_in;
            if (m.affine) {
              const A shift = o[0][i][c], raw = o[1][i][c] + A(kAffineScaleOffset);
              if (inverse) {  // x2 = z2 / s - shift: 1 / s = 1 + e, (1 - s) / s = e, e = exp(-raw)
                const A e = exp_(-raw);
                d_in = g * (A(1) + e);
                d_o[0] = -g;
                d_o[1] = -g * v * e;
              } else {  // z2 = (x2 + shift) s, log_det += log s; d log s / d raw = 1 - s
                const A s = sigmoid(raw), one_minus_s = sigmoid(-raw);
                d_in = g * s;
                d_o[0] = d_in;
                d_o[1] = d_in * (v + shift) * one_minus_s + row_dlog_det[i] * one_minus_s;
              }
            } else {
              d_in = g;
              d_o[0] = inverse ? -g : g;
            }
            store_data(din2, row * m.c2 + j, m.dtype, d_in);
          }
#pragma unroll
          for (int part = 0; part < 2; ++part) {
            if (part >= parts) break;
            grad_a[r * GS + part * kW3Stride + channel] = d_o[part] * scale[part][c];  // d(h2 W3^T + b3)
            grad_b[r * GS + part * kW3Stride + channel] = d_o[part] * o[part][i][c];   // / f: d(l3)
          }
        }
      }
      __syncthreads();

      // dh2 += d(h2 W3^T + b3) W3 over the chunk's units.
      for (int part = 0; part < parts; ++part) {
#pragma unroll 4
        for (int channel = 0; channel < kChannels; ++channel) {
          A g_values[kRowsPerThread], w_values[HN];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) {
            g_values[i] = grad_a[(ty + kEdge * i) * GS + part * kW3Stride + channel];
          }
#pragma unroll
          for (int n = 0; n < HN; ++n) w_values[n] = stage[(part * HP + tx + kEdge * n) * kW3Stride + channel];
#pragma unroll
          for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
            for (int n = 0; n < HN; ++n) dh2[i][n] += g_values[i] * w_values[n];
          }
        }
      }
      // dW3[unit][n] = sum over the tile's rows of d(h2 W3^T + b3)[row][unit] h2[row][n]; unit per (ty + 16 q).
#pragma unroll 1
      for (int q = 0; q < 2 * kChannels / kEdge; ++q) {
        const int part_channel = ty + kEdge * q;
        const int part = part_channel / kChannels, channel = part_channel % kChannels;
        const int64_t j = j0 + channel;
        if (part >= parts || j >= m.c2) continue;
        A acc[HN] = {};
#pragma unroll 4
        for (int r = 0; r < kRows; ++r) {
          const A g = grad_a[r * GS + part * kW3Stride + channel];
#pragma unroll
          for (int n = 0; n < HN; ++n) acc[n] += g * h2[r * (HP + 1) + tx + kEdge * n];
        }
        const int64_t unit = output_unit(m, j, part);
#pragma unroll
        for (int n = 0; n < HN; ++n) {
          const int k = tx + kEdge * n;
          if (k < m.hidden) accumulate(slab, layout.offset[kW3] + unit * m.hidden + k, acc[n], first_tile);
        }
      }
      if (tid < parts * kChannels) {
        const int part = tid / kChannels, channel = tid % kChannels;
        const int64_t j = j0 + channel;
        if (j < m.c2) {
          A db3 = A(0), dl3 = A(0);
#pragma unroll 4
          for (int r = 0; r < kRows; ++r) {
            db3 += grad_a[r * GS + part * kW3Stride + channel];
            dl3 += grad_b[r * GS + part * kW3Stride + channel];
          }
          const int64_t unit = output_unit(m, j, part);
          accumulate(slab, layout.offset[kB3] + unit, db3, first_tile);
          accumulate(slab, layout.offset[kL3] + unit, m.logscale_factor * dl3, first_tile);
        }
      }
      __syncthreads();  // the next chunk overwrites the W3 chunk and the gradient buffers
    }

    // ---- Second hidden layer: h2 = relu(pre2), pre2 = (h1 W2^T + b2) s2 ----
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int n = 0; n < HN; ++n) {
        const int unit = tx + kEdge * n;
        const A d_pre = pre2[i][n] > A(0) ? dh2[i][n] : A(0);
        const A scale = unit < m.hidden ? exp_(m.logscale_factor * m.l2[unit]) : A(0);
        grad_a[(ty + kEdge * i) * GS + unit] = d_pre * scale;     // d(h1 W2^T + b2)
        grad_b[(ty + kEdge * i) * GS + unit] = d_pre * pre2[i][n];  // / f: d(l2)
      }
    }
    __syncthreads();
    A dh1[kRowsPerThread][HN] = {};
    if (tid < m.hidden) {
      A db2 = A(0), dl2 = A(0);
#pragma unroll 4
      for (int r = 0; r < kRows; ++r) {
        db2 += grad_a[r * GS + tid];
        dl2 += grad_b[r * GS + tid];
      }
      accumulate(slab, layout.offset[kB2] + tid, db2, first_tile);
      accumulate(slab, layout.offset[kL2] + tid, m.logscale_factor * dl2, first_tile);
    }
    // dW2[n][k] = sum over rows of d(h1 W2^T + b2)[row][n] h1[row][k]; n = ty + 16 a, k = tx + 16 b, one unit n
    // at a time (a rolled loop keeps the register footprint of this rarely hot part small).
#pragma unroll 1
    for (int a = 0; a < HN; ++a) {
      const int n = ty + kEdge * a;
      A acc[HN] = {};
#pragma unroll 4
      for (int r = 0; r < kRows; ++r) {
        const A g = grad_a[r * GS + n];
#pragma unroll
        for (int b = 0; b < HN; ++b) acc[b] += g * h1[r * (HP + 1) + tx + kEdge * b];
      }
#pragma unroll
      for (int b = 0; b < HN; ++b) {
        const int k = tx + kEdge * b;
        if (n < m.hidden && k < m.hidden) accumulate(slab, layout.offset[kW2] + n * m.hidden + k, acc[b], first_tile);
      }
    }
    // dh1 = d(h1 W2^T + b2) W2, with W2 in kChunk-row slices [n][k].
    constexpr int K2 = HP < kChunk ? HP : kChunk;
    for (int n0 = 0; n0 < HP; n0 += K2) {
      for (int e = tid; e < K2 * HP; e += kThreads) {
        const int nn = e / HP, k = e % HP, n = n0 + nn;
        stage[nn * (HP + 1) + k] = n < m.hidden && k < m.hidden ? m.w2[n * m.hidden + k] : A(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int nn = 0; nn < K2; ++nn) {
        A g_values[kRowsPerThread], w_values[HN];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) g_values[i] = grad_a[(ty + kEdge * i) * GS + n0 + nn];
#pragma unroll
        for (int b = 0; b < HN; ++b) w_values[b] = stage[nn * (HP + 1) + tx + kEdge * b];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int b = 0; b < HN; ++b) dh1[i][b] += g_values[i] * w_values[b];
        }
      }
      __syncthreads();  // also: the gradient buffers are free once the last slice is done
    }

    // ---- First hidden layer: h1 = relu(pre1), pre1 = (x1 W1^T + b1) s1 ----
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int n = 0; n < HN; ++n) {
        const int unit = tx + kEdge * n;
        const A d_pre = pre1[i][n] > A(0) ? dh1[i][n] : A(0);
        const A scale = unit < m.hidden ? exp_(m.logscale_factor * m.l1[unit]) : A(0);
        grad_a[(ty + kEdge * i) * GS + unit] = d_pre * scale;     // d(x1 W1^T + b1)
        grad_b[(ty + kEdge * i) * GS + unit] = d_pre * pre1[i][n];  // / f: d(l1)
      }
    }
    __syncthreads();
    if (tid < m.hidden) {
      A db1 = A(0), dl1 = A(0);
#pragma unroll 4
      for (int r = 0; r < kRows; ++r) {
        db1 += grad_a[r * GS + tid];
        dl1 += grad_b[r * GS + tid];
      }
      accumulate(slab, layout.offset[kB1] + tid, db1, first_tile);
      accumulate(slab, layout.offset[kL1] + tid, m.logscale_factor * dl1, first_tile);
    }
    A* x_slice = stage;                             // [kRows][kChunk + 1]
    A* w_slice = stage + kRows * (kChunk + 1);      // [HP][kChunk + 1]: W1 rows, column k contiguous
    for (int64_t k0 = 0; k0 < m.c1; k0 += kChunk) {
      for (int e = tid; e < kRows * kChunk; e += kThreads) {
        const int r = e / kChunk, kk = e % kChunk;
        const int64_t row = row0 + r, k = k0 + kk;
        x_slice[r * (kChunk + 1) + kk] = row < m.batch && k < m.c1 ? load_data<A>(x1, row * m.c1 + k, m.dtype) : A(0);
      }
      for (int e = tid; e < HP * kChunk; e += kThreads) {
        const int n = e / kChunk, kk = e % kChunk;
        const int64_t k = k0 + kk;
        w_slice[n * (kChunk + 1) + kk] = n < m.hidden && k < m.c1 ? m.w1[n * m.c1 + k] : A(0);
      }
      __syncthreads();
      // dx1[row][k] = sum_n d(x1 W1^T + b1)[row][n] W1[n][k]: rows ty + 16 i, columns tx + 16 b.
      A dx[kRowsPerThread][kChunk / kEdge] = {};
      // dW1[n][k] = sum over rows of d(x1 W1^T + b1)[row][n] x1[row][k]: units ty + 16 a, columns tx + 16 b.
      A dw[HN][kChunk / kEdge] = {};
#pragma unroll 4
      for (int n = 0; n < HP; ++n) {
        A g_values[kRowsPerThread], w_values[kChunk / kEdge];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) g_values[i] = grad_a[(ty + kEdge * i) * GS + n];
#pragma unroll
        for (int b = 0; b < kChunk / kEdge; ++b) w_values[b] = w_slice[n * (kChunk + 1) + tx + kEdge * b];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int b = 0; b < kChunk / kEdge; ++b) dx[i][b] += g_values[i] * w_values[b];
        }
      }
#pragma unroll 4
#pragma unroll 4
      for (int r = 0; r < kRows; ++r) {
        A g_values[HN], x_values[kChunk / kEdge];
#pragma unroll
        for (int a = 0; a < HN; ++a) g_values[a] = grad_a[r * GS + ty + kEdge * a];
#pragma unroll
        for (int b = 0; b < kChunk / kEdge; ++b) x_values[b] = x_slice[r * (kChunk + 1) + tx + kEdge * b];
#pragma unroll
        for (int a = 0; a < HN; ++a) {
#pragma unroll
          for (int b = 0; b < kChunk / kEdge; ++b) dw[a][b] += g_values[a] * x_values[b];
        }
      }
#pragma unroll
      for (int b = 0; b < kChunk / kEdge; ++b) {
        const int64_t k = k0 + tx + kEdge * b;
        if (k >= m.c1) continue;
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const int64_t row = row0 + ty + kEdge * i;
          if (row < m.batch) store_data(dx1, row * m.c1 + k, m.dtype, dx[i][b]);
        }
#pragma unroll
        for (int a = 0; a < HN; ++a) {
          const int n = ty + kEdge * a;
          if (n < m.hidden) accumulate(slab, layout.offset[kW1] + n * m.c1 + k, dw[a][b], first_tile);
        }
      }
      __syncthreads();  // the next slice overwrites the stage
    }
  }
}

// grads[t][index] = sum over slabs, in slab order, of slab[offset[t] + index].
template <typename A>
struct GradTargets {
  A* tensor[9];
};

template <typename A>
__global__ void __launch_bounds__(kBlockThreads)
    mlp_param_grads_kernel(const A* __restrict__ slabs, int64_t slab_count, GradLayout layout, GradTargets<A> grads) {
  const int64_t size = layout.size();
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < size;
       index += int64_t(gridDim.x) * blockDim.x) {
    A total = A(0);
    for (int64_t s = 0; s < slab_count; ++s) total += slabs[s * size + index];
    // The tensor holding `index` (unrolled, so that the parameter arrays stay in constant memory).
    A* tensor = grads.tensor[0];
    int64_t begin = 0;
#pragma unroll
    for (int t = 1; t < 9; ++t) {
      if (index >= layout.offset[t]) {
        tensor = grads.tensor[t];
        begin = layout.offset[t];
      }
    }
    tensor[index - begin] = total;
  }
}

template <typename A>
MlpArgs<A> mlp_args(const MlpParams& w, const MlpShape& shape, DType dtype) {
  return {static_cast<const A*>(w.w1), static_cast<const A*>(w.b1), static_cast<const A*>(w.l1),
          static_cast<const A*>(w.w2), static_cast<const A*>(w.b2), static_cast<const A*>(w.l2),
          static_cast<const A*>(w.w3), static_cast<const A*>(w.b3), static_cast<const A*>(w.l3),
          shape.batch, shape.c1, shape.c2, static_cast<int>(shape.hidden), shape.affine,
          static_cast<A>(shape.logscale_factor), dtype};
}

// Calls fn(std::integral_constant<int, HP>) with the padded hidden width (32 or 64: below 32 the padding costs
// less than another pair of instantiations); rejects widths the kernels do not take.
template <typename Fn>
void dispatch_hidden(int64_t hidden, const char* op, Fn&& fn) {
  if (hidden < 1 || hidden > kMaxFusedHidden) {
    throw std::invalid_argument(std::string("flowkern::cuda::") + op + ": the fused MLP coupling takes hidden widths " +
                                "1 to " + std::to_string(kMaxFusedHidden) + ", got " + std::to_string(hidden));
  }
  if (hidden <= 32) return fn(std::integral_constant<int, 32>{});
  fn(std::integral_constant<int, 64>{});
}

int64_t backward_blocks(const MlpShape& shape) { return std::min(ceil_div(shape.batch, kRows), kBackwardBlocks); }

void launch_forward(bool inverse, const void* x1, const void* in2, DType dtype, const MlpParams& w,
                    const MlpShape& shape, void* out2, void* log_det, Stream stream, const char* op) {
  dispatch_dtype(dtype, op, [&](auto tag) {
    using A = acc_t<decltype(tag)>;
    dispatch_hidden(shape.hidden, op, [&](auto hp) {
      constexpr int HP = decltype(hp)::value;
      const size_t shared_bytes = kForwardShared<HP> * sizeof(A);
      allow_shared_memory(mlp_coupling_kernel<A, HP>, shared_bytes);
      const unsigned grid = static_cast<unsigned>(ceil_div(shape.batch, kRows));
      mlp_coupling_kernel<A, HP><<<grid, kThreads, shared_bytes, cuda_stream(stream)>>>(
          x1, in2, mlp_args<A>(w, shape, dtype), inverse, out2, static_cast<A*>(log_det));
      check_launch("mlp_coupling_kernel");
    });
  });
}

}  // namespace

void mlp_coupling_fwd(const void* x1, const void* x2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* z2, void* log_det, Stream stream) {
  launch_forward(false, x1, x2, dtype, w, shape, z2, log_det, stream, "mlp_coupling_fwd");
}

void mlp_coupling_inv(const void* x1, const void* z2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* x2, Stream stream) {
  launch_forward(true, x1, z2, dtype, w, shape, x2, nullptr, stream, "mlp_coupling_inv");
}

int64_t mlp_coupling_bwd_workspace_bytes(DType dtype, const MlpShape& shape) {
  int64_t bytes = 0;
  dispatch_dtype(dtype, "mlp_coupling_bwd_workspace_bytes", [&](auto tag) {
    const GradLayout layout(shape.c1, shape.hidden, shape.c2 * (shape.affine ? 2 : 1));
    bytes = backward_blocks(shape) * layout.size() * int64_t(sizeof(acc_t<decltype(tag)>));
  });
  return bytes;
}

void mlp_coupling_bwd(Direction direction, const void* dout, const void* dlog_det, const void* x1, const void* other,
                      DType dtype, const MlpParams& w, const MlpShape& shape, void* dx1, void* dother,
                      const MlpParamGrads& grads, void* workspace, Stream stream) {
  const char* op = "mlp_coupling_bwd";
  dispatch_dtype(dtype, op, [&](auto tag) {
    using A = acc_t<decltype(tag)>;
    dispatch_hidden(shape.hidden, op, [&](auto hp) {
      constexpr int HP = decltype(hp)::value;
      const cudaStream_t cu_stream = cuda_stream(stream);
      const int64_t blocks = backward_blocks(shape);
      const size_t shared_bytes = kBackwardShared<HP> * sizeof(A);
      allow_shared_memory(mlp_coupling_bwd_kernel<A, HP>, shared_bytes);
      const GradLayout layout(shape.c1, shape.hidden, shape.c2 * (shape.affine ? 2 : 1));
      A* slabs = static_cast<A*>(workspace);
      mlp_coupling_bwd_kernel<A, HP><<<static_cast<unsigned>(blocks), kThreads, shared_bytes, cu_stream>>>(
          dout, static_cast<const A*>(dlog_det), x1, other, mlp_args<A>(w, shape, dtype),
          direction == Direction::inverse, dx1, dother, layout, slabs, ceil_div(shape.batch, kRows));
      check_launch("mlp_coupling_bwd_kernel");

      const GradTargets<A> targets{{static_cast<A*>(grads.w1), static_cast<A*>(grads.b1), static_cast<A*>(grads.l1),
                                    static_cast<A*>(grads.w2), static_cast<A*>(grads.b2), static_cast<A*>(grads.l2),
                                    static_cast<A*>(grads.w3), static_cast<A*>(grads.b3), static_cast<A*>(grads.l3)}};
      mlp_param_grads_kernel<A><<<grid_for(layout.size(), kBlockThreads), kBlockThreads, 0, cu_stream>>>(
          slabs, blocks, layout, targets);
      check_launch("mlp_param_grads_kernel");
    });
  });
}

}  // namespace flowkern::cuda
