// The CPU engine of the channelwise ops (common/channelwise.cuh; the ops in ops/registry.h).
//
// Three passes, by what the op returns:
//   - data only: one elementwise pass over flat chunks of the [B, C P] data;
//   - row sums: a task per row, the row's terms in kLanes fixed partial sums;
//   - channel sums: rows split into fixed groups (from the batch size only); each (group, channel block) task owns
//     its slice of that group's partial sums, and the groups are added in order at the end.
// Each channel's values (Op::Channel) are made once per call. Within a row, runs of one channel (P > 1) or the
// channels themselves (P == 1) go in blocks of kLanes so the compiler vectorizes the op's arithmetic. Every sum has
// an order fixed by the sizes: the same result for any thread count.
#include <vector>

#include "cpu/dispatch.h"
#include "ops/registry.h"

namespace flowkern::cpu {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;
constexpr int64_t kRowsPerGroup = 8;   // granule of the channel sums' row groups
constexpr int64_t kMaxGroups = 64;     // at most this many partial-sum rows

template <class Op, typename T>
struct Engine {
  using A = acc_t<T>;
  using Ch = typename Op::template Channel<A>;
  using R = Roles<Op>;
  static constexpr int kIn = R::inputs, kRows = R::rows, kOut = Op::kOutputs;

  const ChannelwiseArgs& args;
  int64_t batch, channels, pixels, columns;
  const T* in[slots(kIn)] = {};
  T* out[slots(kOut)] = {};
  const A* params[slots(R::params)] = {};
  std::vector<Ch> per_channel;

  explicit Engine(const ChannelwiseArgs& a)
      : args(a), batch(a.batch), channels(a.channels), pixels(a.pixels), columns(a.channels * a.pixels) {
    for (int k = 0; k < kIn; ++k) in[k] = static_cast<const T*>(a.inputs[k]);
    for (int k = 0; k < kOut; ++k) out[k] = static_cast<T*>(a.outputs[k]);
    for (int k = 0; k < R::params; ++k) params[k] = static_cast<const A*>(a.params[k]);
    per_channel.resize(channels);
    for (int64_t c = 0; c < channels; ++c) per_channel[c] = Op::template channel<A>(params, c, a.scalars);
  }

  // Element n of `row`: loads, the op, stores; the op's row / channel terms go to `terms`.
  template <int kTerms>
  __attribute__((always_inline)) inline void element(int64_t row, int64_t n, const Ch& ch, const A* row_values, A (&terms)[slots(kTerms)]) const {
    A x[slots(kIn)], y[slots(kOut)], unused[1];
    const int64_t i = row * columns + n;
    for (int k = 0; k < kIn; ++k) x[k] = load_as<A>(in[k][i]);
    if constexpr (Op::kRowSums > 0) Op::element(x, ch, row_values, y, terms, unused);
    else Op::element(x, ch, row_values, y, unused, terms);
    for (int k = 0; k < kOut; ++k) out[k][i] = store_as<T>(y[k]);
  }

  void row_values(int64_t row, A (&values)[slots(kRows)]) const {
    for (int k = 0; k < kRows; ++k) values[k] = static_cast<const A*>(args.rows[k])[row];
  }

  // fn(n, lane) for n in [begin, end): whole blocks of kLanes, then the tail. The op's elements are independent
  // (outputs never alias inputs): ivdep lets the compiler vectorize without runtime alias checks between the
  // op's many pointers, which it would otherwise give up on.
  template <typename Fn>
  static inline void lanes(int64_t begin, int64_t end, Fn&& fn) {
    int64_t n = begin;
    for (; n + kLanes <= end; n += kLanes)
#pragma GCC ivdep
      for (int j = 0; j < kLanes; ++j) fn(n + j, j);
    for (int j = 0; n + j < end; ++j) fn(n + j, j);
  }

  void map(const ParallelFor& par) const {
    par(batch * columns, kElementsPerTask, [&](int64_t flat_begin, int64_t flat_end) {
      for_row_segments(flat_begin, flat_end, columns, [&](int64_t row, int64_t begin, int64_t end) {
        A values[slots(kRows)], no_terms[1];
        row_values(row, values);
        if (pixels == 1) {   // columns are channels: vectorize along them
#pragma GCC ivdep
          for (int64_t n = begin; n < end; ++n) element<0>(row, n, per_channel[n], values, no_terms);
          return;
        }
        for_channel_runs(begin, end, pixels, [&](int64_t c, int64_t run_begin, int64_t run_end) {
          const Ch ch = per_channel[c];
#pragma GCC ivdep
          for (int64_t n = run_begin; n < run_end; ++n) element<0>(row, n, ch, values, no_terms);
        });
      });
    });
  }

  // Row r's sums over columns [begin, end) of one channel's values (ch) or, with ch null, each column's own
  // channel (P == 1), in kLanes partial sums.
  template <bool kPerColumn>
  void row_sum_run(int64_t row, int64_t begin, int64_t end, const Ch* ch, const A* values,
                   A (&partial)[slots(Op::kRowSums)][kLanes]) const {
    constexpr int S = Op::kRowSums;
    A lane_sums[slots(S)][kLanes] = {};   // local, so they stay in registers
    int64_t n = begin;
    for (; n + kLanes <= end; n += kLanes)
#pragma GCC ivdep
      for (int j = 0; j < kLanes; ++j) {
        A terms[slots(S)];
        element<S>(row, n + j, kPerColumn ? per_channel[n + j] : *ch, values, terms);
        for (int k = 0; k < S; ++k) lane_sums[k][j] += terms[k];
      }
    for (int j = 0; n + j < end; ++j) {
      A terms[slots(S)];
      element<S>(row, n + j, kPerColumn ? per_channel[n + j] : *ch, values, terms);
      for (int k = 0; k < S; ++k) lane_sums[k][j] += terms[k];
    }
    for (int k = 0; k < S; ++k)
      for (int j = 0; j < kLanes; ++j) partial[k][j] += lane_sums[k][j];
  }

  void row_sums(const ParallelFor& par) const {
    constexpr int S = Op::kRowSums;
    par(batch, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, columns)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        A values[slots(kRows)];
        row_values(row, values);
        A partial[slots(S)][kLanes] = {};
        if (pixels == 1) {
          row_sum_run<true>(row, 0, columns, nullptr, values, partial);
        } else {
          for (int64_t c = 0; c < channels; ++c)
            row_sum_run<false>(row, c * pixels, (c + 1) * pixels, &per_channel[c], values, partial);
        }
        for (int k = 0; k < S; ++k)
          static_cast<A*>(args.row_sums[k])[row] = Op::finish_row(k, sum_lanes(partial[k]), columns);
      }
    });
  }

  void row_sums_from_channels() const {
    for (int k = 0; k < Op::kRowSums; ++k) {
      A sum = 0;
      for (int64_t c = 0; c < channels; ++c) sum += Op::row_term(k, params, c, args.scalars);
      A* out = static_cast<A*>(args.row_sums[k]);
      std::fill(out, out + batch, sum * A(pixels));
    }
  }

  void channel_sums(const ParallelFor& par) const {
    constexpr int S = Op::kChannelSums;
    const RowGroups groups = row_groups(batch, kRowsPerGroup, kMaxGroups);
    std::vector<A> partial(groups.count * S * channels, A(0));   // [group][sum][channel]
    // Channel blocks split a group's work across threads; a channel's sums never depend on the block it is in.
    const int64_t block =
        std::max<int64_t>(64, kElementsPerTask / std::max<int64_t>(1, groups.rows_per_group * pixels));
    const int64_t blocks = ceil_div(channels, block);
    par(groups.count * blocks, 1, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t g = task / blocks;
        const int64_t c0 = (task % blocks) * block, c1 = std::min(channels, c0 + block);
        A* sums = partial.data() + g * S * channels;
        for (int64_t row = groups.begin(g); row < groups.end(g); ++row) {
          A values[slots(kRows)];
          row_values(row, values);
          if (pixels == 1) {   // one term per channel and row: accumulate along the channels
#pragma GCC ivdep
            for (int64_t c = c0; c < c1; ++c) {
              A terms[slots(S)];
              element<S>(row, c, per_channel[c], values, terms);
              for (int k = 0; k < S; ++k) sums[k * channels + c] += terms[k];
            }
            continue;
          }
          for (int64_t c = c0; c < c1; ++c) {
            const Ch ch = per_channel[c];
            A lane_sums[S][kLanes] = {};
            lanes(c * pixels, (c + 1) * pixels, [&](int64_t n, int j) {
              A terms[slots(S)];
              element<S>(row, n, ch, values, terms);
              for (int k = 0; k < S; ++k) lane_sums[k][j] += terms[k];
            });
            for (int k = 0; k < S; ++k) sums[k * channels + c] += sum_lanes(lane_sums[k]);
          }
        }
      }
    });
    for (int k = 0; k < S; ++k) {   // groups in order
      A* out = static_cast<A*>(args.channel_sums[k]);
      std::fill(out, out + channels, A(0));
      for (int64_t g = 0; g < groups.count; ++g) {
        const A* sums = partial.data() + (g * S + k) * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] += sums[c];
      }
      for (int64_t c = 0; c < channels; ++c) out[c] = Op::finish_channel(k, out[c], args.scalars);
    }
  }
};

}  // namespace

template <class Op>
void channelwise(DType dtype, const ChannelwiseArgs& args, const ParallelFor& par) {
  dispatch_dtype(dtype, "channelwise", [&](auto t) {
    const Engine<Op, decltype(t)> engine(args);
    if constexpr (Op::kChannelSums > 0) {
      engine.channel_sums(par);
    } else if constexpr (Op::kRowSums > 0 && !Op::kRowSumsFromChannels) {
      engine.row_sums(par);
    } else {
      engine.map(par);
      if constexpr (Op::kRowSums > 0) engine.row_sums_from_channels();
    }
  });
}

#define FLOWKERN_INSTANTIATE(Op) template void channelwise<Op>(DType, const ChannelwiseArgs&, const ParallelFor&);
FLOWKERN_CHANNELWISE_OPS(FLOWKERN_INSTANTIATE)
#undef FLOWKERN_INSTANTIATE

}  // namespace flowkern::cpu
