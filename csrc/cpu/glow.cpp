// The whole [B, C] Glow (BERT-flow family) on the CPU: forward, inverse and backward.
//
// Same structure as flowkern/kernels/triton/glow.py: a tile of rows goes through every step of every level in
// an acc-typed state buffer in *physical* channel order (channels never move; GlowPlan's tables say which
// channel plays which role at each step). Each step's subnet works in a *local* channel order (GlowPlan's
// local_order table, built once in Python): its conditioning and transformed channels in ascending physical
// order, the output layer as [shift (or additive term) of each transformed channel | raw scale of each], with the
// weights permuted to match on the host (per call: parameters are read fresh). Under reverse mixing (BERT-flow's)
// both sets are contiguous ranges of the state, so the subnet reads and the coupling writes the state in place
// with vector loops; other permutations gather and scatter through a row buffer.
// Every layer of the subnet, forward and backward (dW = in^T dout over a tile), is one register-blocked GEMM
// (cpu/dispatch.h). Parameter gradients: a fixed partition of the rows into groups (from the batch size only),
// one partial buffer per group in the local layout, summed in group order and mapped back to the packed layout:
// deterministic for any thread count. LU flows leave the tile loop at every mixing step for one GEMM over all
// rows through the caller's BLAS (the binding passes ATen's): a [B, CL] x [CL, CL] product is where a tuned GEMM
// beats any loop here.
#include <algorithm>
#include <climits>
#include <cmath>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/math.cuh"
#include "cpu/dispatch.h"
#include "flowkern.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kTileRows = 16;       // rows a tile carries through the flow together (weights stream once a tile)
constexpr int64_t kMaxGroups = 8;       // row groups of the backward (one partial-gradient buffer each)

// Columns of GlowPlan.meta, named in flowkern/kernels/glow_meta.py (OFF_ACTNORM_BIAS here kOffActnormBias, ...;
// tests/ops/test_glow.py checks this enum against it): parameter offsets, mixing offsets, C1, CL, the z offset.
enum Meta : int {
  kOffActnormBias = 0, kOffActnormLogs = 1, kOffW1 = 2, kOffB1 = 3, kOffL1 = 4, kOffW2 = 5, kOffB2 = 6, kOffL2 = 7,
  kOffW3 = 8, kOffB3 = 9, kOffL3 = 10, kOffMixW = 11, kOffMixB = 12, kC1 = 13, kCl = 14, kZOffset = 15, kCount = 16
};

// A buffer of n values, uninitialized (state buffers are written before they are read).
template <typename A>
std::unique_ptr<A[]> uninitialized(int64_t n) { return std::unique_ptr<A[]>(new A[n]); }

// Grow-only per-thread buffers reused across calls, for the backward's parameter-sized work (bounded by
// kMaxGroups copies of the parameters): fresh multi-megabyte allocations page-fault on every call, which at
// small batches costs as much as the arithmetic.
template <typename V>
V& reused_buffer() {
  static thread_local V buffer;
  return buffer;
}

// One step's structure (read from GlowPlan's tables, built once in Python) and its parameters in the subnet's
// local order (see the file comment).
template <typename A>
struct Step {
  int64_t c1 = 0, c2 = 0, cl = 0, outputs = 0;
  int64_t hp = 0, op = 0, c1p = 0;       // hidden, output and input widths padded for the GEMM (zero weights there)
  // The level's physical channels in local order (local_order's row): cond = the conditioning ones [c1], then
  // trans = the transformed ones [c2], each ascending; coupling [cl]: the coupling channel of each.
  const int32_t *cond = nullptr, *trans = nullptr, *coupling = nullptr;
  int64_t cond_first = -1, trans_first = -1;   // their first channel when they form a contiguous range
  std::vector<A> dense_bias, dense_scale;  // ActNorm per physical channel, identity (0, 1) on factored-out ones
  A an_log_det = 0;                      // f * sum(ActNorm logs) (permutation flows)
  std::vector<A> w1t, w2t, w3t;          // forward: W1^T [c1, HP], W2^T [H, HP], W3^T [H, OP]
  std::vector<A> w1, w2, w3;             // backward: W1 [H, C1P], W2 [H, HP], W3 [O, HP]
  std::vector<A> b1, s1, b2, s2, b3, s3; // biases and scales exp(f l), zero-padded to HP / OP
  const int32_t* an = nullptr;           // the step's row of an_idx (ActNorm channel of each physical channel)
  const A *mix_w = nullptr, *mix_b = nullptr;   // LU: the folded W [CL, CL] and bias [CL]
  int64_t off[kCount] = {};        // offsets into the packed parameters
  int64_t g_an_bias = 0, g_an_logs = 0, g_b1 = 0, g_l1 = 0, g_b2 = 0, g_l2 = 0, g_w1 = 0, g_w2 = 0, g_w3 = 0,
          g_b3 = 0, g_l3 = 0;            // offsets into the local gradient layout (gradient_layout)
};

template <typename A>
void prepare_step(const GlowPlanView& plan, const A* params, const A* mix, int64_t s, Step<A>& st);

// The packed row of W3 (and of b3, l3) behind local output o: the local outputs are [shift (or additive term) of
// each transformed channel | raw scale of each] in local order, the packed rows interleave them by coupling channel.
template <typename A>
int64_t output_row(const Step<A>& st, int64_t o) {
  if (st.outputs == st.c2) return st.coupling[st.c1 + o] - st.c1;
  const int64_t k = o % st.c2;
  return 2 * (st.coupling[st.c1 + k] - st.c1) + o / st.c2;
}

// Steps are prepared in parallel: at small batches this per-call work is a good part of the whole.
template <typename A>
std::vector<Step<A>> prepare(const GlowPlanView& plan, const A* params, const A* mix, const ParallelFor& par) {
  std::vector<Step<A>> steps(plan.steps);
  std::vector<std::string> errors(plan.steps);   // exceptions must not leave a parallel region
  par(plan.steps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      try {
        prepare_step(plan, params, mix, s, steps[s]);
      } catch (const std::invalid_argument& e) {
        errors[s] = e.what();
      }
    }
  });
  for (const std::string& error : errors)
    if (!error.empty()) throw std::invalid_argument(error);
  return steps;
}

template <typename A>
void prepare_step(const GlowPlanView& plan, const A* params, const A* mix, int64_t s, Step<A>& st) {
  const int64_t C = plan.channels, H = plan.hidden;
  const A f = A(plan.logscale_factor);
  {
    std::copy(plan.meta + s * kCount, plan.meta + (s + 1) * kCount, st.off);
    st.c1 = st.off[kC1];
    st.cl = st.off[kCl];
    st.c2 = st.cl - st.c1;
    if (st.c1 < 1 || st.c2 < 1 || st.cl > C)
      throw std::invalid_argument("glow: meta table at step " + std::to_string(s) + " gives C1 = " +
                                  std::to_string(st.c1) + ", CL = " + std::to_string(st.cl) +
                                  " (need 0 < C1 < CL <= " + std::to_string(C) + ")");
    st.outputs = st.c2 * (plan.affine ? 2 : 1);
    // The values the step reads at each meta offset, inside the packed parameters / mixing values.
    auto check_offset = [&](int column, int64_t n, int64_t numel, const char* what) {
      const int64_t first = st.off[column];
      if (first < 0 || first > numel - n)
        throw std::invalid_argument("glow: meta table at step " + std::to_string(s) + ", column " +
                                    std::to_string(column) + ": offset " + std::to_string(first) + " of " +
                                    std::to_string(n) + " values outside the " + std::to_string(numel) + " " + what);
    };
    const int64_t layer_sizes[] = {H * st.c1, H, H, H * H, H, H, st.outputs * H, st.outputs, st.outputs};
    for (int i = 0; i < 9; ++i) check_offset(kOffW1 + i, layer_sizes[i], plan.params_numel, "packed parameters");
    if (plan.lu) {
      check_offset(kOffMixW, st.cl * st.cl, plan.mix_numel, "mixing values");
      check_offset(kOffMixB, st.cl, plan.mix_numel, "mixing values");
    } else {
      check_offset(kOffActnormBias, st.cl, plan.params_numel, "packed parameters");
      check_offset(kOffActnormLogs, st.cl, plan.params_numel, "packed parameters");
    }
    st.cond = plan.local_order + s * C;
    st.trans = st.cond + st.c1;
    st.coupling = plan.local_order + (plan.steps + s) * C;
    const int32_t* an = plan.an_idx + s * C;
    st.an = an;
    // Checks only (the structure is the table's): each physical and coupling channel in range and used once,
    // each part ascending (the kernel's layout), ActNorm channels in range; notes whether each part is one
    // contiguous range.
    std::vector<char> used(C + st.cl, 0);   // physical channels, then coupling channels
    bool cond_range = true, trans_range = true;
    for (int64_t i = 0; i < st.cl; ++i) {
      const bool is_cond = i < st.c1;
      const int64_t p = st.cond[i], k = st.coupling[i], first = is_cond ? 0 : st.c1, last = is_cond ? st.c1 : st.cl;
      const int64_t previous = i == 0 || i == st.c1 ? -1 : st.cond[i - 1];
      if (p < 0 || p >= C || p <= previous || k < first || k >= last || used[p] || used[C + k] || an[p] < 0 ||
          an[p] >= st.cl)
        throw std::invalid_argument("glow: local order table out of range, repeated or not ascending at step " +
                                    std::to_string(s) + ", local channel " + std::to_string(i) + " (physical " +
                                    std::to_string(p) + ", coupling " + std::to_string(k) + ")");
      used[p] = used[C + k] = 1;
      if (previous >= 0 && p != previous + 1) (is_cond ? cond_range : trans_range) = false;
    }
    st.cond_first = cond_range ? st.cond[0] : -1;
    st.trans_first = trans_range ? st.trans[0] : -1;
    st.dense_bias.assign(C, A(0));
    st.dense_scale.assign(C, A(1));
    if (!plan.lu)
      for (int64_t i = 0; i < st.cl; ++i) {
        const int32_t p = st.cond[i];
        const A logs = params[st.off[kOffActnormLogs] + an[p]];
        st.dense_bias[p] = params[st.off[kOffActnormBias] + an[p]];
        st.dense_scale[p] = exp_(f * logs);
        st.an_log_det += f * logs;
      }
    const A* w1 = params + st.off[kOffW1];
    const A* w2 = params + st.off[kOffW2];
    const A* w3 = params + st.off[kOffW3];
    const int64_t HP = st.hp = round_up(H, kGemmColumns<A>);
    const int64_t OP = st.op = round_up(st.outputs, kGemmColumns<A>);
    const int64_t C1P = st.c1p = round_up(st.c1, kGemmColumns<A>);
    st.w1t.assign(st.c1 * HP, A(0));
    st.w1.assign(H * C1P, A(0));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < st.c1; ++j) {
        const A v = w1[h * st.c1 + st.coupling[j]];
        st.w1t[j * HP + h] = v;
        st.w1[h * C1P + j] = v;
      }
    st.w2t.assign(H * HP, A(0));
    st.w2.assign(H * HP, A(0));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t k = 0; k < H; ++k) {
        st.w2t[k * HP + h] = w2[h * H + k];
        st.w2[h * HP + k] = w2[h * H + k];
      }
    st.w3t.assign(H * OP, A(0));
    st.w3.assign(st.outputs * HP, A(0));
    for (int64_t o = 0; o < st.outputs; ++o)
      for (int64_t h = 0, row = output_row(st, o); h < H; ++h) {
        const A v = w3[row * H + h];
        st.w3t[h * OP + o] = v;
        st.w3[o * HP + h] = v;
      }
    auto scaled = [&](int64_t off_b, int64_t off_l, int64_t n, int64_t padded, bool output_rows,
                      std::vector<A>& b, std::vector<A>& sc) {
      b.assign(padded, A(0));
      sc.assign(padded, A(0));
      for (int64_t i = 0; i < n; ++i) {
        const int64_t from = output_rows ? output_row(st, i) : i;
        b[i] = params[off_b + from];
        sc[i] = exp_(f * params[off_l + from]);
      }
    };
    scaled(st.off[kOffB1], st.off[kOffL1], H, HP, false, st.b1, st.s1);
    scaled(st.off[kOffB2], st.off[kOffL2], H, HP, false, st.b2, st.s2);
    scaled(st.off[kOffB3], st.off[kOffL3], st.outputs, OP, true, st.b3, st.s3);
    if (plan.lu) {
      st.mix_w = mix + st.off[kOffMixW];
      st.mix_b = mix + st.off[kOffMixB];
    }
  }
}

// The local gradient layout: per step, the packed vectors (ActNorm, hidden layers) as they are, then W1 [H, C1P],
// W2 [H, HP], W3 [O, HP], b3 and l3 [O] in local order (the forms the backward's GEMMs write). Sets the
// steps' g_* offsets; packed_of gets, for each local position, the packed index it belongs to (-1: GEMM padding).
template <typename A>
void gradient_layout(std::vector<Step<A>>& steps, int64_t H, bool lu, std::vector<int32_t>& packed_of) {
  int64_t total = 0;
  for (const Step<A>& st : steps) total += (lu ? 0 : 2 * st.cl) + 4 * H + H * st.c1p + (H + st.outputs) * st.hp + 2 * st.outputs;
  if (total > INT32_MAX) throw std::invalid_argument("glow_bwd: too many parameters for the fused CPU Glow");
  packed_of.assign(total, -1);
  int64_t used = 0;
  auto region = [&](int64_t n) {
    used += n;
    return used - n;
  };
  auto same_order = [&](int64_t& g, int64_t packed_offset, int64_t n) {
    g = region(n);
    for (int64_t i = 0; i < n; ++i) packed_of[g + i] = packed_offset + i;
  };
  for (Step<A>& st : steps) {
    const int64_t HP = st.hp;
    if (!lu) {
      same_order(st.g_an_bias, st.off[kOffActnormBias], st.cl);
      same_order(st.g_an_logs, st.off[kOffActnormLogs], st.cl);
    }
    same_order(st.g_b1, st.off[kOffB1], H);
    same_order(st.g_l1, st.off[kOffL1], H);
    same_order(st.g_b2, st.off[kOffB2], H);
    same_order(st.g_l2, st.off[kOffL2], H);
    st.g_w1 = region(H * st.c1p);
    st.g_w2 = region(H * HP);
    st.g_w3 = region(st.outputs * HP);
    st.g_b3 = region(st.outputs);
    st.g_l3 = region(st.outputs);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < st.c1; ++j)
        packed_of[st.g_w1 + h * st.c1p + j] = st.off[kOffW1] + h * st.c1 + st.coupling[j];
      for (int64_t k = 0; k < H; ++k) packed_of[st.g_w2 + h * HP + k] = st.off[kOffW2] + h * H + k;
    }
    for (int64_t o = 0; o < st.outputs; ++o) {
      const int64_t row = output_row(st, o);
      for (int64_t h = 0; h < H; ++h) packed_of[st.g_w3 + o * HP + h] = st.off[kOffW3] + row * H + h;
      packed_of[st.g_b3 + o] = st.off[kOffB3] + row;
      packed_of[st.g_l3 + o] = st.off[kOffL3] + row;
    }
  }
}

// Per-thread scratch of one row tile: the MLP's activations (row strides c1, HP, OP of the step).
template <typename A>
struct Scratch {
  std::vector<A> x1, a1, h1, a2, h2, o, trans;
  const A* x1_rows = nullptr;   // the subnet's input rows: the state itself (stride C) or x1 (stride C1P)
  int64_t x1_stride = 0;
  Scratch(int64_t rows, int64_t c1_padded_max, int64_t c2_max, int64_t hidden_padded, int64_t outputs_max)
      : x1(rows * c1_padded_max), a1(rows * hidden_padded), h1(rows * hidden_padded), a2(rows * hidden_padded),
        h2(rows * hidden_padded), o(rows * outputs_max), trans(c2_max) {}
};

// The transformed channels of a state row as one array: the row itself when they form a range, else gathered into
// buf (scatter_trans writes it back).
template <typename A>
A* gather_trans(const Step<A>& st, A* row, A* buf) {
  if (st.trans_first >= 0) return row + st.trans_first;
  for (int64_t k = 0; k < st.c2; ++k) buf[k] = row[st.trans[k]];
  return buf;
}
template <typename A>
const A* gather_trans(const Step<A>& st, const A* row, A* buf) {
  if (st.trans_first >= 0) return row + st.trans_first;
  for (int64_t k = 0; k < st.c2; ++k) buf[k] = row[st.trans[k]];
  return buf;
}
template <typename A>
void scatter_trans(const Step<A>& st, A* row, const A* buf) {
  if (st.trans_first < 0)
    for (int64_t k = 0; k < st.c2; ++k) row[st.trans[k]] = buf[k];
}

// The subnet on `rows` rows of the state (row stride C): a = pre-activations (ActNorm output before relu),
// h = relu(a), o = the output layer, each layer one GEMM. Keeps everything the backward needs in the scratch.
template <typename A>
void subnet(const Step<A>& st, const A* state, int64_t rows, int64_t C, int64_t H, Scratch<A>& w) {
  const int64_t c1 = st.c1, HP = st.hp, OP = st.op;
  // In place when the conditioning channels are a range with C1P readable columns (the backward's dW1 GEMM reads
  // the padding columns; what it computes there is never used).
  if (st.cond_first >= 0 && st.cond_first + st.c1p <= C) {
    w.x1_rows = state + st.cond_first;
    w.x1_stride = C;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < c1; ++j) w.x1[r * st.c1p + j] = state[r * C + st.cond[j]];
    w.x1_rows = w.x1.data();
    w.x1_stride = st.c1p;
  }
  auto actnorm_relu = [&](const std::vector<A>& b, const std::vector<A>& sc, A* a, A* h) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < HP; ++i) {
        a[r * HP + i] = (a[r * HP + i] + b[i]) * sc[i];
        h[r * HP + i] = relu(a[r * HP + i]);
      }
  };
  gemm(rows, HP, c1, w.x1_rows, w.x1_stride, st.w1t.data(), HP, w.a1.data(), HP, false);
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
  const int64_t C = plan.channels, c2 = st.c2;
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
    A* t = gather_trans(st, v, w.trans.data());
    const A* o = w.o.data() + r * st.op;
    if (plan.affine) {
      A sum_log_scale = 0;
      for (int64_t k = 0; k < c2; ++k) {
        const A raw = o[c2 + k] + A(kAffineScaleOffset);
        t[k] = (t[k] + o[k]) * sigmoid(raw);
        sum_log_scale += log_sigmoid(raw);
      }
      row_log_det[r] += sum_log_scale;
    } else {
      for (int64_t k = 0; k < c2; ++k) t[k] += o[k];
    }
    scatter_trans(st, v, t);
  }
}

// Inverse of step s without its LU mixing: the coupling's inverse, then the ActNorm's (permutation flows).
template <typename A>
void step_inverse(const GlowPlanView& plan, const Step<A>& st, A* state, int64_t rows, Scratch<A>& w) {
  const int64_t C = plan.channels, c2 = st.c2;
  subnet(st, state, rows, C, plan.hidden, w);   // the conditioning channels are unchanged by the coupling
  for (int64_t r = 0; r < rows; ++r) {
    A* v = state + r * C;
    A* t = gather_trans(st, v, w.trans.data());
    const A* o = w.o.data() + r * st.op;
    if (plan.affine) {
      for (int64_t k = 0; k < c2; ++k) t[k] = t[k] * (A(1) + exp_(-(o[c2 + k] + A(kAffineScaleOffset)))) - o[k];
    } else {
      for (int64_t k = 0; k < c2; ++k) t[k] -= o[k];
    }
    scatter_trans(st, v, t);
  }
  if (!plan.lu) {
    const A* bias = st.dense_bias.data();
    const A* scale = st.dense_scale.data();
    for (int64_t r = 0; r < rows; ++r) {
      A* v = state + r * C;
      for (int64_t p = 0; p < C; ++p) v[p] = v[p] / scale[p] - bias[p];
    }
  }
}

// Per-thread buffers of the backward's MLP (padding columns stay zero: GEMMs read them).
template <typename A>
struct BackwardScratch {
  std::vector<A> dpre3, dh, dpre, dx1, transposed, u_trans, an_dbias, an_dlogs;
  BackwardScratch(int64_t rows, int64_t c1_padded_max, int64_t c2_max, int64_t hidden, int64_t hidden_padded,
                  int64_t outputs_max, int64_t channels)
      : dpre3(rows * outputs_max), dh(rows * hidden_padded), dpre(rows * hidden_padded), dx1(rows * c1_padded_max),
        transposed(std::max(outputs_max, hidden) * rows), u_trans(c2_max), an_dbias(channels),
        an_dlogs(channels) {}
};

// Through h = relu(a), a = (in W^T + b) s, given d = the gradient at h for `rows` rows (stride HP): dpre = the
// gradient at in W^T; adds the layer's bias and log-scale gradients (H of them).
template <typename A>
void actnorm_relu_backward(const A* __restrict a, const A* __restrict d, const A* __restrict s, int64_t rows,
                           int64_t H, int64_t HP, A f, A* __restrict dpre, A* __restrict g_b, A* __restrict g_l) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = r * HP + h;
      const A da = a[i] > A(0) ? d[i] : A(0);
      g_l[h] += f * da * a[i];
      dpre[i] = da * s[h];
      g_b[h] += dpre[i];
    }
}

// Through o = pre s (+ b inside): d, the gradient at o, becomes the gradient at pre; adds the bias and log-scale
// gradients (f d o: o already carries the scale).
template <typename A>
void output_scale_backward(const A* __restrict o, const A* __restrict s, int64_t rows, int64_t O, int64_t OP, A f,
                           A* __restrict d, A* __restrict g_b, A* __restrict g_l) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < O; ++i) {
      const int64_t k = r * OP + i;
      g_l[i] += f * d[k] * o[k];
      d[k] *= s[i];
      g_b[i] += d[k];
    }
}

// g_w [m, n] += dout^T in over the tile's rows (dout [rows, m] with stride ld_dout; in [rows, n] with stride ld_in,
// n a multiple of the GEMM width): one GEMM with the rows as its depth.
template <typename A>
void weight_gradient(const A* dout, int64_t ld_dout, int64_t m, const A* in, int64_t ld_in, int64_t n, int64_t rows,
                     A* g_w, A* transposed) {
  transpose(dout, ld_dout, rows, m, transposed, rows);
  gemm(m, n, rows, transposed, rows, in, ld_in, g_w, n, true);
}

// The ActNorm part of the backward, dense over C channels: d (gradient at the output, rows of stride C) becomes
// the gradient at the input; dbias = sum of it, dlogs = sum of d u (u: the saved output), both overwritten.
template <typename A>
void actnorm_backward_dense(const A* __restrict u, const A* __restrict scale, int64_t rows, int64_t C,
                            A* __restrict d, A* __restrict dbias, A* __restrict dlogs) {
  std::fill(dbias, dbias + C, A(0));
  std::fill(dlogs, dlogs + C, A(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t p = 0; p < C; ++p) {
      dlogs[p] += d[r * C + p] * u[r * C + p];
      d[r * C + p] *= scale[p];
      dbias[p] += d[r * C + p];
    }
}

// Backward of step s without its LU mixing, on a tile: dv (gradient at the step's output) becomes the gradient at
// its input (for LU flows: at the mixing GEMM's output). u: the saved coupling input; parameter gradients are
// added to this group's partial buffer `grad` (local layout, see gradient_layout).
template <typename A>
void step_backward(const GlowPlanView& plan, const Step<A>& st, A* dv, const A* u, const A* dlog_det, int64_t rows,
                   A* grad, Scratch<A>& w, BackwardScratch<A>& b) {
  const int64_t C = plan.channels, H = plan.hidden, O = st.outputs, c1 = st.c1, c2 = st.c2, HP = st.hp, OP = st.op;
  const A f = A(plan.logscale_factor);
  subnet(st, u, rows, C, H, w);
  // Epilogue: dv on the transformed channels becomes dx2 in place; dpre3 = d(output layer after its scale).
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dv + r * C;
    A* dt = gather_trans(st, d, w.trans.data());
    const A* o = w.o.data() + r * OP;
    A* dp3 = b.dpre3.data() + r * OP;
    if (plan.affine) {
      const A* ut = gather_trans(st, u + r * C, b.u_trans.data());
      for (int64_t k = 0; k < c2; ++k) {
        const A sg = sigmoid(o[c2 + k] + A(kAffineScaleOffset));
        const A dz2 = dt[k];
        dt[k] = dz2 * sg;
        dp3[k] = dz2 * sg;
        dp3[c2 + k] = dz2 * (ut[k] + o[k]) * sg * (A(1) - sg) + dlog_det[r] * (A(1) - sg);
      }
      scatter_trans(st, d, dt);
    } else {
      std::copy(dt, dt + c2, dp3);
    }
    std::fill(dp3 + O, dp3 + OP, A(0));   // GEMM padding (the buffer's stride changes with the step)
  }
  // Output layer o = (h2 W3^T + b3) s3: dpre3 becomes the gradient at h2 W3^T.
  output_scale_backward(w.o.data(), st.s3.data(), rows, O, OP, f, b.dpre3.data(), grad + st.g_b3, grad + st.g_l3);
  weight_gradient(b.dpre3.data(), OP, O, w.h2.data(), HP, HP, rows, grad + st.g_w3, b.transposed.data());
  gemm(rows, HP, O, b.dpre3.data(), OP, st.w3.data(), HP, b.dh.data(), HP, false);
  // Hidden layer 2: h2 = relu(a2), a2 = (h1 W2^T + b2) s2.
  actnorm_relu_backward(w.a2.data(), b.dh.data(), st.s2.data(), rows, H, HP, f, b.dpre.data(),
                        grad + st.g_b2, grad + st.g_l2);
  weight_gradient(b.dpre.data(), HP, H, w.h1.data(), HP, HP, rows, grad + st.g_w2, b.transposed.data());
  gemm(rows, HP, H, b.dpre.data(), HP, st.w2.data(), HP, b.dh.data(), HP, false);
  // Hidden layer 1: h1 = relu(a1), a1 = (x1 W1^T + b1) s1; dx1 flows to the conditioning channels.
  actnorm_relu_backward(w.a1.data(), b.dh.data(), st.s1.data(), rows, H, HP, f, b.dpre.data(),
                        grad + st.g_b1, grad + st.g_l1);
  weight_gradient(b.dpre.data(), HP, H, w.x1_rows, w.x1_stride, st.c1p, rows, grad + st.g_w1, b.transposed.data());
  gemm(rows, st.c1p, H, b.dpre.data(), HP, st.w1.data(), st.c1p, b.dx1.data(), st.c1p, false);
  for (int64_t r = 0; r < rows; ++r) {
    A* d = dv + r * C;
    const A* dx1 = b.dx1.data() + r * st.c1p;
    if (st.cond_first >= 0) {
      A* dc = d + st.cond_first;
      for (int64_t j = 0; j < c1; ++j) dc[j] += dx1[j];
    } else {
      for (int64_t j = 0; j < c1; ++j) d[st.cond[j]] += dx1[j];
    }
  }
  if (!plan.lu) {
    // u = (w + b) s: dw = du s, db = du s, dlogs = f du u (+ f per row for the log-det); dense over the channels
    // (identity on factored-out ones, whose sums are dropped), then added to the ActNorm channels.
    A* dbias = b.an_dbias.data();
    A* dlogs = b.an_dlogs.data();
    actnorm_backward_dense(u, st.dense_scale.data(), rows, C, dv, dbias, dlogs);
    A sum_dlog_det = 0;
    for (int64_t r = 0; r < rows; ++r) sum_dlog_det += dlog_det[r];
    A* g_bias = grad + st.g_an_bias;
    A* g_logs = grad + st.g_an_logs;
    for (int64_t i = 0; i < st.cl; ++i) {
      const int32_t p = st.cond[i];   // every channel of the level
      g_bias[st.an[p]] += dbias[p];
      g_logs[st.an[p]] += f * (dlogs[p] + sum_dlog_det);
    }
  }
}

// Runs of physical channels that land in consecutive columns of z (step +1) or in reverse (step -1): reverse
// mixing leaves whole levels as one run each, so writing z (and reading dz, z) is a few vector loops.
struct ColumnRun {
  int64_t physical, column, length, step;
};

std::vector<ColumnRun> column_runs(const int32_t* z_idx, int64_t C) {
  std::vector<ColumnRun> runs;
  for (int64_t p = 0; p < C;) {
    ColumnRun run{p, z_idx[p], 1, 1};
    if (p + 1 < C && (z_idx[p + 1] == z_idx[p] + 1 || z_idx[p + 1] == z_idx[p] - 1)) {
      run.step = z_idx[p + 1] - z_idx[p];
      while (p + run.length < C && z_idx[p + run.length] == z_idx[p] + run.step * run.length) ++run.length;
    }
    runs.push_back(run);
    p += run.length;
  }
  return runs;
}

// ---- drivers: tiles of rows through the steps; LU flows stop at every mixing for one GEMM over all rows ----

template <typename A>
struct Flow {
  const GlowPlanView& plan;
  std::vector<Step<A>> steps;
  std::vector<ColumnRun> runs;
  int64_t batch, tiles, c1_padded_max = 1, c2_max = 1, outputs_max = 1, hidden_padded = 1;
  Flow(const GlowPlanView& p, const A* params, const A* mix, int64_t b, const ParallelFor& par)
      : plan(p), steps(prepare(p, params, mix, par)), runs(column_runs(p.z_idx, p.channels)), batch(b),
        tiles((b + kTileRows - 1) / kTileRows) {
    for (const auto& st : steps) {
      c1_padded_max = std::max(c1_padded_max, st.c1p);
      c2_max = std::max(c2_max, st.c2);
      outputs_max = std::max(outputs_max, st.op);
      hidden_padded = st.hp;
    }
  }
  Scratch<A> scratch() const { return Scratch<A>(kTileRows, c1_padded_max, c2_max, hidden_padded, outputs_max); }
  BackwardScratch<A> backward_scratch() const {
    return BackwardScratch<A>(kTileRows, c1_padded_max, c2_max, plan.hidden, hidden_padded, outputs_max,
                              plan.channels);
  }
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

// The rows of a tile: in the flow-wide buffer (LU flows, whose GEMMs need every row) or a thread's own tile.
template <typename A>
A* tile_rows(A* buffer, int64_t row0, int64_t C, std::vector<A>& own) {
  return buffer ? buffer + row0 * C : own.data();
}

template <typename T, typename A>
void forward(const T* x, const A* params, const A* mix, const GlowPlanView& plan, int64_t batch, T* z, A* log_det,
             A* log_prior, A* mid, A* inp, const Gemm& gemm, const ParallelFor& par) {
  const Flow<A> flow(plan, params, mix, batch, par);
  const int64_t C = plan.channels, S = plan.steps;
  std::fill(log_det, log_det + batch, A(0));
  const A prior_const = A(-kHalfLog2Pi * double(C));
  // Steps [first, last) on every tile; `load` reads x first, `finish` writes z, the log-dets and the prior.
  auto run_tiles = [&](A* buffer, int64_t first, int64_t last, bool load, bool finish) {
    par(flow.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      Scratch<A> w = flow.scratch();
      std::vector<A> own(buffer ? 0 : kTileRows * C);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
        A* rows_state = tile_rows(buffer, row0, C, own);
        if (load) for (int64_t i = 0; i < rows * C; ++i) rows_state[i] = load_as<A>(x[row0 * C + i]);
        for (int64_t s = first; s < last; ++s)
          step_forward(plan, flow.steps[s], rows_state, rows, mid ? mid + (s * batch + row0) * C : nullptr,
                       log_det + row0, w);
        if (!finish) continue;
        if (mid) std::copy(rows_state, rows_state + rows * C, mid + (S * batch + row0) * C);
        for (int64_t r = 0; r < rows; ++r) {
          const A* v = rows_state + r * C;
          T* zr = z + (row0 + r) * C;
          for (const ColumnRun& run : flow.runs)
            for (int64_t i = 0; i < run.length; ++i) zr[run.column + i * run.step] = store_as<T>(v[run.physical + i]);
          A lanes[kLanes] = {};
          int64_t p = 0;
          for (; p + kLanes <= C; p += kLanes)
            for (int j = 0; j < kLanes; ++j) lanes[j] += v[p + j] * v[p + j];
          for (; p < C; ++p) lanes[p % kLanes] += v[p] * v[p];
          log_prior[row0 + r] = prior_const - A(0.5) * sum_lanes(lanes);
        }
      }
    });
  };
  if (!plan.lu) return run_tiles(nullptr, 0, S, true, true);
  auto state = uninitialized<A>(batch * C), other = uninitialized<A>(batch * C);
  A* cur = state.get();
  A* next = other.get();
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
  const Flow<A> flow(plan, params, mix, batch, par);
  const int64_t C = plan.channels, S = plan.steps;
  // Steps [last, first) in reverse on every tile; `load` gathers z first, `finish` writes x.
  auto run_tiles = [&](A* buffer, int64_t first, int64_t last, bool load, bool finish) {
    par(flow.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
      Scratch<A> w = flow.scratch();
      std::vector<A> own(buffer ? 0 : kTileRows * C);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
        A* rows_state = tile_rows(buffer, row0, C, own);
        if (load)
          for (int64_t r = 0; r < rows; ++r) {
            const T* zr = z + (row0 + r) * C;
            A* v = rows_state + r * C;
            for (const ColumnRun& run : flow.runs)
              for (int64_t i = 0; i < run.length; ++i) v[run.physical + i] = load_as<A>(zr[run.column + i * run.step]);
          }
        for (int64_t s = first - 1; s >= last; --s) step_inverse(plan, flow.steps[s], rows_state, rows, w);
        if (finish) for (int64_t i = 0; i < rows * C; ++i) x[row0 * C + i] = store_as<T>(rows_state[i]);
      }
    });
  };
  if (!plan.lu) return run_tiles(nullptr, S, 0, true, true);
  auto state = uninitialized<A>(batch * C), other = uninitialized<A>(batch * C);
  A* cur = state.get();
  A* next = other.get();
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
              const GlowPlanView& plan, int64_t batch, T* dx, A* dparams, A* dmid, const Gemm& gemm,
              const ParallelFor& par) {
  Flow<A> flow(plan, params, mix, batch, par);
  std::vector<int32_t>& packed_of = reused_buffer<std::vector<int32_t>>();
  gradient_layout(flow.steps, plan.hidden, plan.lu, packed_of);
  const int64_t local_numel = int64_t(packed_of.size());
  if (std::count_if(packed_of.begin(), packed_of.end(), [](int32_t i) { return i >= 0; }) != plan.params_numel)
    throw std::invalid_argument("glow_bwd: the plan's parameter offsets do not cover the " +
                                std::to_string(plan.params_numel) + " packed parameters");
  const int64_t C = plan.channels, S = plan.steps;
  const int64_t groups = std::min(flow.tiles, kMaxGroups);
  const int64_t tiles_per_group = (flow.tiles + groups - 1) / groups;
  std::vector<A>& partials = reused_buffer<std::vector<A>>();   // each group's part is zeroed by its thread
  partials.resize(groups * local_numel);
  // Steps [last, first) in reverse on every tile of every group; `init` starts from dz and the prior's gradient,
  // `finish` writes dx. A group's tiles add to the group's own partial gradients, so the split is fixed.
  auto run_groups = [&](A* buffer, int64_t first, int64_t last, bool init, bool finish) {
    par(groups, 1, [&](int64_t group_begin, int64_t group_end) {
      Scratch<A> w = flow.scratch();
      BackwardScratch<A> b = flow.backward_scratch();
      std::vector<A> own(buffer ? 0 : kTileRows * C);
      for (int64_t g = group_begin; g < group_end; ++g) {
        A* grad = partials.data() + g * local_numel;
        if (init) std::fill(grad, grad + local_numel, A(0));
        const int64_t tile_end = std::min(flow.tiles, (g + 1) * tiles_per_group);
        for (int64_t tile = g * tiles_per_group; tile < tile_end; ++tile) {
          const int64_t row0 = tile * kTileRows, rows = flow.rows_of(tile);
          A* dv = tile_rows(buffer, row0, C, own);
          if (init) {
            const A* final_state = mid + (S * batch + row0) * C;   // z before rounding
            for (int64_t r = 0; r < rows; ++r) {
              const T* dzr = dz + (row0 + r) * C;
              A* d = dv + r * C;
              for (const ColumnRun& run : flow.runs)
                for (int64_t i = 0; i < run.length; ++i) d[run.physical + i] = load_as<A>(dzr[run.column + i * run.step]);
              const A* v = final_state + r * C;
              const A dp = dlog_prior[row0 + r];
              for (int64_t p = 0; p < C; ++p) d[p] -= dp * v[p];
            }
          }
          for (int64_t s = first - 1; s >= last; --s)
            step_backward(plan, flow.steps[s], dv, mid + (s * batch + row0) * C, dlog_det + row0, rows, grad, w, b);
          if (finish) for (int64_t i = 0; i < rows * C; ++i) dx[row0 * C + i] = store_as<T>(dv[i]);
        }
      }
    });
  };
  if (!plan.lu) {
    run_groups(nullptr, S, 0, true, true);
  } else {
    auto state = uninitialized<A>(batch * C), other = uninitialized<A>(batch * C);
    A* cur = state.get();
    A* next = other.get();
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
  // Fixed-order sum of the group partials in the local layout (contiguous reads), each written to its packed
  // position; every packed parameter has exactly one local position.
  par(local_numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (packed_of[i] < 0) continue;
      A total = 0;
      for (int64_t g = 0; g < groups; ++g) total += partials[g * local_numel + i];
      dparams[packed_of[i]] = total;
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
              const void* mix, const void* mid, const GlowPlanView& plan, int64_t batch, void* dx,
              void* dparams, void* dmid, const Gemm& gemm, const ParallelFor& par) {
  check_plan(plan, "glow_bwd");
  dispatch(dtype, "glow_bwd", [&](auto t, auto a) {
    using T = decltype(t);
    using A = decltype(a);
    backward<T, A>(static_cast<const T*>(dz), static_cast<const A*>(dlog_det), static_cast<const A*>(dlog_prior),
                   static_cast<const A*>(params), static_cast<const A*>(mix), static_cast<const A*>(mid), plan, batch,
                   static_cast<T*>(dx), static_cast<A*>(dparams), static_cast<A*>(dmid), gemm, par);
  });
}

}  // namespace flowkern::cpu
