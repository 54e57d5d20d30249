// Torch-free tests of the CPU launchers (csrc/cpu, all but glow; the channelwise ops through their engine): each against a naive double-precision loop
// implementation on small odd sizes with random data, for fp64 / fp32 and 16-bit storage; the fp64 backwards also
// against central differences of the naive forward (which checks the naive backwards' formulas); bitwise equal
// results for different ParallelFor splits (the stand-in for thread counts); the error paths.
// Build (from the repository root; CMake builds it as a test target):
//   g++ -std=c++17 -O2 -I csrc csrc/tests/test_cpu_kernels.cpp csrc/cpu/{channelwise,coupling_epilogue,invconv,
//       mlp_coupling}.cpp -o test_cpu_kernels && ./test_cpu_kernels
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/math.cuh"
#include "flowkern.h"
#include "ops/registry.h"

using namespace flowkern;
using Vec = std::vector<double>;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const std::string& what, const std::string& detail = "") {
  if (ok) {
    ++passed;
    return;
  }
  ++failed;
  std::printf("FAIL %s %s\n", what.c_str(), detail.c_str());
}

// Runs fn over chunks of `chunk` indices in order (0: one chunk): different chunkings stand in for thread counts.
cpu::ParallelFor serial(int64_t chunk = 0) {
  return [chunk](int64_t n, int64_t, const cpu::RangeFn& fn) {
    const int64_t step = chunk > 0 ? chunk : std::max<int64_t>(n, 1);
    for (int64_t begin = 0; begin < n; begin += step) fn(begin, std::min(n, begin + step));
  };
}
const cpu::ParallelFor kSplits[] = {serial(1), serial(3), serial(7)};

std::mt19937_64 rng(12345);

Vec randn(int64_t n, double scale = 1.0, double mean = 0.0) {
  std::normal_distribution<double> normal(mean, scale);
  Vec v(n);
  for (double& x : v) x = normal(rng);
  return v;
}

// ---- storage types ----
template <typename T> struct Name;
template <> struct Name<double> {
  static constexpr const char* value = "f64";
  static constexpr DType dtype = DType::f64;
};
template <> struct Name<float> {
  static constexpr const char* value = "f32";
  static constexpr DType dtype = DType::f32;
};
template <> struct Name<BFloat16> {
  static constexpr const char* value = "bf16";
  static constexpr DType dtype = DType::bf16;
};
template <> struct Name<Half> {
  static constexpr const char* value = "f16";
  static constexpr DType dtype = DType::f16;
};

// Values in storage type T; `values` is what the kernels see (the rounded inputs), for the references.
template <typename T>
struct Stored {
  std::vector<T> data;
  Vec values;
  explicit Stored(const Vec& v) : data(v.size()) {
    values.resize(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      data[i] = store_as<T>(v[i]);
      values[i] = load_as<double>(data[i]);
    }
  }
  explicit Stored(int64_t n) : data(n), values(n) {}
  Vec read() const {
    Vec v(data.size());
    for (size_t i = 0; i < data.size(); ++i) v[i] = load_as<double>(data[i]);
    return v;
  }
};

// (rtol, atol) of a value stored in T; acc-typed results (log-dets, parameter gradients) use the acc type's.
struct Tol { double rtol, atol; };
template <typename T> Tol tol_of() { return {1e-5, 1e-5}; }
template <> Tol tol_of<double>() { return {1e-11, 1e-11}; }
template <> Tol tol_of<BFloat16>() { return {1.6e-2, 1.6e-2}; }
template <> Tol tol_of<Half>() { return {2e-3, 2e-3}; }
template <typename T> Tol acc_tol() { return std::is_same<T, double>::value ? Tol{1e-11, 1e-11} : Tol{2e-5, 2e-5}; }

// |got - want| <= atol sqrt(terms) + rtol |want| everywhere (NaN fails).
void expect_close(const Vec& got, const Vec& want, Tol tol, const std::string& what, double terms = 1) {
  if (got.size() != want.size()) return check(false, what, "size mismatch");
  double worst = 0;  // the largest excess over the tolerance
  size_t at = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    double excess = std::abs(got[i] - want[i]) - (tol.atol * std::sqrt(terms) + tol.rtol * std::abs(want[i]));
    if (std::isnan(excess)) excess = INFINITY;
    if (excess > worst) worst = excess, at = i;
  }
  char detail[160] = "";
  if (at < got.size()) std::snprintf(detail, sizeof detail, "at %zu: got %.9g want %.9g", at, got[at], want[at]);
  check(at == got.size(), what, detail);
}

void expect_same(const std::vector<Vec>& a, const std::vector<Vec>& b, const std::string& what) {
  check(a == b, what + " bitwise equal across ParallelFor splits");
}

template <typename Fn>
void expect_throws(Fn&& fn, const std::string& what) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return check(true, what);
  }
  check(false, what, "no std::invalid_argument");
}

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

Vec axpy(const Vec& x, double t, const Vec& v) {
  Vec out(x);
  for (size_t i = 0; i < x.size(); ++i) out[i] += t * v[i];
  return out;
}

// Central difference of loss(t) at t = 0 against the analytic directional derivative.
void expect_directional(const std::function<double(double)>& loss, double analytic, const std::string& what) {
  const double eps = 1e-6;
  const double numeric = (loss(eps) - loss(-eps)) / (2 * eps);
  char detail[120];
  std::snprintf(detail, sizeof detail, "numeric %.12g analytic %.12g", numeric, analytic);
  check(std::abs(numeric - analytic) <= 1e-6 * (1 + std::abs(analytic)), what + " vs central differences", detail);
}

double sigmoid_d(double v) { return 1 / (1 + std::exp(-v)); }

// ---- ActNorm ----
struct ActnormRef {
  int64_t B, C, P;
  double f;
  void forward(const Vec& x, const Vec& bias, const Vec& logs, Vec& y, Vec& log_det) const {
    y.assign(B * C * P, 0);
    double sum_logs = 0;
    for (int64_t c = 0; c < C; ++c) sum_logs += f * logs[c];
    log_det.assign(B, sum_logs * P);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          y[i] = (x[i] + bias[c]) * std::exp(f * logs[c]);
        }
  }
  Vec inverse(const Vec& y, const Vec& bias, const Vec& logs) const {
    Vec x(B * C * P);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          x[i] = y[i] * std::exp(-f * logs[c]) - bias[c];
        }
    return x;
  }
  void backward(const Vec& dy, const Vec& dld, const Vec& x, const Vec& bias, const Vec& logs, Vec& dx, Vec& dbias,
                Vec& dlogs) const {
    dx.assign(B * C * P, 0);
    dbias.assign(C, 0);
    dlogs.assign(C, 0);
    double sum_dld = 0;
    for (double d : dld) sum_dld += d;
    for (int64_t c = 0; c < C; ++c) {
      const double s = std::exp(f * logs[c]);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          dx[i] = dy[i] * s;
          dbias[c] += dy[i] * s;
          dlogs[c] += f * dy[i] * (x[i] + bias[c]) * s;
        }
      dlogs[c] += f * P * sum_dld;
    }
  }
};

template <typename T>
void test_actnorm(int64_t B, int64_t C, int64_t P) {
  using A = acc_t<T>;
  const std::string name = std::string("actnorm ") + Name<T>::value + " B=" + std::to_string(B) + " C=" +
                           std::to_string(C) + " P=" + std::to_string(P);
  const DType dt = Name<T>::dtype;
  const int64_t n = B * C * P;
  const ActnormRef ref{B, C, P, 3.0};
  Stored<T> x(randn(n)), dy(randn(n));
  Stored<A> bias(randn(C, 0.5)), logs(randn(C, 0.1)), dld(randn(B));
  const auto run = [&](const cpu::ParallelFor& par) {
    Stored<T> y(n), xi(n), dx(n);
    Stored<A> log_det(B), dbias(C), dlogs(C);
    const ChannelwiseArgs fwd{B, C, P, {x.data.data()}, {}, {bias.data.data(), logs.data.data()}, {ref.f},
                              {y.data.data()}, {log_det.data.data()}, {}};
    cpu::channelwise<ops::ActnormFwd>(dt, fwd, par);
    ChannelwiseArgs inv = fwd;
    inv.outputs[0] = xi.data.data();
    cpu::channelwise<ops::ActnormInv>(dt, inv, par);
    const ChannelwiseArgs bwd{B, C, P, {dy.data.data(), x.data.data()}, {dld.data.data()},
                              {bias.data.data(), logs.data.data()}, {ref.f}, {dx.data.data()}, {},
                              {dbias.data.data(), dlogs.data.data()}};
    cpu::channelwise<ops::ActnormBwd>(dt, bwd, par);
    return std::vector<Vec>{y.read(), log_det.read(), xi.read(), dx.read(), dbias.read(), dlogs.read()};
  };
  const std::vector<Vec> got = run(serial());
  Vec y, log_det, dx, dbias, dlogs;
  ref.forward(x.values, bias.values, logs.values, y, log_det);
  ref.backward(dy.values, dld.values, x.values, bias.values, logs.values, dx, dbias, dlogs);
  expect_close(got[0], y, tol_of<T>(), name + " fwd y");
  expect_close(got[1], log_det, acc_tol<T>(), name + " fwd log_det", C);
  expect_close(got[2], ref.inverse(x.values, bias.values, logs.values), tol_of<T>(), name + " inv");
  expect_close(got[3], dx, tol_of<T>(), name + " bwd dx");
  expect_close(got[4], dbias, acc_tol<T>(), name + " bwd dbias", B * P);
  expect_close(got[5], dlogs, acc_tol<T>(), name + " bwd dlogs", B * P);
  for (const auto& par : kSplits) expect_same(run(par), got, name);
  if (!std::is_same<T, double>::value) return;
  // Directional derivative of sum dy y + sum dld log_det along random (vx, vbias, vlogs).
  const Vec vx = randn(n), vb = randn(C), vl = randn(C);
  const auto loss = [&](double t) {
    Vec yt, ldt;
    ref.forward(axpy(x.values, t, vx), axpy(bias.values, t, vb), axpy(logs.values, t, vl), yt, ldt);
    return dot(dy.values, yt) + dot(dld.values, ldt);
  };
  expect_directional(loss, dot(got[3], vx) + dot(got[4], vb) + dot(got[5], vl), name + " bwd");
}

// ---- Coupling epilogue ----
struct CouplingEpilogueRef {
  int64_t B, C, P;
  bool affine;
  // Shift and raw scale (+2) of column n = c P + p of row b.
  double shift(const Vec& h, int64_t b, int64_t c, int64_t p) const { return h[(b * 2 * C + 2 * c) * P + p]; }
  double raw(const Vec& h, int64_t b, int64_t c, int64_t p) const { return h[(b * 2 * C + 2 * c + 1) * P + p] + 2; }
  void forward(const Vec& x, const Vec& h, Vec& z, Vec& log_det) const {
    z.assign(B * C * P, 0);
    log_det.assign(B, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          if (!affine) {
            z[i] = x[i] + h[i];
            continue;
          }
          const double s = sigmoid_d(raw(h, b, c, p));
          z[i] = (x[i] + shift(h, b, c, p)) * s;
          log_det[b] += std::log(s);
        }
  }
  Vec inverse(const Vec& z, const Vec& h) const {
    Vec x(B * C * P);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          x[i] = affine ? z[i] / sigmoid_d(raw(h, b, c, p)) - shift(h, b, c, p) : z[i] - h[i];
        }
    return x;
  }
  void backward(const Vec& dz, const Vec& dld, const Vec& x, const Vec& h, Vec& dx, Vec& dh) const {
    dx.assign(B * C * P, 0);
    dh.assign(2 * B * C * P, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (b * C + c) * P + p;
          const double s = sigmoid_d(raw(h, b, c, p));
          dx[i] = dz[i] * s;
          dh[(b * 2 * C + 2 * c) * P + p] = dz[i] * s;
          dh[(b * 2 * C + 2 * c + 1) * P + p] = dz[i] * (x[i] + shift(h, b, c, p)) * s * (1 - s) + dld[b] * (1 - s);
        }
  }
};

template <typename T, typename H>
void test_coupling_epilogue(int64_t B, int64_t C, int64_t P, bool affine) {
  using A = acc_t<T>;
  const std::string name = std::string("coupling_epilogue ") + (affine ? "affine " : "additive ") + Name<T>::value +
                           "/h " + Name<H>::value + " B=" + std::to_string(B) + " C=" + std::to_string(C) + " P=" +
                           std::to_string(P);
  const DType dt = Name<T>::dtype, ht = Name<H>::dtype;
  const int64_t n = B * C * P, hn = (affine ? 2 : 1) * n;
  const CouplingEpilogueRef ref{B, C, P, affine};
  Stored<T> x(randn(n)), dz(randn(n));
  Stored<H> h(randn(hn));
  Stored<A> dld(randn(B));
  const auto run = [&](const cpu::ParallelFor& par) {
    Stored<T> z(n), xi(n), dx(n);
    Stored<H> dh(hn);
    Stored<A> log_det(B);
    cpu::coupling_epilogue_fwd(x.data.data(), dt, h.data.data(), ht, B, C, P, affine, z.data.data(),
                               log_det.data.data(), par);
    cpu::coupling_epilogue_inv(x.data.data(), dt, h.data.data(), ht, B, C, P, affine, xi.data.data(), par);
    if (affine)
      cpu::coupling_epilogue_bwd(dz.data.data(), dld.data.data(), x.data.data(), dt, h.data.data(), ht, B, C, P,
                                 dx.data.data(), dh.data.data(), par);
    return std::vector<Vec>{z.read(), log_det.read(), xi.read(), dx.read(), dh.read()};
  };
  const std::vector<Vec> got = run(serial());
  Vec z, log_det, dx, dh;
  ref.forward(x.values, h.values, z, log_det);
  expect_close(got[0], z, tol_of<T>(), name + " fwd z2");
  expect_close(got[1], log_det, acc_tol<T>(), name + " fwd log_det", C * P);
  expect_close(got[2], ref.inverse(x.values, h.values), tol_of<T>(), name + " inv");
  for (const auto& par : kSplits) expect_same(run(par), got, name);
  if (!affine) return;
  ref.backward(dz.values, dld.values, x.values, h.values, dx, dh);
  expect_close(got[3], dx, tol_of<T>(), name + " bwd dx2");
  expect_close(got[4], dh, tol_of<H>(), name + " bwd dh");
  if (!std::is_same<T, double>::value || !std::is_same<H, double>::value) return;
  const Vec vx = randn(n), vh = randn(hn);
  const auto loss = [&](double t) {
    Vec zt, ldt;
    ref.forward(axpy(x.values, t, vx), axpy(h.values, t, vh), zt, ldt);
    return dot(dz.values, zt) + dot(dld.values, ldt);
  };
  expect_directional(loss, dot(got[3], vx) + dot(got[4], vh), name + " bwd");
}

// ---- Prior ----
template <typename T>
void test_prior(int64_t B, int64_t numel) {
  using A = acc_t<T>;
  const std::string name = std::string("gaussian_log_prob ") + Name<T>::value + " B=" + std::to_string(B) +
                           " numel=" + std::to_string(numel);
  const DType dt = Name<T>::dtype;
  Stored<T> z(randn(B * numel));
  Stored<A> dlp(randn(B));
  const auto run = [&](const cpu::ParallelFor& par) {
    Stored<A> log_prob(B);
    Stored<T> dz(B * numel);
    cpu::channelwise<ops::GaussianLogProbFwd>(dt, {B, 1, numel, {z.data.data()}, {}, {}, {}, {}, {log_prob.data.data()}, {}},
                                              par);
    cpu::channelwise<ops::GaussianLogProbBwd>(dt, {B, 1, numel, {z.data.data()}, {dlp.data.data()}, {}, {},
                                                   {dz.data.data()}, {}, {}}, par);
    return std::vector<Vec>{log_prob.read(), dz.read()};
  };
  const std::vector<Vec> got = run(serial());
  Vec log_prob(B, 0), dz(B * numel);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < numel; ++i) {
      const double v = z.values[b * numel + i];
      log_prob[b] += -0.5 * (v * v + std::log(2 * M_PI));
      dz[b * numel + i] = -v * dlp.values[b];
    }
  expect_close(got[0], log_prob, acc_tol<T>(), name + " fwd", numel);
  expect_close(got[1], dz, tol_of<T>(), name + " bwd");
  for (const auto& par : kSplits) expect_same(run(par), got, name);
}

// ---- LU weight ----
struct LuRef {
  int64_t C;
  std::vector<int64_t> perm;
  Vec unit_lower(const Vec& lower) const {
    Vec L(C * C, 0);
    for (int64_t r = 0; r < C; ++r) {
      for (int64_t k = 0; k < r; ++k) L[r * C + k] = lower[r * C + k];
      L[r * C + r] = 1;
    }
    return L;
  }
  Vec upper_with_diag(const Vec& upper, const Vec& sign_s, const Vec& log_s) const {
    Vec U(C * C, 0);
    for (int64_t k = 0; k < C; ++k) {
      U[k * C + k] = sign_s[k] * std::exp(log_s[k]);
      for (int64_t c = k + 1; c < C; ++c) U[k * C + c] = upper[k * C + c];
    }
    return U;
  }
  Vec weight(const Vec& lower, const Vec& upper, const Vec& sign_s, const Vec& log_s) const {
    const Vec L = unit_lower(lower), U = upper_with_diag(upper, sign_s, log_s);
    Vec W(C * C, 0);
    for (int64_t i = 0; i < C; ++i)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < C; ++k) W[i * C + c] += L[perm[i] * C + k] * U[k * C + c];
    return W;
  }
  void backward(const Vec& dW, double dld, const Vec& lower, const Vec& upper, const Vec& sign_s, const Vec& log_s,
                Vec& dlower, Vec& dupper, Vec& dlog_s) const {
    const Vec L = unit_lower(lower), U = upper_with_diag(upper, sign_s, log_s);
    Vec dM(C * C);
    for (int64_t i = 0; i < C; ++i)
      for (int64_t c = 0; c < C; ++c) dM[perm[i] * C + c] = dW[i * C + c];
    dlower.assign(C * C, 0);
    dupper.assign(C * C, 0);
    dlog_s.assign(C, 0);
    for (int64_t r = 0; r < C; ++r)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c = 0; c < C; ++c) dlower[r * C + k] += dM[r * C + c] * U[k * C + c];
    for (int64_t k = 0; k < C; ++k)
      for (int64_t c = k; c < C; ++c) {
        double s = 0;
        for (int64_t r = 0; r < C; ++r) s += L[r * C + k] * dM[r * C + c];
        if (c > k) dupper[k * C + c] = s;
        else dlog_s[k] = s * U[k * C + k] + dld;
      }
  }
};

template <typename A>
void test_lu_weight(int64_t C) {
  const std::string name = std::string("lu_weight ") + Name<A>::value + " C=" + std::to_string(C);
  const DType dt = Name<A>::dtype;
  LuRef ref{C, std::vector<int64_t>(C)};
  for (int64_t i = 0; i < C; ++i) ref.perm[i] = i;
  std::shuffle(ref.perm.begin(), ref.perm.end(), rng);
  const double scale = 1 / std::sqrt(double(C));
  Stored<A> lower(randn(C * C, scale)), upper(randn(C * C, scale)), log_s(randn(C, 0.3)), dW(randn(C * C));
  Vec signs = randn(C);
  for (double& s : signs) s = s < 0 ? -1 : 1;
  Stored<A> sign_s(signs), dld(Vec{0.7});
  const auto run = [&](const cpu::ParallelFor& par) {
    Stored<A> W(C * C), log_det(1), dlower(C * C), dupper(C * C), dlog_s(C);
    cpu::lu_weight_fwd(ref.perm.data(), lower.data.data(), upper.data.data(), sign_s.data.data(), log_s.data.data(),
                       dt, C, W.data.data(), log_det.data.data(), par);
    cpu::lu_weight_bwd(dW.data.data(), dld.data.data(), ref.perm.data(), lower.data.data(), upper.data.data(),
                       sign_s.data.data(), log_s.data.data(), dt, C, dlower.data.data(), dupper.data.data(),
                       dlog_s.data.data(), par);
    return std::vector<Vec>{W.read(), log_det.read(), dlower.read(), dupper.read(), dlog_s.read()};
  };
  const std::vector<Vec> got = run(serial());
  double log_det = 0;
  for (double v : log_s.values) log_det += v;
  Vec dlower, dupper, dlog_s;
  ref.backward(dW.values, dld.values[0], lower.values, upper.values, sign_s.values, log_s.values, dlower, dupper,
               dlog_s);
  expect_close(got[0], ref.weight(lower.values, upper.values, sign_s.values, log_s.values), acc_tol<A>(),
               name + " fwd W", C);
  expect_close(got[1], Vec{log_det}, acc_tol<A>(), name + " fwd log_det", C);
  expect_close(got[2], dlower, acc_tol<A>(), name + " bwd dlower", C);
  expect_close(got[3], dupper, acc_tol<A>(), name + " bwd dupper", C);
  expect_close(got[4], dlog_s, acc_tol<A>(), name + " bwd dlog_s", C);
  for (const auto& par : kSplits) expect_same(run(par), got, name);
  if (!std::is_same<A, double>::value) return;
  // Loss sum dW W + dld sum(log_s) along random directions of lower, upper, log_s (sign_s is not a parameter).
  const Vec vl = randn(C * C), vu = randn(C * C), vs = randn(C);
  const auto loss = [&](double t) {
    const Vec ls = axpy(log_s.values, t, vs);
    double sum_log_s = 0;
    for (double v : ls) sum_log_s += v;
    return dot(dW.values, ref.weight(axpy(lower.values, t, vl), axpy(upper.values, t, vu), sign_s.values, ls)) +
           dld.values[0] * sum_log_s;
  };
  expect_directional(loss, dot(got[2], vl) + dot(got[3], vu) + dot(got[4], vs), name + " bwd");
}

// ---- MLP coupling ----
// Parameters in order w1, b1, l1, w2, b2, l2, w3, b3, l3.
struct MlpRef {
  int64_t B, c1, c2, H;
  bool affine;
  double f;
  int64_t outputs() const { return affine ? 2 * c2 : c2; }
  std::vector<int64_t> sizes() const {
    const int64_t O = outputs();
    return {H * c1, H, H, H * H, H, H, O * H, O, O};
  }
  // Per row: a1, h1, a2, h2 (hidden), o (outputs).
  struct Row { Vec a1, h1, a2, h2, o; };
  Row subnet(const double* x1, const std::vector<Vec>& p) const {
    const int64_t O = outputs();
    Row r{Vec(H), Vec(H), Vec(H), Vec(H), Vec(O)};
    for (int64_t h = 0; h < H; ++h) {
      double s = 0;
      for (int64_t k = 0; k < c1; ++k) s += p[0][h * c1 + k] * x1[k];
      r.a1[h] = (s + p[1][h]) * std::exp(f * p[2][h]);
      r.h1[h] = std::max(r.a1[h], 0.0);
    }
    for (int64_t h = 0; h < H; ++h) {
      double s = 0;
      for (int64_t k = 0; k < H; ++k) s += p[3][h * H + k] * r.h1[k];
      r.a2[h] = (s + p[4][h]) * std::exp(f * p[5][h]);
      r.h2[h] = std::max(r.a2[h], 0.0);
    }
    for (int64_t i = 0; i < O; ++i) {
      double s = 0;
      for (int64_t k = 0; k < H; ++k) s += p[6][i * H + k] * r.h2[k];
      r.o[i] = (s + p[7][i]) * std::exp(f * p[8][i]);
    }
    return r;
  }
  // out2 and log_det (forward), or x2 from z2 (inverse).
  void run(bool inverse, const Vec& x1, const Vec& in2, const std::vector<Vec>& p, Vec& out2, Vec& log_det) const {
    out2.assign(B * c2, 0);
    log_det.assign(B, 0);
    for (int64_t b = 0; b < B; ++b) {
      const Row r = subnet(&x1[b * c1], p);
      for (int64_t j = 0; j < c2; ++j) {
        const double v = in2[b * c2 + j];
        if (!affine) {
          out2[b * c2 + j] = inverse ? v - r.o[j] : v + r.o[j];
          continue;
        }
        const double s = sigmoid_d(r.o[2 * j + 1] + 2), shift = r.o[2 * j];
        out2[b * c2 + j] = inverse ? v / s - shift : (v + shift) * s;
        log_det[b] += std::log(s);
      }
    }
  }
  // Gradients of sum dout out2 (+ sum dlog_det log_det forward): dx1, din2, then the parameters.
  std::vector<Vec> backward(bool inverse, const Vec& dout, const Vec& dld, const Vec& x1, const Vec& in2,
                            const std::vector<Vec>& p) const {
    const int64_t O = outputs();
    std::vector<Vec> g{Vec(B * c1, 0), Vec(B * c2, 0)};
    for (int64_t size : sizes()) g.push_back(Vec(size, 0));
    Vec& dx1 = g[0];
    Vec& din2 = g[1];
    for (int64_t b = 0; b < B; ++b) {
      const Row r = subnet(&x1[b * c1], p);
      Vec d_o(O, 0);
      for (int64_t j = 0; j < c2; ++j) {
        const double d = dout[b * c2 + j], v = in2[b * c2 + j];
        if (!affine) {
          din2[b * c2 + j] = d;
          d_o[j] = inverse ? -d : d;
          continue;
        }
        const double s = sigmoid_d(r.o[2 * j + 1] + 2), shift = r.o[2 * j];
        if (inverse) {  // x2 = z2 / s - shift; d(1/s)/d raw = -(1 - s) / s
          din2[b * c2 + j] = d / s;
          d_o[2 * j] = -d;
          d_o[2 * j + 1] = -d * v * (1 - s) / s;
        } else {
          din2[b * c2 + j] = d * s;
          d_o[2 * j] = d * s;
          d_o[2 * j + 1] = d * (v + shift) * s * (1 - s) + dld[b] * (1 - s);
        }
      }
      // o = (h2 W3^T + b3) s3
      Vec dh2(H, 0);
      for (int64_t i = 0; i < O; ++i) {
        const double s3 = std::exp(f * p[8][i]), dpre = d_o[i] * s3;
        g[10][i] += f * d_o[i] * r.o[i];
        g[9][i] += dpre;
        for (int64_t k = 0; k < H; ++k) {
          g[8][i * H + k] += dpre * r.h2[k];
          dh2[k] += dpre * p[6][i * H + k];
        }
      }
      // a2 = (h1 W2^T + b2) s2, h2 = relu(a2)
      Vec dh1(H, 0);
      for (int64_t h = 0; h < H; ++h) {
        const double da = r.a2[h] > 0 ? dh2[h] : 0, s2 = std::exp(f * p[5][h]), dpre = da * s2;
        g[7][h] += f * da * r.a2[h];
        g[6][h] += dpre;
        for (int64_t k = 0; k < H; ++k) {
          g[5][h * H + k] += dpre * r.h1[k];
          dh1[k] += dpre * p[3][h * H + k];
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const double da = r.a1[h] > 0 ? dh1[h] : 0, s1 = std::exp(f * p[2][h]), dpre = da * s1;
        g[4][h] += f * da * r.a1[h];
        g[3][h] += dpre;
        for (int64_t k = 0; k < c1; ++k) {
          g[2][h * c1 + k] += dpre * x1[b * c1 + k];
          dx1[b * c1 + k] += dpre * p[0][h * c1 + k];
        }
      }
    }
    return g;
  }
};

template <typename T>
void test_mlp_coupling(int64_t B, int64_t c1, int64_t c2, int64_t H, bool affine) {
  using A = acc_t<T>;
  const std::string name = std::string("mlp_coupling ") + (affine ? "affine " : "additive ") + Name<T>::value +
                           " B=" + std::to_string(B) + " c1=" + std::to_string(c1) + " c2=" + std::to_string(c2) +
                           " H=" + std::to_string(H);
  const DType dt = Name<T>::dtype;
  const MlpRef ref{B, c1, c2, H, affine, 3.0};
  const MlpShape shape{B, c1, c2, H, affine, ref.f};
  std::vector<Stored<A>> params;
  const std::vector<int64_t> sizes = ref.sizes();
  const double fan_in[9] = {double(c1), 1, 1, double(H), 1, 1, double(H), 1, 1};
  for (int i = 0; i < 9; ++i)
    params.emplace_back(i % 3 == 0 ? randn(sizes[i], 1 / std::sqrt(fan_in[i]))
                                   : i % 3 == 1 ? randn(sizes[i], 0.3) : randn(sizes[i], 0.1));
  std::vector<Vec> p;
  for (const auto& q : params) p.push_back(q.values);
  const MlpParams w{params[0].data.data(), params[1].data.data(), params[2].data.data(),
                     params[3].data.data(), params[4].data.data(), params[5].data.data(),
                     params[6].data.data(), params[7].data.data(), params[8].data.data()};
  Stored<T> x1(randn(B * c1)), in2(randn(B * c2)), dout(randn(B * c2));
  Stored<A> dld(randn(B));
  for (const bool inverse : {false, true}) {
    const std::string what = name + (inverse ? " inverse" : " forward");
    const auto run = [&](const cpu::ParallelFor& par) {
      Stored<T> out2(B * c2), dx1(B * c1), din2(B * c2);
      Stored<A> log_det(B);
      std::vector<Stored<A>> g;
      for (int64_t size : sizes) g.emplace_back(size);
      const MlpParamGrads grads{g[0].data.data(), g[1].data.data(), g[2].data.data(), g[3].data.data(), g[4].data.data(),
                           g[5].data.data(), g[6].data.data(), g[7].data.data(), g[8].data.data()};
      if (inverse)
        cpu::mlp_coupling_inv(x1.data.data(), in2.data.data(), dt, w, shape, out2.data.data(), par);
      else
        cpu::mlp_coupling_fwd(x1.data.data(), in2.data.data(), dt, w, shape, out2.data.data(), log_det.data.data(),
                              par);
      cpu::mlp_coupling_bwd(inverse ? Direction::inverse : Direction::forward, dout.data.data(),
                            inverse ? nullptr : dld.data.data(), x1.data.data(), in2.data.data(), dt, w, shape,
                            dx1.data.data(), din2.data.data(), grads, par);
      std::vector<Vec> out{out2.read(), log_det.read(), dx1.read(), din2.read()};
      for (const auto& q : g) out.push_back(q.read());
      return out;
    };
    const std::vector<Vec> got = run(serial());
    Vec out2, log_det;
    ref.run(inverse, x1.values, in2.values, p, out2, log_det);
    const std::vector<Vec> want = ref.backward(inverse, dout.values, dld.values, x1.values, in2.values, p);
    expect_close(got[0], out2, tol_of<T>(), what + " out2");
    if (!inverse) expect_close(got[1], log_det, acc_tol<T>(), what + " log_det", c2);
    // dx1 sums over H and the outputs; parameter gradients over the batch.
    expect_close(got[2], want[0], tol_of<T>(), what + " bwd dx1", H);
    expect_close(got[3], want[1], tol_of<T>(), what + " bwd din2");
    const char* names[9] = {"dw1", "db1", "dl1", "dw2", "db2", "dl2", "dw3", "db3", "dl3"};
    for (int i = 0; i < 9; ++i) expect_close(got[4 + i], want[2 + i], acc_tol<T>(), what + " bwd " + names[i], B * H);
    for (const auto& par : kSplits) expect_same(run(par), got, what);
    if (!std::is_same<T, double>::value) continue;
    std::vector<Vec> v{randn(B * c1), randn(B * c2)};
    for (int64_t size : sizes) v.push_back(randn(size));
    const auto loss = [&](double t) {
      std::vector<Vec> pt;
      for (int i = 0; i < 9; ++i) pt.push_back(axpy(p[i], t, v[2 + i]));
      Vec o, ld;
      ref.run(inverse, axpy(x1.values, t, v[0]), axpy(in2.values, t, v[1]), pt, o, ld);
      return dot(dout.values, o) + (inverse ? 0.0 : dot(dld.values, ld));
    };
    double analytic = 0;
    for (int i = 0; i < 11; ++i) analytic += dot(got[2 + i], v[i]);
    expect_directional(loss, analytic, what + " bwd");
  }
}

void test_errors() {
  const auto par = serial();
  float x[4] = {}, y[4] = {}, ld[1] = {}, p[2] = {};
  expect_throws([&] { cpu::channelwise<ops::ActnormFwd>(DType(7), {1, 2, 2, {x}, {}, {p, p}, {3.0}, {y}, {ld}, {}}, par); },
                "actnorm_fwd rejects dtype 7");
  expect_throws([&] { cpu::coupling_epilogue_fwd(x, DType::f32, x, DType(9), 1, 2, 1, false, y, ld, par); },
                "coupling_epilogue_fwd rejects h dtype 9");
  int64_t perm[2] = {0, 1};
  expect_throws([&] { cpu::lu_weight_fwd(perm, x, x, p, p, DType::bf16, 2, y, ld, par); },
                "lu_weight_fwd rejects bf16 parameters");
  const MlpParams w{x, x, x, x, x, x, x, x, x};
  const MlpParamGrads g{y, y, y, y, y, y, y, y, y};
  for (const int64_t hidden : {kMaxFusedHidden + 1, int64_t(0)}) {
    const MlpShape shape{1, 1, 1, hidden, false, 3.0};
    const std::string h = " rejects hidden " + std::to_string(hidden);
    expect_throws([&] { cpu::mlp_coupling_fwd(x, x, DType::f32, w, shape, y, ld, par); }, "mlp_coupling_fwd" + h);
    expect_throws([&] { cpu::mlp_coupling_inv(x, x, DType::f32, w, shape, y, par); }, "mlp_coupling_inv" + h);
    expect_throws([&] { cpu::mlp_coupling_bwd(Direction::forward, x, ld, x, x, DType::f32, w, shape, y, y, g, par); },
                  "mlp_coupling_bwd" + h);
  }
}

// An empty batch still writes the parameter gradients (zeros, plus ActNorm's log-det term of no samples).
void test_empty_batch() {
  const auto par = serial();
  float bias[3] = {1, 2, 3}, logs[3] = {0.1f, 0.2f, 0.3f}, dbias[3] = {7, 7, 7}, dlogs[3] = {7, 7, 7};
  cpu::channelwise<ops::ActnormBwd>(DType::f32, {0, 3, 5, {}, {}, {bias, logs}, {3.0}, {}, {}, {dbias, dlogs}}, par);
  check(Vec(dbias, dbias + 3) == Vec(3, 0.0) && Vec(dlogs, dlogs + 3) == Vec(3, 0.0), "actnorm_bwd empty batch");
  const int64_t c1 = 3, c2 = 2, H = 5, O = 2 * c2;
  const std::vector<int64_t> sizes{H * c1, H, H, H * H, H, H, O * H, O, O};
  std::vector<std::vector<float>> p, g;
  for (int64_t size : sizes) {
    p.emplace_back(size, 0.5f);
    g.emplace_back(size, 7.0f);
  }
  const MlpParams w{p[0].data(), p[1].data(), p[2].data(), p[3].data(), p[4].data(),
                     p[5].data(), p[6].data(), p[7].data(), p[8].data()};
  const MlpParamGrads grads{g[0].data(), g[1].data(), g[2].data(), g[3].data(), g[4].data(),
                       g[5].data(), g[6].data(), g[7].data(), g[8].data()};
  cpu::mlp_coupling_bwd(Direction::forward, nullptr, nullptr, nullptr, nullptr, DType::f32, w,
                        MlpShape{0, c1, c2, H, true, 3.0}, nullptr, nullptr, grads, par);
  bool zeros = true;
  for (const auto& q : g) zeros = zeros && std::all_of(q.begin(), q.end(), [](float v) { return v == 0; });
  check(zeros, "mlp_coupling_bwd empty batch");
}

}  // namespace

int main() {
  for (const auto& s : {std::vector<int64_t>{5, 3, 7}, {37, 11, 1}, {3, 5, 13}, {2, 70, 300}}) {
    test_actnorm<double>(s[0], s[1], s[2]);
    test_actnorm<float>(s[0], s[1], s[2]);
    test_actnorm<BFloat16>(s[0], s[1], s[2]);
    test_actnorm<Half>(s[0], s[1], s[2]);
  }
  for (const bool affine : {false, true})
    for (const auto& s : {std::vector<int64_t>{5, 3, 7}, {9, 11, 1}}) {
      test_coupling_epilogue<double, double>(s[0], s[1], s[2], affine);
      test_coupling_epilogue<float, float>(s[0], s[1], s[2], affine);
      test_coupling_epilogue<BFloat16, float>(s[0], s[1], s[2], affine);
      test_coupling_epilogue<float, BFloat16>(s[0], s[1], s[2], affine);
      test_coupling_epilogue<Half, Half>(s[0], s[1], s[2], affine);
    }
  for (const auto& s : {std::vector<int64_t>{5, 37}, {3, 8}, {4, 1}}) {
    test_prior<double>(s[0], s[1]);
    test_prior<float>(s[0], s[1]);
    test_prior<BFloat16>(s[0], s[1]);
  }
  for (const int64_t C : {1, 5, 37, 70}) {
    test_lu_weight<double>(C);
    test_lu_weight<float>(C);
  }
  for (const bool affine : {false, true})
    for (const auto& s : {std::vector<int64_t>{37, 19, 11, 13}, {5, 3, 8, 64}, {50, 40, 17, 33}}) {
      test_mlp_coupling<double>(s[0], s[1], s[2], s[3], affine);
      test_mlp_coupling<float>(s[0], s[1], s[2], s[3], affine);
      test_mlp_coupling<BFloat16>(s[0], s[1], s[2], s[3], affine);
    }
  test_errors();
  test_empty_batch();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
