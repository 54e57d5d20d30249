// The whole [B, C] Glow (BERT-flow family) on the CPU: forward, inverse and backward.
//
// Same structure as flowkern/kernels/triton/glow.py: a tile of rows goes through every step of every level in
// an acc-typed state buffer in *physical* channel order (channels never move; GlowPlan's tables say which
// channel plays which role at each step). Per call, the host side of this file turns the tables into gather lists
// (conditioning / transformed channels of each step) and lays every weight matrix out so that each inner loop is
// a contiguous axpy over a row of it: no reductions in inner loops, so GCC vectorizes them without reassociating
// and the results do not depend on the vector width. Parameter gradients: a fixed partition of the rows into
// groups (from the batch size only), one partial buffer per group, summed in group order: deterministic for any
// thread count. LU flows leave the tile loop at every mixing step for one GEMM over all rows through the caller's
// BLAS (the binding passes ATen's): a [B, CL] x [CL, CL] product is where a tuned GEMM beats any loop here.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/math.cuh"
#include "cpu/dispatch.h"
#include "flowkern.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kTileRows = 16;       // rows a tile carries through the flow together (weights stream once a tile)
constexpr int64_t kMaxGroups = 32;      // row groups of the backward (one partial-gradient buffer each)

// Columns of GlowPlan.meta (flowkern/ops/glow.py): parameter offsets, then mixing offsets, C1, CL.
enum Meta : int {
  kActnormBias = 0, kActnormLogs, kW1, kB1, kL1, kW2, kB2, kL2, kW3, kB3, kL3, kMixW, kMixB, kC1, kCL, kMetaColumns = 16
};

// y[0:n] += a * x[0:n]
template <typename A>
inline void axpy(A* __restrict y, const A* __restrict x, A a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// One step's structure and its parameters laid out for the loops below (acc-typed copies where transposed).
template <typename A>
struct Step {
  int64_t c1 = 0, c2 = 0, cl = 0, outputs = 0;
  int64_t hp = 0, op = 0;                // hidden and output widths padded for the GEMM (zero weights there)
  std::vector<int32_t> cond, trans;      // physical channel of each conditioning / transformed channel
  std::vector<int32_t> active;           // physical channels of the level (ActNorm / mixing act on these)
  std::vector<A> an_bias, an_scale;      // per active channel (permutation flows)
  std::vector<A> dense_bias, dense_scale;  // the same per physical channel, identity (0, 1) on inactive ones
  A an_log_det = 0;                      // f * sum(ActNorm logs) (permutation flows)
  std::vector<A> w1t, w2t, w3t;          // W1^T [c1, HP], W2^T [H, HP], W3^T [H, OP], zero-padded
  const A *w1 = nullptr, *w2 = nullptr, *w3 = nullptr;   // row-major originals (backward)
  std::vector<A> b1, s1, b2, s2, b3, s3; // biases and scales exp(f l), zero-padded to HP / OP
  const int32_t* an = nullptr;           // the step's row of an_idx (ActNorm channel of each physical channel)
  const A *mix_w = nullptr, *mix_b = nullptr;   // LU: the folded W [CL, CL] and bias [CL]
  int64_t off[kMetaColumns] = {};
};

template <typename A>
std::vector<Step<A>> prepare(const GlowPlanView& plan, const A* params, const A* mix) {
  const int64_t C = plan.channels, H = plan.hidden;
  const A f = A(plan.logscale_factor);
  std::vector<Step<A>> steps(plan.steps);
  for (int64_t s = 0; s < plan.steps; ++s) {
    Step<A>& st = steps[s];
    std::copy(plan.meta + s * kMetaColumns, plan.meta + (s + 1) * kMetaColumns, st.off);
    st.c1 = st.off[kC1];
    st.cl = st.off[kCL];
    st.c2 = st.cl - st.c1;
    st.outputs = st.c2 * (plan.affine ? 2 : 1);
    st.cond.assign(st.c1, -1);
    st.trans.assign(st.c2, -1);
    const int32_t* cp = plan.cp_idx + s * C;
    const int32_t* an = plan.an_idx + s * C;
    st.an = an;
    for (int64_t p = 0; p < C; ++p) {
      if (cp[p] < 0) continue;
      if (cp[p] >= st.cl) throw std::invalid_argument("glow: coupling index table out of range at step " +
                                                      std::to_string(s));
      if (cp[p] < st.c1) st.cond[cp[p]] = int32_t(p);
      else st.trans[cp[p] - st.c1] = int32_t(p);
      st.active.push_back(int32_t(p));
      if (!plan.lu) {
        const A logs = params[st.off[kActnormLogs] + an[p]];
        st.an_bias.push_back(params[st.off[kActnormBias] + an[p]]);
        st.an_scale.push_back(exp_(f * logs));
        st.an_log_det += f * logs;
      }
    }
    if (!plan.lu) {
      st.dense_bias.assign(C, A(0));
      st.dense_scale.assign(C, A(1));
      for (size_t i = 0; i < st.active.size(); ++i) {
        st.dense_bias[st.active[i]] = st.an_bias[i];
        st.dense_scale[st.active[i]] = st.an_scale[i];
      }
    }
    for (int32_t p : st.cond) if (p < 0) throw std::invalid_argument("glow: incomplete coupling index table");
    for (int32_t p : st.trans) if (p < 0) throw std::invalid_argument("glow: incomplete coupling index table");
    st.w1 = params + st.off[kW1];
    st.w2 = params + st.off[kW2];
    st.w3 = params + st.off[kW3];
    st.hp = round_up(H, kGemmColumns<A>);
    st.op = round_up(st.outputs, kGemmColumns<A>);
    st.w1t.assign(st.c1 * st.hp, A(0));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < st.c1; ++j) st.w1t[j * st.hp + h] = st.w1[h * st.c1 + j];
    st.w2t.assign(H * st.hp, A(0));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t k = 0; k < H; ++k) st.w2t[k * st.hp + h] = st.w2[h * H + k];
    st.w3t.assign(H * st.op, A(0));
    for (int64_t o = 0; o < st.outputs; ++o)
      for (int64_t h = 0; h < H; ++h) st.w3t[h * st.op + o] = st.w3[o * H + h];
    auto scaled = [&](int64_t off_b, int64_t off_l, int64_t n, int64_t padded, std::vector<A>& b,
                      std::vector<A>& sc) {
      b.assign(padded, A(0));
      sc.assign(padded, A(0));
      for (int64_t i = 0; i < n; ++i) {
        b[i] = params[off_b + i];
        sc[i] = exp_(f * params[off_l + i]);
      }
    };
    scaled(st.off[kB1], st.off[kL1], H, st.hp, st.b1, st.s1);
    scaled(st.off[kB2], st.off[kL2], H, st.hp, st.b2, st.s2);
    scaled(st.off[kB3], st.off[kL3], st.outputs, st.op, st.b3, st.s3);
    if (plan.lu) {
      st.mix_w = mix + st.off[kMixW];
      st.mix_b = mix + st.off[kMixB];
    }
  }
  return steps;
}

// Per-thread scratch of one row tile: the MLP's activations (row strides c1, HP, OP of the step).
template <typename A>
struct Scratch {
  std::vector<A> x1, a1, h1, a2, h2, o;
  Scratch(int64_t rows, int64_t c1_max, int64_t hidden_padded, int64_t outputs_max)
      : x1(rows * c1_max), a1(rows * hidden_padded), h1(rows * hidden_padded), a2(rows * hidden_padded),
        h2(rows * hidden_padded), o(rows * outputs_max) {}
};

// The subnet on `rows` rows of the state (row stride C): x1 gathered, a = pre-activations (ActNorm output before
// relu), h = relu(a), o = the output layer, each layer one register-blocked GEMM (cpu/dispatch.h). Keeps
// everything the backward needs in the scratch.
template <typename A>
void subnet(const Step<A>& st, const A* state, int64_t rows, int64_t C, int64_t H, Scratch<A>& w) {
  const int64_t c1 = st.c1, HP = st.hp, OP = st.op;
  for (int64_t r = 0; r < rows; ++r) {
    const A* v = state + r * C;
    A* x1 = w.x1.data() + r * c1;
    for (int64_t j = 0; j < c1; ++j) x1[j] = v[st.cond[j]];
  }
  auto actnorm_relu = [&](const std::vector<A>& b, const std::vector<A>& sc, A* a, A* h) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < HP; ++i) {
        a[r * HP + i] = (a[r * HP + i] + b[i]) * sc[i];
        h[r * HP + i] = relu(a[r * HP + i]);
      }
  };
  gemm(rows, HP, c1, w.x1.data(), c1, st.w1t.data(), HP, w.a1.data(), HP, false);
  actnorm_relu(st.b1, st.s1, w.a1.data(), w.h1.data());
  gemm(rows, HP, H, w.h1.data(), HP, st.w2t.data(), HP, w.a2.data(), HP, false);
  actnorm_relu(st.b2, st.s2, w.a2.data(), w.h2.data());
  gemm(rows, OP, H, w.h2.data(), HP, st.w3t.data(), OP, w.o.data(), OP, false);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < OP; ++i) w.o[r * OP + i] = (w.o[r * OP + i] + st.b3[i]) * st.s3[i];
}

// ---- one step on a tile of rows (row stride C), in place ----

// Forward of step s without its LU mixing: the ActNorm (permutation flows), then the coupling. Saves the coupling's
// input to mid_rows when given; adds the step's log-det to row_log_det.
template <typename A>
void step_forward(const GlowPlanView& plan, const Step<A>& st, A* state, int64_t rows, A* mid_rows, A* row_log_det,
                  Scratch<A>& w) {
  const int64_t C = plan.channels;
  if (!plan.lu) {
    // Dense over all channels (identity on factored-out ones) so the loop vectorizes.
    const A* bias = st.dense_bias.data();
    const A* scale = st.dense_scale.data();
    for (int64_t r = 0; r < rows; ++r) {
      A* v = state + r * C;
      for (int64_t p = 0; p < C; ++p) v[p] = (v[p] + bias[p]) * scale[p];
      row_log_det[r] += st.an_log_det;
    }
  }
  if (mid_rows) std::copy(state, state + rows * C, mid_rows);
  subnet(st, state, rows, C, plan.hidden, w);
  for (int64_t r = 0; r < rows; ++r) {
    A* v = state + r * C;
    const A* o = w.o.data() + r * st.op;
    if (plan.affine) {
      A sum_log_scale = 0;
      for (int64_t k = 0; k < st.c2; ++k) {
        const A raw = o[2 * k + 1] + A(kAffineScaleOffset);
        A& t = v[st.trans[k]];
        t = (t + o[2 * k]) * sigmoid(raw);
        sum_log_scale += log_sigmoid(raw);
      }
      row_log_det[r] += sum_log_scale;
    } else {
      for (int64_t k = 0; k < st.c2; ++k) v[st.trans[k]] += o[k];
    }
  }
}

// Inverse of step s without its LU mixing: the coupling's inverse, then the ActNorm's (permutation flows).
template <typename A>
void step_inverse(const GlowPlanView& plan, const Step<A>& st, A* state, int64_t rows, Scratch<A>& w) {
  const int64_t C = plan.channels;
  subnet(st, state, rows, C, plan.hidden, w);   // the conditioning channels are unchanged by the coupling
  for (int64_t r = 0; r < rows; ++r) {
    A* v = state + r * C;
    const A* o = w.o.data() + r * st.op;
    if (plan.affine) {
      for (int64_t k = 0; k < st.c2; ++k) {
        A& t = v[st.trans[k]];
        t = t * (A(1) + exp_(-(o[2 * k + 1] + A(kAffineScaleOffset)))) - o[2 * k];
      }
    } else {
      for (int64_t k = 0; k < st.c2; ++k) v[st.trans[k]] -= o[k];
    }
  }
  if (!plan.lu) {
    const int64_t n_active = int64_t(st.active.size());
    for (int64_t r = 0; r < rows; ++r) {
      A* v = state + r * C;
      for (int64_t i = 0; i < n_active; ++i) {
        const int32_t p = st.active[i];
        v[p] = v[p] / st.an_scale[i] - st.an_bias[i];
      }
    }
  }
}

// Per-thread buffers of the backward's MLP.
template <typename A>
struct BackwardScratch {
  std::vector<A> dpre3, dh, dpre, dx1;
  BackwardScratch(int64_t rows, int64_t c1_max, int64_t hidden, int64_t outputs_max)
      : dpre3(rows * outputs_max), dh(rows * hidden), dpre(rows * hidden), dx1(rows * c1_max) {}
};

// Through h = relu(a), a = (in W^T + b) s, given d = the gradient at h: dpre = the gradient at in W^T; adds the
// layer's bias and log-scale gradients.
template <typename A>
void actnorm_relu_backward(const A* a, const A* d, const A* s, int64_t H, A f, A* dpre, A* g_b, A* g_l) {
  for (int64_t h = 0; h < H; ++h) {
    const A da = a[h] > A(0) ? d[h] : A(0);
    g_l[h] += f * da * a[h];
    dpre[h] = da * s[h];
    g_b[h] += dpre[h];
  }
}

// Through out = in W^T (W [m, n]) for one row: g_w += dout (x) in, d_in = dout W (overwritten).
template <typename A>
void linear_backward(const A* dout, const A* in, const A* w, int64_t m, int64_t n, A* g_w, A* d_in) {
  std::fill(d_in, d_in + n, A(0));
  for (int64_t k = 0; k < m; ++k) {
    axpy(g_w + k * n, in, dout[k], n);
    axpy(d_in, w + k * n, dout[k], n);
  }
}

// Backward of step s without its LU mixing, on a tile: dv (gradient at the step's output) becomes the gradient at
// its input (for LU flows: at the mixing GEMM's output). u: the saved coupling input; parameter gradients are
// added to this group's partial buffer `grad`.
template <typename A>
void step_backward(const GlowPlanView& plan, const Step<A>& st, A* dv, const A* u, const A* dlog_det, int64_t rows,
                   A* grad, Scratch<A>& w, BackwardScratch<A>& b) {
  const int64_t C = plan.channels, H = plan.hidden, O = st.outputs, c1 = st.c1, HP = st.hp, OP = st.op;
  const A f = A(plan.logscale_factor);
  subnet(st, u, rows, C, H, w);
  // Epilogue: dv on the transformed channels becomes dx2 in place; dpre3 = d(output layer before its scale).
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dv + r * C;
    const A* ur = u + r * C;
    const A* o = w.o.data() + r * OP;
    A* dp3 = b.dpre3.data() + r * O;
    if (plan.affine) {
      for (int64_t k = 0; k < st.c2; ++k) {
        const int32_t p = st.trans[k];
        const A sg = sigmoid(o[2 * k + 1] + A(kAffineScaleOffset));
        const A dz2 = d[p];
        d[p] = dz2 * sg;
        dp3[2 * k] = dz2 * sg;
        dp3[2 * k + 1] = dz2 * (ur[p] + o[2 * k]) * sg * (A(1) - sg) + dlog_det[r] * (A(1) - sg);
      }
    } else {
      for (int64_t k = 0; k < st.c2; ++k) dp3[k] = d[st.trans[k]];
    }
  }
  // Output layer o = (h2 W3^T + b3) s3.
  A* g_b3 = grad + st.off[kB3];
  A* g_l3 = grad + st.off[kL3];
  for (int64_t r = 0; r < rows; ++r) {
    A* dp3 = b.dpre3.data() + r * O;
    const A* o = w.o.data() + r * OP;
    for (int64_t i = 0; i < O; ++i) {
      g_l3[i] += f * dp3[i] * o[i];
      dp3[i] *= st.s3[i];
      g_b3[i] += dp3[i];
    }
    linear_backward(dp3, w.h2.data() + r * HP, st.w3, O, H, grad + st.off[kW3], b.dh.data() + r * H);
  }
  // Hidden layer 2: h2 = relu(a2), a2 = (h1 W2^T + b2) s2.
  for (int64_t r = 0; r < rows; ++r) {
    A* dp = b.dpre.data() + r * H;
    actnorm_relu_backward(w.a2.data() + r * HP, b.dh.data() + r * H, st.s2.data(), H, f, dp, grad + st.off[kB2],
                          grad + st.off[kL2]);
    linear_backward(dp, w.h1.data() + r * HP, st.w2, H, H, grad + st.off[kW2], b.dh.data() + r * H);
  }
  // Hidden layer 1: h1 = relu(a1), a1 = (x1 W1^T + b1) s1; dx1 flows to the conditioning channels.
  for (int64_t r = 0; r < rows; ++r) {
    A* dp = b.dpre.data() + r * H;
    actnorm_relu_backward(w.a1.data() + r * HP, b.dh.data() + r * H, st.s1.data(), H, f, dp, grad + st.off[kB1],
                          grad + st.off[kL1]);
    A* dx1r = b.dx1.data() + r * c1;
    linear_backward(dp, w.x1.data() + r * c1, st.w1, H, c1, grad + st.off[kW1], dx1r);
    A* dvr = dv + r * C;
    for (int64_t j = 0; j < c1; ++j) dvr[st.cond[j]] += dx1r[j];
  }
  if (!plan.lu) {
    // u = (w + b) s on the active channels: dw = du s, db = du s, dlogs = f du u (+ f per row for the log-det).
    A* g_bias = grad + st.off[kActnormBias];
    A* g_logs = grad + st.off[kActnormLogs];
    const int64_t n_active = int64_t(st.active.size());
    A sum_dlog_det = 0;
    for (int64_t r = 0; r < rows; ++r) {
      A* d = dv + r * C;
      const A* ur = u + r * C;
      for (int64_t i = 0; i < n_active; ++i) {
        const int32_t p = st.active[i];
        const A du = d[p];
        g_logs[st.an[p]] += f * du * ur[p];
        d[p] = du * st.an_scale[i];
        g_bias[st.an[p]] += d[p];
      }
      sum_dlog_det += dlog_det[r];
    }
    for (int64_t i = 0; i < n_active; ++i) g_logs[st.an[st.active[i]]] += f * sum_dlog_det;
  }
}

// ---- drivers: tiles of rows through the steps; LU flows stop at every mixing for one GEMM over all rows ----

template <typename A>
struct Flow {
  const GlowPlanView& plan;
  std::vector<Step<A>> steps;
  int64_t batch, tiles, c1_max = 1, outputs_max = 1, hidden_padded = 1;
  Flow(const GlowPlanView& p, const A* params, const A* mix, int64_t b)
      : plan(p), steps(prepare(p, params, mix)), batch(b), tiles((b + kTileRows - 1) / kTileRows) {
    for (const auto& st : steps) {
      c1_max = std::max(c1_max, st.c1);
      outputs_max = std::max(outputs_max, st.op);
      hidden_padded = st.hp;
    }
  }
  Scratch<A> scratch() const { return Scratch<A>(kTileRows, c1_max, hidden_padded, outputs_max); }
  int64_t rows_of(int64_t tile) const { return std::min(kTileRows, batch - tile * kTileRows); }
};

// out[:, :CL] = in[:, :CL] W^T + b (forward / inverse, W = the folded mixing) or in[:, :CL] W (backward, no
// bias); columns >= CL (factored out at earlier levels) are carried over. Through the caller's GEMM.
template <typename A>
void mix_all_rows(const Step<A>& st, const A* in, A* out, int64_t batch, int64_t C, bool transpose_w,
                  const A* bias, DType acc, const Gemm& gemm, const ParallelFor& par) {
  par(batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::copy(in + r * C + st.cl, in + (r + 1) * C, out + r * C + st.cl);
  });
  gemm(acc, batch, st.cl, st.cl, in, C, st.mix_w, transpose_w, bias, out, C);
}

template <typename A> constexpr DType acc_dtype() { return sizeof(A) == 8 ? DType::f64 : DType::f32; }

template <typename T, typename A>
void forward(const T* x, const A* params, const A* mix, const GlowPlanView& plan, int64_t batch, T* z, A* log_det,
             A* log_prior, A* mid, A* inp, const Gemm& gemm, const ParallelFor& par) {
  const Flow<A> flow(plan, params, mix, batch);
  const int64_t C = plan.channels, S = plan.steps;
  std::vector<A> state(batch * C), other(plan.lu ? batch * C : 0);
  std::fill(log_det, log_det + batch, A(0));
  const A prior_const = A(-kHalfLog2Pi * double(C));
  // Steps [first, last) on every tile; `load` reads x first, `finish` writes z, the log-dets and the prior.
  auto run_tiles = [&](A* buffer, int64_t first, int64_t last, bool load, bool finish) {
    par(flow.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      Scratch<A> w = flow.scratch();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
        A* rows_state = buffer + row0 * C;
        if (load) for (int64_t i = 0; i < rows * C; ++i) rows_state[i] = load_as<A>(x[row0 * C + i]);
        for (int64_t s = first; s < last; ++s)
          step_forward(plan, flow.steps[s], rows_state, rows, mid ? mid + (s * batch + row0) * C : nullptr,
                       log_det + row0, w);
        if (!finish) continue;
        if (mid) std::copy(rows_state, rows_state + rows * C, mid + (S * batch + row0) * C);
        for (int64_t r = 0; r < rows; ++r) {
          const A* v = rows_state + r * C;
          T* zr = z + (row0 + r) * C;
          A sq = 0;
          for (int64_t p = 0; p < C; ++p) {
            zr[plan.z_idx[p]] = store_as<T>(v[p]);
            sq += v[p] * v[p];
          }
          log_prior[row0 + r] = prior_const - A(0.5) * sq;
        }
      }
    });
  };
  if (!plan.lu) return run_tiles(state.data(), 0, S, true, true);
  A* cur = state.data();
  A* next = other.data();
  run_tiles(cur, 0, 0, true, false);
  for (int64_t s = 0; s < S; ++s) {
    if (inp) std::copy(cur, cur + batch * C, inp + s * batch * C);
    mix_all_rows(flow.steps[s], cur, next, batch, C, true, flow.steps[s].mix_b, acc_dtype<A>(), gemm, par);
    std::swap(cur, next);
    run_tiles(cur, s, s + 1, false, s == S - 1);
  }
}

template <typename T, typename A>
void inverse(const T* z, const A* params, const A* mix, const GlowPlanView& plan, int64_t batch, T* x,
             const Gemm& gemm, const ParallelFor& par) {
  const Flow<A> flow(plan, params, mix, batch);
  const int64_t C = plan.channels, S = plan.steps;
  std::vector<A> state(batch * C), other(plan.lu ? batch * C : 0);
  // Steps [last, first) in reverse on every tile; `load` gathers z first, `finish` writes x.
  auto run_tiles = [&](A* buffer, int64_t first, int64_t last, bool load, bool finish) {
    par(flow.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      Scratch<A> w = flow.scratch();
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
        A* rows_state = buffer + row0 * C;
        if (load)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t p = 0; p < C; ++p) rows_state[r * C + p] = load_as<A>(z[(row0 + r) * C + plan.z_idx[p]]);
        for (int64_t s = first - 1; s >= last; --s) step_inverse(plan, flow.steps[s], rows_state, rows, w);
        if (finish) for (int64_t i = 0; i < rows * C; ++i) x[row0 * C + i] = store_as<T>(rows_state[i]);
      }
    });
  };
  if (!plan.lu) return run_tiles(state.data(), S, 0, true, true);
  A* cur = state.data();
  A* next = other.data();
  run_tiles(cur, S, S, true, false);
  for (int64_t s = S - 1; s >= 0; --s) {
    run_tiles(cur, s + 1, s, false, false);
    // pack_inverse folds the ActNorm inverse into W^-1 and the bias: the same GEMM form as the forward.
    mix_all_rows(flow.steps[s], cur, next, batch, C, true, flow.steps[s].mix_b, acc_dtype<A>(), gemm, par);
    std::swap(cur, next);
  }
  run_tiles(cur, 0, 0, false, true);
}

template <typename T, typename A>
void backward(const T* dz, const A* dlog_det, const A* dlog_prior, const A* params, const A* mix, const A* mid,
              const GlowPlanView& plan, int64_t batch, int64_t params_numel, T* dx, A* dparams, A* dmid,
              const Gemm& gemm, const ParallelFor& par) {
  const Flow<A> flow(plan, params, mix, batch);
  const int64_t C = plan.channels, S = plan.steps;
  const int64_t groups = std::min(flow.tiles, kMaxGroups);
  const int64_t tiles_per_group = (flow.tiles + groups - 1) / groups;
  std::vector<A> partials(groups * params_numel, A(0));
  std::vector<A> state(batch * C), other(plan.lu ? batch * C : 0);
  // Steps [last, first) in reverse on every tile of every group; `init` starts from dz and the prior's gradient,
  // `finish` writes dx. A group's tiles add to the group's own partial gradients, so the split is fixed.
  auto run_groups = [&](A* buffer, int64_t first, int64_t last, bool init, bool finish) {
    par(groups, 1, [&](int64_t group_begin, int64_t group_end) {
      Scratch<A> w = flow.scratch();
      BackwardScratch<A> b(kTileRows, flow.c1_max, plan.hidden, flow.outputs_max);
      for (int64_t g = group_begin; g < group_end; ++g) {
        A* grad = partials.data() + g * params_numel;
        const int64_t tile_end = std::min(flow.tiles, (g + 1) * tiles_per_group);
        for (int64_t tile = g * tiles_per_group; tile < tile_end; ++tile) {
          const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
          A* dv = buffer + row0 * C;
          if (init) {
            const A* final_state = mid + (S * batch + row0) * C;   // z before rounding
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t p = 0; p < C; ++p)
                dv[r * C + p] = load_as<A>(dz[(row0 + r) * C + plan.z_idx[p]]) -
                                dlog_prior[row0 + r] * final_state[r * C + p];
          }
          for (int64_t s = first - 1; s >= last; --s)
            step_backward(plan, flow.steps[s], dv, mid + (s * batch + row0) * C, dlog_det + row0, rows, grad, w, b);
          if (finish) for (int64_t i = 0; i < rows * C; ++i) dx[row0 * C + i] = store_as<T>(dv[i]);
        }
      }
    });
  };
  if (!plan.lu) {
    run_groups(state.data(), S, 0, true, true);
  } else {
    A* cur = state.data();
    A* next = other.data();
    run_groups(cur, S, S, true, false);
    for (int64_t s = S - 1; s >= 0; --s) {
      run_groups(cur, s + 1, s, false, false);
      std::copy(cur, cur + batch * C, dmid + s * batch * C);   // the gradient at the GEMM's output
      mix_all_rows(flow.steps[s], cur, next, batch, C, false, static_cast<const A*>(nullptr), acc_dtype<A>(), gemm,
                   par);
      std::swap(cur, next);
    }
    run_groups(cur, 0, 0, false, true);
  }
  // Fixed-order sum of the group partials, split over parameters.
  par(params_numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A total = 0;
      for (int64_t g = 0; g < groups; ++g) total += partials[g * params_numel + i];
      dparams[i] = total;
    }
  });
}



template <typename Fn>
void dispatch(DType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case DType::f16: return fn(Half{}, float{});
    case DType::bf16: return fn(BFloat16{}, float{});
    case DType::f32: return fn(float{}, float{});
    case DType::f64: return fn(double{}, double{});
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype");
}

void check_plan(const GlowPlanView& plan, const char* op) {
  if (plan.hidden < 1 || plan.hidden > kMaxFusedHidden)
    throw std::invalid_argument(std::string(op) + ": hidden width " + std::to_string(plan.hidden) +
                                " outside [1, " + std::to_string(kMaxFusedHidden) + "]");
}

}  // namespace

void glow_fwd(const void* x, DType dtype, const void* params, const void* mix, const GlowPlanView& plan,
              int64_t batch, void* z, void* log_det, void* log_prior, void* mid, void* inp, const Gemm& gemm,
              const ParallelFor& par) {
  check_plan(plan, "glow_fwd");
  dispatch(dtype, "glow_fwd", [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    forward<T, A>(static_cast<const T*>(x), static_cast<const A*>(params), static_cast<const A*>(mix), plan, batch,
                  static_cast<T*>(z), static_cast<A*>(log_det), static_cast<A*>(log_prior), static_cast<A*>(mid),
                  static_cast<A*>(inp), gemm, par);
  });
}

void glow_inv(const void* z, DType dtype, const void* params, const void* mix, const GlowPlanView& plan,
              int64_t batch, void* x, const Gemm& gemm, const ParallelFor& par) {
  check_plan(plan, "glow_inv");
  dispatch(dtype, "glow_inv", [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    inverse<T, A>(static_cast<const T*>(z), static_cast<const A*>(params), static_cast<const A*>(mix), plan, batch,
                  static_cast<T*>(x), gemm, par);
  });
}

void glow_bwd(const void* dz, const void* dlog_det, const void* dlog_prior, DType dtype, const void* params,
              const void* mix, const void* mid, const GlowPlanView& plan, int64_t batch, int64_t params_numel,
              void* dx, void* dparams, void* dmid, const Gemm& gemm, const ParallelFor& par) {
  check_plan(plan, "glow_bwd");
  dispatch(dtype, "glow_bwd", [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    backward<T, A>(static_cast<const T*>(dz), static_cast<const A*>(dlog_det), static_cast<const A*>(dlog_prior),
                   static_cast<const A*>(params), static_cast<const A*>(mix), static_cast<const A*>(mid), plan, batch,
                   params_numel, static_cast<T*>(dx), static_cast<A*>(dparams), static_cast<A*>(dmid), gemm, par);
  });
}

}  // namespace flowkern::cpu
