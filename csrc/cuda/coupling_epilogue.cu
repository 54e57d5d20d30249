// Coupling epilogue on x2 [B, C, P] given the subnet output h (its own dtype, taken at run time: a uniform branch
// per vector instead of four times the kernels).
//
// additive: z2 = x2 +- h is elementwise over the flat data (one grid-stride pass in 16-byte vectors).
// affine: h [B, 2C, P] holds channel c's shift at channel 2c and its raw scale at 2c + 1, so value (c, p) of a row
// reads h at (2c) P + p and (2c + 1) P + p. Each row gets a team of threads (one warp for short rows, up to
// kMaxRowTeam for long ones) that walks it in vectors and, forward, reduces log sigmoid(raw + 2) into the row's
// log-det in a fixed order; the inverse and the backward, which reduce nothing, also split long rows over several
// blocks when there are too few rows to fill the GPU. A vector stays inside one channel when P is a multiple of the
// width; when P == 1 the (shift, raw) pairs of consecutive channels are adjacent and come in one double-width vector.
#include <initializer_list>

#include "cuda/dispatch.cuh"

namespace flowkern::cuda {
namespace {

// z = x + sign h over the flat data (sign +1 forward, -1 inverse); the forward also zeroes log_det (not null).
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    additive_coupling_epilogue_kernel(const T* __restrict__ in, const void* __restrict__ h, DType h_dtype,
                                      int64_t total, acc_t<T> sign, bool vector, T* __restrict__ out,
                                      acc_t<T>* __restrict__ log_det, int64_t batch) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = first; v < ceil_div(total, V); v += stride) {
    const int64_t i = v * V;
    const int count = int(min(int64_t(V), total - i));
    A values[V], shifts[V];
    load_widened(values, in + i, count, vector);
    visit_dtype(h_dtype, [&](auto tag) {
      load_widened(shifts, static_cast<const decltype(tag)*>(h) + i, count, vector);
    });
#pragma unroll
    for (int k = 0; k < V; ++k) values[k] += sign * shifts[k];
    store_rounded(out + i, values, count, vector);
  }
  if (log_det != nullptr) {
    for (int64_t b = first; b < batch; b += stride) log_det[b] = A(0);
  }
}

// Shape of the affine rows and whether they take vector access (see affine_vector_ok).
struct AffineRows {
  int64_t channels, pixels, columns;
  DType h_dtype;
  bool vector;
};

// shift[k], raw[k] (before the + 2) of the `count` values from column n of a row, whose channel and pixel are
// the cursor's; h_row_offset is the row's first element in h.
template <int V, typename A>
__device__ __forceinline__ void load_shift_and_raw(A (&shift)[V], A (&raw)[V], const void* __restrict__ h,
                                                   int64_t h_row_offset, int64_t n, const ChannelCursor& cursor,
                                                   int count, const AffineRows& rows) {
  visit_dtype(rows.h_dtype, [&](auto tag) {
    const auto* h_row = static_cast<const decltype(tag)*>(h) + h_row_offset;
    if (rows.vector && count == V) {
      if (rows.pixels == 1) {
        A pairs[2 * V];
        load_widened(pairs, h_row + 2 * n, 2 * V, true);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          shift[k] = pairs[2 * k];
          raw[k] = pairs[2 * k + 1];
        }
      } else {
        const int64_t offset = 2 * cursor.channel * rows.pixels + cursor.pixel;
        load_widened(shift, h_row + offset, V, true);
        load_widened(raw, h_row + offset + rows.pixels, V, true);
      }
      return;
    }
    ChannelCursor at = cursor;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t offset = 2 * at.channel * rows.pixels + at.pixel;
      shift[k] = k < count ? load_as<A>(h_row[offset]) : A(0);
      raw[k] = k < count ? load_as<A>(h_row[offset + rows.pixels]) : A(0);
      at.next(rows.channels, rows.pixels);
    }
  });
}

// Forward: out = (in + shift) sigmoid(raw + 2), log_det[row] = sum log sigmoid(raw + 2).
// Inverse: out = in / sigmoid(raw + 2) - shift.
// (The row-team kernels' launch bounds name one block per SM so that ptxas may use up to 128 registers: without
// it, it caps them at 64 and spills the 8-wide fp16/bf16 vectors.)
template <typename T, bool Forward>
__global__ void __launch_bounds__(kMaxRowTeam, 1)
    affine_coupling_epilogue_kernel(const T* __restrict__ in, const void* __restrict__ h, int64_t batch,
                                    AffineRows rows, int team, int64_t segment, T* __restrict__ out,
                                    acc_t<T>* __restrict__ log_det) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const int lane = threadIdx.x % team;
  const int64_t begin = int64_t(blockIdx.y) * segment + int64_t(lane) * V;
  const int64_t end = min(rows.columns, int64_t(blockIdx.y + 1) * segment);
  A log_det_part = A(0);
  if (row < batch && begin < end) {  // (the cursor divides by C and P)
    const int64_t row_offset = row * rows.columns;
    ChannelCursor cursor(begin, rows.channels, rows.pixels);
    const ChannelStep step(int64_t(team) * V, rows.channels, rows.pixels);
    for (int64_t n = begin; n < end; n += int64_t(team) * V) {
      const int count = int(min(int64_t(V), end - n));
      A values[V], shift[V], raw[V];
      load_widened(values, in + row_offset + n, count, rows.vector);
      load_shift_and_raw(shift, raw, h, 2 * row_offset, n, cursor, count, rows);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const A scale_logit = raw[k] + A(kAffineScaleOffset);
        const A scale = sigmoid(scale_logit);
        if constexpr (Forward) {
          values[k] = (values[k] + shift[k]) * scale;
          if (k < count) log_det_part += log_sigmoid(scale_logit);
        } else {
          values[k] = values[k] / scale - shift[k];
        }
      }
      store_rounded(out + row_offset + n, values, count, rows.vector);
      cursor.advance(step, rows.channels, rows.pixels);
    }
  }
  if constexpr (Forward) {
    const A total = team_sum(log_det_part, team);
    if (row < batch && lane == 0) log_det[row] = total;
  }
}

// dx2 = dz2 s, dshift = dz2 s, draw = dz2 (x2 + shift) s (1 - s) + dlog_det[row] (1 - s), s = sigmoid(raw + 2);
// dh interleaved like h, in h's dtype.
template <typename T>
__global__ void __launch_bounds__(kMaxRowTeam, 1)
    affine_coupling_epilogue_bwd_kernel(const T* __restrict__ dz, const acc_t<T>* __restrict__ dlog_det,
                                        const T* __restrict__ x, const void* __restrict__ h, int64_t batch,
                                        AffineRows rows, int team, int64_t segment, T* __restrict__ dx,
                                        void* __restrict__ dh) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const int lane = threadIdx.x % team;
  const int64_t begin = int64_t(blockIdx.y) * segment + int64_t(lane) * V;
  const int64_t end = min(rows.columns, int64_t(blockIdx.y + 1) * segment);
  // No block-wide synchronization below; the cursor divides by C and P, so only lanes with data go on.
  if (row >= batch || begin >= end) return;
  const int64_t row_offset = row * rows.columns;
  const A row_dlog_det = dlog_det[row];
  ChannelCursor cursor(begin, rows.channels, rows.pixels);
  const ChannelStep step(int64_t(team) * V, rows.channels, rows.pixels);
  for (int64_t n = begin; n < end; n += int64_t(team) * V) {
    const int count = int(min(int64_t(V), end - n));
    A grad[V], value[V], shift[V], raw[V];
    load_widened(grad, dz + row_offset + n, count, rows.vector);
    load_widened(value, x + row_offset + n, count, rows.vector);
    load_shift_and_raw(shift, raw, h, 2 * row_offset, n, cursor, count, rows);
    A dshift[V], draw[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A scale_logit = raw[k] + A(kAffineScaleOffset);
      const A scale = sigmoid(scale_logit);
      const A one_minus_scale = sigmoid(-scale_logit);  // 1 - s without cancellation when s is near 1
      dshift[k] = grad[k] * scale;
      draw[k] = dshift[k] * (value[k] + shift[k]) * one_minus_scale + row_dlog_det * one_minus_scale;
    }
    store_rounded(dx + row_offset + n, dshift, count, rows.vector);

    visit_dtype(rows.h_dtype, [&](auto tag) {
      using H = decltype(tag);
      H* dh_row = static_cast<H*>(dh) + 2 * row_offset;
      if (rows.vector && count == V) {
        if (rows.pixels == 1) {
          A pairs[2 * V];
#pragma unroll
          for (int k = 0; k < V; ++k) {
            pairs[2 * k] = dshift[k];
            pairs[2 * k + 1] = draw[k];
          }
          store_rounded(dh_row + 2 * n, pairs, 2 * V, true);
        } else {
          const int64_t offset = 2 * cursor.channel * rows.pixels + cursor.pixel;
          store_rounded(dh_row + offset, dshift, V, true);
          store_rounded(dh_row + offset + rows.pixels, draw, V, true);
        }
        return;
      }
      ChannelCursor at = cursor;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const int64_t offset = 2 * at.channel * rows.pixels + at.pixel;
          dh_row[offset] = store_as<H>(dshift[k]);
          dh_row[offset + rows.pixels] = store_as<H>(draw[k]);
        }
        at.next(rows.channels, rows.pixels);
      }
    });
    cursor.advance(step, rows.channels, rows.pixels);
  }
}

// Vector access of the affine rows: data rows start on 16-byte boundaries and each vector's h values are one
// aligned vector too (P == 1: 2V interleaved values; P > 1: V pixels of one channel, so V must divide P).
template <typename T>
bool affine_vector_ok(int64_t channels, int64_t pixels, DType h_dtype, std::initializer_list<const void*> data,
                      std::initializer_list<const void*> h_like) {
  constexpr int V = kVec<T>;
  const bool shape_ok = pixels == 1 ? channels % V == 0 : pixels % V == 0;
  const size_t h_bytes = (pixels == 1 ? 2 * V : V) * dtype_size(h_dtype);
  bool ok = shape_ok;
  for (const void* p : data) ok = ok && is_aligned(p, sizeof(Pack<T, V>));
  for (const void* p : h_like) ok = ok && is_aligned(p, h_bytes);
  return ok;
}

// Launch shape of the row-team kernels: blocks of at least kBlockThreads threads, whole teams; blockIdx.y splits
// rows into `segment`-column pieces when there are too few row blocks to fill the GPU (not for the forward, whose
// log-det needs a whole row in one team).
struct RowTeams {
  int team, block;
  dim3 grid;
  int64_t segment;
  RowTeams(int64_t batch, int64_t columns, int vec, bool split_rows) {
    const int64_t vectors = ceil_div(columns, vec);
    team = row_team_threads(vectors);
    block = std::max(team, kBlockThreads);
    const int64_t row_blocks = ceil_div(batch, block / team);
    int64_t segments = 1;
    if (split_rows) {
      const int64_t wanted = ceil_div(int64_t(multiprocessor_count()) * (2048 / block), row_blocks);
      segments = std::max<int64_t>(1, std::min(wanted, vectors / (int64_t(team) * 4)));  // >= 4 vectors a thread
    }
    segment = std::max<int64_t>(1, ceil_div(vectors, segments)) * vec;
    segments = std::max<int64_t>(1, ceil_div(columns, segment));
    grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(segments));
  }
};

template <typename T>
void launch_coupling(bool forward, const void* in, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                     int64_t pixels, bool affine, void* out, void* log_det, Stream stream) {
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const int64_t columns = channels * pixels;
  const cudaStream_t cu_stream = cuda_stream(stream);
  if (!affine) {
    const bool vector = is_aligned(in, sizeof(Pack<T, V>)) && is_aligned(out, sizeof(Pack<T, V>)) &&
                        is_aligned(h, V * dtype_size(h_dtype));
    const int64_t total = batch * columns;
    const unsigned grid = grid_for(std::max(ceil_div(total, V), forward ? batch : int64_t(0)), kBlockThreads);
    additive_coupling_epilogue_kernel<T><<<grid, kBlockThreads, 0, cu_stream>>>(
        static_cast<const T*>(in), h, h_dtype, total, forward ? A(1) : A(-1), vector, static_cast<T*>(out),
        static_cast<A*>(log_det), batch);
    check_launch("additive_coupling_epilogue_kernel");
    return;
  }
  const AffineRows rows{channels, pixels, columns, h_dtype,
                        affine_vector_ok<T>(channels, pixels, h_dtype, {in, out}, {h})};
  const RowTeams teams(batch, columns, V, /*split_rows=*/!forward);
  if (forward) {
    affine_coupling_epilogue_kernel<T, true><<<teams.grid, teams.block, 0, cu_stream>>>(
        static_cast<const T*>(in), h, batch, rows, teams.team, teams.segment, static_cast<T*>(out),
        static_cast<A*>(log_det));
  } else {
    affine_coupling_epilogue_kernel<T, false><<<teams.grid, teams.block, 0, cu_stream>>>(
        static_cast<const T*>(in), h, batch, rows, teams.team, teams.segment, static_cast<T*>(out), nullptr);
  }
  check_launch("affine_coupling_epilogue_kernel");
}

}  // namespace

void coupling_epilogue_fwd(const void* x2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* z2, void* log_det, Stream stream) {
  dispatch_dtype(h_dtype, "coupling_epilogue_fwd", [](auto) {});  // rejects an unknown h dtype before any launch
  dispatch_dtype(dtype, "coupling_epilogue_fwd", [&](auto tag) {
    launch_coupling<decltype(tag)>(true, x2, h, h_dtype, batch, channels, pixels, affine, z2, log_det, stream);
  });
}

void coupling_epilogue_inv(const void* z2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* x2, Stream stream) {
  dispatch_dtype(h_dtype, "coupling_epilogue_inv", [](auto) {});
  dispatch_dtype(dtype, "coupling_epilogue_inv", [&](auto tag) {
    launch_coupling<decltype(tag)>(false, z2, h, h_dtype, batch, channels, pixels, affine, x2, nullptr, stream);
  });
}

void coupling_epilogue_bwd(const void* dz2, const void* dlog_det, const void* x2, DType dtype, const void* h,
                           DType h_dtype, int64_t batch, int64_t channels, int64_t pixels, void* dx2, void* dh,
                           Stream stream) {
  dispatch_dtype(h_dtype, "coupling_epilogue_bwd", [](auto) {});
  dispatch_dtype(dtype, "coupling_epilogue_bwd", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const int64_t columns = channels * pixels;
    const AffineRows rows{channels, pixels, columns, h_dtype,
                          affine_vector_ok<T>(channels, pixels, h_dtype, {dz2, x2, dx2}, {h, dh})};
    const RowTeams teams(batch, columns, kVec<T>, /*split_rows=*/true);
    affine_coupling_epilogue_bwd_kernel<T><<<teams.grid, teams.block, 0, cuda_stream(stream)>>>(
        static_cast<const T*>(dz2), static_cast<const A*>(dlog_det), static_cast<const T*>(x2), h, batch, rows,
        teams.team, teams.segment, static_cast<T*>(dx2), dh);
    check_launch("affine_coupling_epilogue_bwd_kernel");
  });
}

}  // namespace flowkern::cuda
