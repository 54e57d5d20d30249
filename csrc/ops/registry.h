// Every channelwise op (common/channelwise.cuh). X(op struct): the CPU and CUDA engines instantiate each, the
// binding registers each as torch.ops.flowkern_C.<name> from its kSchema. A new op: its header and one line here.
#pragma once

#include "ops/actnorm.cuh"
#include "ops/prior.cuh"

#define FLOWKERN_CHANNELWISE_OPS(X) \
  X(flowkern::ops::ActnormFwd)      \
  X(flowkern::ops::ActnormInv)      \
  X(flowkern::ops::ActnormBwd)      \
  X(flowkern::ops::GaussianLogProbFwd) \
  X(flowkern::ops::GaussianLogProbBwd)
