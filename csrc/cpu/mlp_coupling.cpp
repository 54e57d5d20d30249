// The BERT-flow coupling with its MLP subnet on the CPU (flowkern.ops.mlp_coupling), forward, inverse and the
// backward of either direction, on tiles of kTileRows rows:
//   a1 = (x1 W1^T + b1) s1, h1 = relu(a1);  a2 = (h1 W2^T + b2) s2, h2 = relu(a2);  o = (h2 W3^T + b3) s3
// then the additive (z2 = x2 + o) or affine (shift = o[2j], raw = o[2j+1] + 2) epilogue.
//
// Per call the weights are laid out for the tile GEMMs of csrc/cpu/dispatch.h (accumulators in registers, each
// weight row streamed once per group of rows, terms summed in index order): transposed for the forward products,
// row-major for the backward's, padded with zeros to whole column blocks (padded hidden units and outputs have zero
// weights, biases and scales, so they stay zero). The affine outputs are split into a block of shifts and a block
// of raw scales, so the epilogue reads both contiguously. The hidden activations of a tile stay in small buffers
// (hidden <= kMaxFusedHidden).
// Backward: a fixed partition of the rows into groups (from the batch size only), one partial-gradient buffer per
// group, the groups added in order at the end: deterministic for any thread count.
#include <algorithm>
#include <vector>

#include "cpu/dispatch.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kMaxGroups = 32;

// The subnet's parameters laid out for the tile GEMMs, plus the padded sizes.
template <typename A>
struct Subnet {
  int64_t c1, c2, hidden, outputs;
  int64_t c1_padded, hidden_padded, output_block, outputs_padded;  // output_block: columns of shifts / raw scales
  bool affine;
  A factor;
  std::vector<A> w1t, w2t, w3t;              // forward: W1^T [c1, HP], W2^T [H, HP], W3^T [H, OP]
  std::vector<A> w1, w2, w3;                 // backward: W1 [H, C1P], W2 [H, HP], W3 [OP, HP]
  std::vector<A> b1, s1, b2, s2, b3, s3;     // biases and scales exp(f l), padded to HP / OP

  Subnet(const MlpParams& w, const MlpShape& shape, bool for_backward)
      : c1(shape.c1), c2(shape.c2), hidden(shape.hidden), outputs(shape.affine ? 2 * shape.c2 : shape.c2),
        c1_padded(round_up(shape.c1, kGemmColumns<A>)), hidden_padded(round_up(shape.hidden, kGemmColumns<A>)),
        output_block(round_up(shape.c2, kGemmColumns<A>)), outputs_padded((shape.affine ? 2 : 1) * output_block),
        affine(shape.affine), factor(A(shape.logscale_factor)) {
    const A* W1 = static_cast<const A*>(w.w1);
    const A* W2 = static_cast<const A*>(w.w2);
    const A* W3 = static_cast<const A*>(w.w3);
    const int64_t H = hidden, HP = hidden_padded, OP = outputs_padded;
    w1t.assign(c1 * HP, A(0));
    w2t.assign(H * HP, A(0));
    w3t.assign(H * OP, A(0));
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t k = 0; k < c1; ++k) w1t[k * HP + h] = W1[h * c1 + k];
      for (int64_t k = 0; k < H; ++k) w2t[k * HP + h] = W2[h * H + k];
    }
    for (int64_t i = 0; i < outputs; ++i)
      for (int64_t k = 0; k < H; ++k) w3t[k * OP + column(i)] = W3[i * H + k];
    scaled(w.b1, w.l1, H, HP, [](int64_t h) { return h; }, b1, s1);
    scaled(w.b2, w.l2, H, HP, [](int64_t h) { return h; }, b2, s2);
    scaled(w.b3, w.l3, outputs, OP, [this](int64_t i) { return column(i); }, b3, s3);
    if (!for_backward) return;
    w1.assign(H * c1_padded, A(0));
    w2.assign(H * HP, A(0));
    w3.assign(OP * HP, A(0));
    for (int64_t h = 0; h < H; ++h) {
      std::copy(W1 + h * c1, W1 + (h + 1) * c1, w1.data() + h * c1_padded);
      std::copy(W2 + h * H, W2 + (h + 1) * H, w2.data() + h * HP);
    }
    for (int64_t i = 0; i < outputs; ++i) std::copy(W3 + i * H, W3 + (i + 1) * H, w3.data() + column(i) * HP);
  }

  // Column of output i in the padded layout: affine outputs 2j (shift) and 2j+1 (raw scale) go to j and
  // output_block + j.
  int64_t column(int64_t i) const { return affine ? (i % 2) * output_block + i / 2 : i; }

  template <typename Where>
  void scaled(const void* bias, const void* logs, int64_t n, int64_t padded, Where where, std::vector<A>& b,
              std::vector<A>& s) const {
    b.assign(padded, A(0));
    s.assign(padded, A(0));
    for (int64_t i = 0; i < n; ++i) {
      b[where(i)] = static_cast<const A*>(bias)[i];
      s[where(i)] = exp_(factor * static_cast<const A*>(logs)[i]);
    }
  }
};

// A tile's activations: x1 [R, C1P], a = ActNorm outputs and h = relu(a) [R, HP], o [R, OP].
template <typename A>
struct Activations {
  std::vector<A> x1, a1, h1, a2, h2, o;
  explicit Activations(const Subnet<A>& net)
      : x1(kTileRows * net.c1_padded, A(0)), a1(kTileRows * net.hidden_padded), h1(a1.size()), a2(a1.size()),
        h2(a1.size()), o(kTileRows * net.outputs_padded) {}
};

// a = (a + b) s in place and h = relu(a) over rows x HP.
template <typename A>
void actnorm_relu(int64_t rows, int64_t HP, const std::vector<A>& b, const std::vector<A>& s, A* a, A* h) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < HP; ++i) {
      a[r * HP + i] = (a[r * HP + i] + b[i]) * s[i];
      h[r * HP + i] = relu(a[r * HP + i]);
    }
}

template <typename T, typename A>
void subnet_tile(const Subnet<A>& net, const T* x1, int64_t rows, Activations<A>& t) {
  const int64_t c1 = net.c1, C1P = net.c1_padded, H = net.hidden, HP = net.hidden_padded, OP = net.outputs_padded;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < c1; ++k) t.x1[r * C1P + k] = load_as<A>(x1[r * c1 + k]);
  gemm(rows, HP, c1, t.x1.data(), C1P, net.w1t.data(), HP, t.a1.data(), HP, false);
  actnorm_relu(rows, HP, net.b1, net.s1, t.a1.data(), t.h1.data());
  gemm(rows, HP, H, t.h1.data(), HP, net.w2t.data(), HP, t.a2.data(), HP, false);
  actnorm_relu(rows, HP, net.b2, net.s2, t.a2.data(), t.h2.data());
  gemm(rows, OP, H, t.h2.data(), HP, net.w3t.data(), OP, t.o.data(), OP, false);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < OP; ++i) t.o[r * OP + i] = (t.o[r * OP + i] + net.b3[i]) * net.s3[i];
}

// Forward: out2 = z2 from in2 = x2 and log_det; inverse: out2 = x2 from in2 = z2.
template <typename T, typename A>
void run_forward(Direction direction, const T* x1, const T* in2, const Subnet<A>& net, int64_t batch, T* out2,
                 A* log_det, const ParallelFor& par) {
  const int64_t c1 = net.c1, c2 = net.c2, OP = net.outputs_padded, OB = net.output_block;
  const bool inverse = direction == Direction::inverse;
  par(ceil_div(batch, kTileRows), 1, [&](int64_t tile_begin, int64_t tile_end) {
    Activations<A> t(net);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t row0 = tile * kTileRows, rows = std::min(kTileRows, batch - row0);
      subnet_tile(net, x1 + row0 * c1, rows, t);
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict in = in2 + (row0 + r) * c2;
        T* __restrict out = out2 + (row0 + r) * c2;
        const A* __restrict o = t.o.data() + r * OP;
        if (!net.affine) {
          for (int64_t j = 0; j < c2; ++j) out[j] = store_as<T>(load_as<A>(in[j]) + (inverse ? -o[j] : o[j]));
          if (!inverse) log_det[row0 + r] = A(0);
          continue;
        }
        const A* __restrict raw_out = o + OB;
        if (inverse) {  // as the reference: z2 / sigmoid(raw) - shift
          for (int64_t j = 0; j < c2; ++j)
            out[j] = store_as<T>(load_as<A>(in[j]) / sigmoid(raw_out[j] + A(kAffineScaleOffset)) - o[j]);
          continue;
        }
        A sum_log_scale = 0;
        for (int64_t j = 0; j < c2; ++j) {
          const SigmoidParts<A> scale(raw_out[j] + A(kAffineScaleOffset));
          out[j] = store_as<T>((load_as<A>(in[j]) + o[j]) * scale.sigmoid());
          sum_log_scale += scale.log_sigmoid();
        }
        log_det[row0 + r] = sum_log_scale;
      }
    }
  });
}

// Offsets of the parameter gradients in a group's partial buffer (padded layouts; l's without the factor f).
struct GradLayout {
  int64_t w1, b1, l1, w2, b2, l2, w3, b3, l3, size;
  template <typename A>
  explicit GradLayout(const Subnet<A>& net) {
    const int64_t H = net.hidden, HP = net.hidden_padded, OP = net.outputs_padded;
    w1 = 0;
    b1 = w1 + H * net.c1_padded;
    l1 = b1 + HP;
    w2 = l1 + HP;
    b2 = w2 + H * HP;
    l2 = b2 + HP;
    w3 = l2 + HP;
    b3 = w3 + OP * HP;
    l3 = b3 + OP;
    size = l3 + OP;
  }
};

// A tile's backward buffers.
template <typename A>
struct Gradients {
  std::vector<A> d_out, d_out_t, d_hidden, d_pre, d_pre_t, dx1;
  explicit Gradients(const Subnet<A>& net)
      : d_out(kTileRows * net.outputs_padded), d_out_t(net.outputs_padded * kTileRows),
        d_hidden(kTileRows * net.hidden_padded), d_pre(d_hidden.size()), d_pre_t(d_hidden.size()),
        dx1(kTileRows * net.c1_padded) {}
};

// Backward of a hidden layer a = (h_in W^T + b) s, h = relu(a), given dh in d_hidden: accumulates db, sum da a
// (dl / f) and dW = dpre^T h_in; leaves dpre = da s in d_pre (the caller takes dh_in = dpre W from it).
template <typename A>
void hidden_layer_backward(int64_t rows, int64_t H, int64_t HP, const A* a, const std::vector<A>& s, const A* h_in,
                           int64_t in_columns, Gradients<A>& g, A* dw, A* __restrict db, A* __restrict dl) {
  const A* __restrict scale = s.data();
  const A* __restrict dh = g.d_hidden.data();
  A* __restrict d_pre = g.d_pre.data();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < HP; ++i) {
      const A ai = a[r * HP + i];
      const A da = ai > A(0) ? dh[r * HP + i] : A(0);
      const A dpre = da * scale[i];
      d_pre[r * HP + i] = dpre;
      db[i] += dpre;
      dl[i] += da * ai;
    }
  transpose(d_pre, HP, rows, H, g.d_pre_t.data(), kTileRows);
  gemm(H, in_columns, rows, g.d_pre_t.data(), kTileRows, h_in, in_columns, dw, in_columns, true);
}

template <typename T, typename A>
void run_backward(Direction direction, const T* dout, const A* dlog_det, const T* x1, const T* in2,
                  const Subnet<A>& net, int64_t batch, T* dx1, T* din2, const MlpParamGrads& grads,
                  const ParallelFor& par) {
  const int64_t c1 = net.c1, c2 = net.c2, H = net.hidden, HP = net.hidden_padded, C1P = net.c1_padded;
  const int64_t O = net.outputs, OP = net.outputs_padded, OB = net.output_block;
  const bool inverse = direction == Direction::inverse;
  const GradLayout layout(net);
  const RowGroups groups = row_groups(batch, kTileRows, kMaxGroups);
  std::vector<A> partials(std::max<int64_t>(1, groups.count) * layout.size, A(0));
  par(groups.count, 1, [&](int64_t group_begin, int64_t group_end) {
    Activations<A> t(net);
    Gradients<A> g(net);
    for (int64_t group = group_begin; group < group_end; ++group) {
      A* part = partials.data() + group * layout.size;
      for (int64_t row0 = groups.begin(group); row0 < groups.end(group); row0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, groups.end(group) - row0);
        subnet_tile(net, x1 + row0 * c1, rows, t);
        // Epilogue: d(in2) and d_out = the gradient at o (shifts then raw scales when affine).
        std::fill(g.d_out.begin(), g.d_out.end(), A(0));
        for (int64_t r = 0; r < rows; ++r) {
          const T* __restrict d = dout + (row0 + r) * c2;
          const T* __restrict v = in2 + (row0 + r) * c2;
          T* __restrict dv = din2 + (row0 + r) * c2;
          const A* __restrict o = t.o.data() + r * OP;
          A* __restrict d_o = g.d_out.data() + r * OP;
          if (!net.affine) {  // out2 = in2 +- o
            for (int64_t j = 0; j < c2; ++j) {
              const A dj = load_as<A>(d[j]);
              dv[j] = store_as<T>(dj);
              d_o[j] = inverse ? -dj : dj;
            }
          } else if (!inverse) {  // z2 = (x2 + shift) s, log_det += log s: d log s / d raw = 1 - s
            const A dld = dlog_det[row0 + r];
            for (int64_t j = 0; j < c2; ++j) {
              const SigmoidParts<A> scale(o[OB + j] + A(kAffineScaleOffset));
              const A ds = load_as<A>(d[j]) * scale.sigmoid(), one_minus_s = scale.one_minus_sigmoid();
              dv[j] = store_as<T>(ds);
              d_o[j] = ds;
              d_o[OB + j] = ds * (load_as<A>(v[j]) + o[j]) * one_minus_s + dld * one_minus_s;
            }
          } else {  // x2 = z2 / s - shift, 1 / s = 1 + e with e = exp(-raw): dz2 = dx2 (1 + e), draw = -dx2 z2 e
            for (int64_t j = 0; j < c2; ++j) {
              const A e = exp_(-(o[OB + j] + A(kAffineScaleOffset)));
              const A dj = load_as<A>(d[j]);
              dv[j] = store_as<T>(dj * (A(1) + e));
              d_o[j] = -dj;
              d_o[OB + j] = -dj * load_as<A>(v[j]) * e;
            }
          }
        }
        // Output layer o = (h2 W3^T + b3) s3: dpre3 = d_o s3 (in place), db3, sum d_o o, dW3, dh2 = dpre3 W3.
        A* __restrict db3 = part + layout.b3;
        A* __restrict dl3 = part + layout.l3;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t i = 0; i < OP; ++i) {
            const A d_o = g.d_out[r * OP + i];
            const A dpre = d_o * net.s3[i];
            dl3[i] += d_o * t.o[r * OP + i];
            db3[i] += dpre;
            g.d_out[r * OP + i] = dpre;
          }
        transpose(g.d_out.data(), OP, rows, OP, g.d_out_t.data(), kTileRows);
        gemm(OP, HP, rows, g.d_out_t.data(), kTileRows, t.h2.data(), HP, part + layout.w3, HP, true);
        gemm(rows, HP, OP, g.d_out.data(), OP, net.w3.data(), HP, g.d_hidden.data(), HP, false);
        // Hidden layer 2, then dh1 = dpre2 W2; hidden layer 1, then dx1 = dpre1 W1.
        hidden_layer_backward(rows, H, HP, t.a2.data(), net.s2, t.h1.data(), HP, g, part + layout.w2,
                              part + layout.b2, part + layout.l2);
        gemm(rows, HP, H, g.d_pre.data(), HP, net.w2.data(), HP, g.d_hidden.data(), HP, false);
        hidden_layer_backward(rows, H, HP, t.a1.data(), net.s1, t.x1.data(), C1P, g, part + layout.w1,
                              part + layout.b1, part + layout.l1);
        gemm(rows, C1P, H, g.d_pre.data(), HP, net.w1.data(), C1P, g.dx1.data(), C1P, false);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < c1; ++k) dx1[(row0 + r) * c1 + k] = store_as<T>(g.dx1[r * C1P + k]);
      }
    }
  });
  // Groups added in order into group 0's buffer, then unpadded (and the l's scaled by f) into the outputs.
  A* total = partials.data();
  par(layout.size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t group = 1; group < groups.count; ++group) {
      const A* part = partials.data() + group * layout.size;
      for (int64_t i = begin; i < end; ++i) total[i] += part[i];
    }
  });
  const A f = net.factor;
  A* gw1 = static_cast<A*>(grads.w1);
  A* gw2 = static_cast<A*>(grads.w2);
  A* gw3 = static_cast<A*>(grads.w3);
  for (int64_t h = 0; h < H; ++h) {
    std::copy(total + layout.w1 + h * C1P, total + layout.w1 + h * C1P + c1, gw1 + h * c1);
    std::copy(total + layout.w2 + h * HP, total + layout.w2 + h * HP + H, gw2 + h * H);
    static_cast<A*>(grads.b1)[h] = total[layout.b1 + h];
    static_cast<A*>(grads.l1)[h] = f * total[layout.l1 + h];
    static_cast<A*>(grads.b2)[h] = total[layout.b2 + h];
    static_cast<A*>(grads.l2)[h] = f * total[layout.l2 + h];
  }
  for (int64_t i = 0; i < O; ++i) {
    const int64_t col = net.column(i);
    std::copy(total + layout.w3 + col * HP, total + layout.w3 + col * HP + H, gw3 + i * H);
    static_cast<A*>(grads.b3)[i] = total[layout.b3 + col];
    static_cast<A*>(grads.l3)[i] = f * total[layout.l3 + col];
  }
}

}  // namespace

void mlp_coupling_fwd(const void* x1, const void* x2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* z2, void* log_det, const ParallelFor& par) {
  check_hidden(shape.hidden, "mlp_coupling_fwd");
  dispatch_dtype(dtype, "mlp_coupling_fwd", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    const Subnet<A> net(w, shape, false);
    run_forward(Direction::forward, static_cast<const T*>(x1), static_cast<const T*>(x2), net, shape.batch,
                static_cast<T*>(z2), static_cast<A*>(log_det), par);
  });
}

void mlp_coupling_inv(const void* x1, const void* z2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* x2, const ParallelFor& par) {
  check_hidden(shape.hidden, "mlp_coupling_inv");
  dispatch_dtype(dtype, "mlp_coupling_inv", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    const Subnet<A> net(w, shape, false);
    run_forward(Direction::inverse, static_cast<const T*>(x1), static_cast<const T*>(z2), net, shape.batch,
                static_cast<T*>(x2), static_cast<A*>(nullptr), par);
  });
}

void mlp_coupling_bwd(Direction direction, const void* dout, const void* dlog_det, const void* x1, const void* other,
                      DType dtype, const MlpParams& w, const MlpShape& shape, void* dx1, void* dother,
                      const MlpParamGrads& grads, const ParallelFor& par) {
  check_hidden(shape.hidden, "mlp_coupling_bwd");
  dispatch_dtype(dtype, "mlp_coupling_bwd", [&](auto t) {
    using T = decltype(t);
    using A = acc_t<T>;
    const Subnet<A> net(w, shape, true);
    run_backward(direction, static_cast<const T*>(dout), static_cast<const A*>(dlog_det), static_cast<const T*>(x1),
                 static_cast<const T*>(other), net, shape.batch, static_cast<T*>(dx1), static_cast<T*>(dother), grads,
                 par);
  });
}

}  // namespace flowkern::cpu
