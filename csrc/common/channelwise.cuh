// Channelwise ops: the per-element ops on B rows of C channels x P pixels (a [B, C] or [B, C, H, W] tensor, P = H W;
// or any [B, ...] tensor as one channel of N values), written once as a torch-free op struct (csrc/ops/<op>.cuh) and
// run by the CPU engine (cpu/channelwise.cpp), the CUDA engine (cuda/channelwise.cu) and bound by bindings.cpp,
// all from the list in ops/registry.h. An op struct holds:
//
//   (deriving from ChannelwiseOp, which gives the defaults)
//   kSchema   its torch schema; the argument names in error messages come from it
//   kRoles    one letter per schema argument: 'd' data tensor (the data's shape and dtype), 'r' row tensor ([B],
//             e.g. an upstream log-det gradient), 'p' channel parameter ([C]), 's' scalar (float)
//   kDtypeFrom  which data input gives the dtype the others are cast to; kFlat: any [B, ...] data as one channel
//   kOutputs, kRowSums, kChannelSums  what it returns, in this order: data tensors, [B] sums over each row's
//             elements (log-dets), [C] sums over each channel's elements of every row (parameter gradients, in
//             parameter k's dtype). An op has row sums or channel sums, not both.
//   Channel<A>            what an element needs of its channel, made once per channel:
//                         channel<A>(params, c, scalars) with params[k] the k-th parameter vector (acc-typed)
//   element<A>(in, ch, row, out, row_terms, channel_terms)   the math of one element, in the accumulate type A:
//                         reads in[] (data inputs) and row[] (row inputs), writes out[] and the terms the engines
//                         add into the row / channel sums
//   finish_row<A>(k, sum, n)  (ops with row sums) row sum k from the sum of its n terms
//   finish_channel<A>(k, sum, scalars)  (ops with channel sums) channel sum k from the sum of its terms
//   kRowSumsFromChannels  the row sums depend on the parameters only (an affine op's log-det): the op gives
//             row_term<A>(k, params, c, scalars), each element's term in channel c, and the engines sum it over
//             the channels once, times P, for every row; element() then writes no row terms and the op runs as a
//             plain elementwise pass
//
// The engines decide the memory access, the parallel split and the fixed summation order (results do not depend
// on the thread count or GPU); an op only states its arithmetic.
#pragma once

#include <cstdint>

#include "common/math.cuh"

namespace flowkern {

constexpr int kMaxChannelwiseTensors = 4;   // of each kind: data inputs, row inputs, parameters, outputs, sums
constexpr int kMaxChannelwiseScalars = 2;

// One call: pointers of the data (contiguous, storage type) and of the acc-typed vectors, in role order.
struct ChannelwiseArgs {
  int64_t batch, channels, pixels;
  const void* inputs[kMaxChannelwiseTensors];
  const void* rows[kMaxChannelwiseTensors];
  const void* params[kMaxChannelwiseTensors];
  double scalars[kMaxChannelwiseScalars];
  void* outputs[kMaxChannelwiseTensors];
  void* row_sums[kMaxChannelwiseTensors];
  void* channel_sums[kMaxChannelwiseTensors];
};

// Defaults of an op struct, which derives from this and declares what differs.
struct ChannelwiseOp {
  static constexpr int kDtypeFrom = 0, kOutputs = 1, kRowSums = 0, kChannelSums = 0;
  static constexpr bool kFlat = false, kRowSumsFromChannels = false;
  // An op without parameters needs nothing per channel.
  template <typename A> struct Channel {};
  template <typename A> FLOWKERN_HD static Channel<A> channel(const A* const*, int64_t, const double*) { return {}; }
  template <typename A> FLOWKERN_HD static A finish_row(int, A sum, int64_t) { return sum; }
  template <typename A> FLOWKERN_HD static A finish_channel(int, A sum, const double*) { return sum; }
};

// Array length for n values (C++ has no zero-length arrays).
FLOWKERN_HD constexpr int slots(int n) { return n > 0 ? n : 1; }

// Counts of each role in an op's kRoles.
FLOWKERN_HD constexpr int count_roles(const char* roles, char role) {
  return *roles == '\0' ? 0 : (*roles == role) + count_roles(roles + 1, role);
}

template <class Op>
struct Roles {
  static constexpr int inputs = count_roles(Op::kRoles, 'd'), rows = count_roles(Op::kRoles, 'r'),
                       params = count_roles(Op::kRoles, 'p'), scalars = count_roles(Op::kRoles, 's');
  static_assert(inputs >= 1 && inputs <= kMaxChannelwiseTensors && rows <= kMaxChannelwiseTensors &&
                    params <= kMaxChannelwiseTensors && scalars <= kMaxChannelwiseScalars,
                "too many arguments of one role");
  static_assert(Op::kOutputs <= kMaxChannelwiseTensors && Op::kRowSums <= kMaxChannelwiseTensors &&
                    Op::kChannelSums <= kMaxChannelwiseTensors && Op::kChannelSums <= params,
                "too many results of one kind (a channel sum takes its parameter's dtype)");
  static_assert(!(Op::kRowSums > 0 && Op::kChannelSums > 0), "row sums and channel sums in one op");
  static_assert(Op::kDtypeFrom < inputs, "kDtypeFrom names a data input");
};

}  // namespace flowkern
