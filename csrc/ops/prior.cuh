// N(0, I) prior on [B, ...] data: log_prob[b] = -0.5 sum_n (z^2 + log 2 pi), and dz = -z dlog_prob[b].
// A channelwise op (common/channelwise.cuh) over each row's N values as one channel.
#pragma once

#include "common/channelwise.cuh"

namespace flowkern::ops {

struct GaussianLogProbFwd : ChannelwiseOp {
  static constexpr const char* kSchema = "gaussian_log_prob_fwd(Tensor z) -> Tensor";
  static constexpr char kRoles[] = "d";
  static constexpr int kOutputs = 0, kRowSums = 1;
  static constexpr bool kFlat = true;
  template <typename A>
  FLOWKERN_HD static void element(const A* in, const Channel<A>&, const A*, A*, A* row_terms, A*) {
    row_terms[0] = in[0] * in[0];
  }
  template <typename A> FLOWKERN_HD static A finish_row(int, A sum_squares, int64_t n) {
    return A(-0.5) * sum_squares - A(n) * A(kHalfLog2Pi);
  }
};

struct GaussianLogProbBwd : ChannelwiseOp {
  static constexpr const char* kSchema = "gaussian_log_prob_bwd(Tensor grad_log_prob, Tensor z) -> Tensor";
  static constexpr char kRoles[] = "rd";
  static constexpr bool kFlat = true;
  template <typename A>
  FLOWKERN_HD static void element(const A* in, const Channel<A>&, const A* row, A* out, A*, A*) {
    out[0] = -in[0] * row[0];
  }
};

}  // namespace flowkern::ops
