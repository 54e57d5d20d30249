// ActNorm: y = (x + bias) s per channel with s = exp(f logs); log_det[b] = f sum(logs) P; its inverse and backward.
// A channelwise op (common/channelwise.cuh): the arithmetic only.
#pragma once

#include "common/channelwise.cuh"

namespace flowkern::ops {

struct ActnormFwd : ChannelwiseOp {
  static constexpr const char* kSchema =
      "actnorm_fwd(Tensor x, Tensor bias, Tensor logs, float logscale_factor) -> (Tensor, Tensor)";
  static constexpr char kRoles[] = "dpps";
  static constexpr int kRowSums = 1;
  static constexpr bool kRowSumsFromChannels = true;   // log_det: the same for every row
  template <typename A> struct Channel { A bias, scale; };
  template <typename A>
  FLOWKERN_HD static Channel<A> channel(const A* const* params, int64_t c, const double* scalars) {
    return {params[0][c], exp_(A(scalars[0]) * params[1][c])};
  }
  template <typename A>
  FLOWKERN_HD static void element(const A* in, const Channel<A>& ch, const A*, A* out, A*, A*) {
    out[0] = (in[0] + ch.bias) * ch.scale;
  }
  // Each element's log-det term: f logs[c], summed over the row's C P elements.
  template <typename A>
  FLOWKERN_HD static A row_term(int, const A* const* params, int64_t c, const double* scalars) {
    return A(scalars[0]) * params[1][c];
  }
};

struct ActnormInv : ChannelwiseOp {
  static constexpr const char* kSchema =
      "actnorm_inv(Tensor y, Tensor bias, Tensor logs, float logscale_factor) -> Tensor";
  static constexpr char kRoles[] = "dpps";
  template <typename A> struct Channel { A bias, inv_scale; };
  template <typename A>
  FLOWKERN_HD static Channel<A> channel(const A* const* params, int64_t c, const double* scalars) {
    return {params[0][c], exp_(-A(scalars[0]) * params[1][c])};
  }
  template <typename A>
  FLOWKERN_HD static void element(const A* in, const Channel<A>& ch, const A*, A* out, A*, A*) {
    out[0] = in[0] * ch.inv_scale - ch.bias;
  }
};

// From the forward's input x (y is recomputed, not stored): dx = dy s, dbias = sum dy s,
// dlogs = f sum (dy s (x + bias) + dlog_det[b]) over rows and pixels (f applied once, to the sum).
struct ActnormBwd : ChannelwiseOp {
  static constexpr const char* kSchema =
      "actnorm_bwd(Tensor grad_y, Tensor grad_log_det, Tensor x, Tensor bias, Tensor logs, float logscale_factor) "
      "-> (Tensor, Tensor, Tensor)";
  static constexpr char kRoles[] = "drdpps";
  static constexpr int kDtypeFrom = 1, kChannelSums = 2;
  template <typename A> using Channel = ActnormFwd::Channel<A>;   // bias and s = exp(f logs), as the forward
  template <typename A>
  FLOWKERN_HD static Channel<A> channel(const A* const* params, int64_t c, const double* scalars) {
    return ActnormFwd::channel<A>(params, c, scalars);
  }
  template <typename A>
  FLOWKERN_HD static void element(const A* in, const Channel<A>& ch, const A* row, A* out, A*, A* channel_terms) {
    const A dy_scaled = in[0] * ch.scale;
    out[0] = dy_scaled;
    channel_terms[0] = dy_scaled;
    channel_terms[1] = dy_scaled * (in[1] + ch.bias) + row[0];
  }
  template <typename A> FLOWKERN_HD static A finish_channel(int k, A sum, const double* scalars) {
    return k == 1 ? A(scalars[0]) * sum : sum;
  }
};

}  // namespace flowkern::ops
