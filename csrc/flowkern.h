// Launchers of the compiled kernels: torch-free declarations shared by csrc/cpu, csrc/cuda and csrc/bindings.cpp.
//
// One name per op across Python, Triton and C++: <op>_fwd, <op>_bwd, <op>_inv. The CPU launchers live in
// flowkern::cpu, the CUDA ones in flowkern::cuda, with the same arguments (CUDA adds the stream).
//
// Conventions (the binding checks them before calling; the kernels trust them):
//   - data pointers are contiguous, of `dtype` (fp16, bf16, fp32, fp64); outputs have the inputs' dtype;
//   - a [B, C] or [B, C, H, W] tensor is seen as B rows of N = C * P values, P = H * W (1 for [B, C]),
//     value n of a row belonging to channel n / P;
//   - "acc" pointers (parameters, log-dets, gradients of parameters, partial sums) are of the accumulate type:
//     fp64 when dtype is fp64, fp32 otherwise. Every kernel computes in it and rounds its outputs once;
//   - parameter gradients are reduced without atomics (fixed-order partial sums), so results are deterministic.
#pragma once

#include <cstdint>
#include <functional>

namespace flowkern {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

struct ChannelwiseArgs;   // common/channelwise.cuh

// The subnet of the fused MLP coupling (flowkern.ops.MlpParams, one Tensor[] argument the binding unpacks here once):
// all acc-typed, contiguous.
//   h1 = relu((x1 W1^T + b1) exp(f l1)), h2 = relu((h1 W2^T + b2) exp(f l2)), o = (h2 W3^T + b3) exp(f l3)
// W1 [hidden, c1], W2 [hidden, hidden], W3 [outputs, hidden] with outputs = c2 (additive) or 2 c2 (affine).
struct MlpParams {
  const void *w1, *b1, *l1, *w2, *b2, *l2, *w3, *b3, *l3;
};
// Their gradients, same shapes, acc-typed.
struct MlpParamGrads {
  void *w1, *b1, *l1, *w2, *b2, *l2, *w3, *b3, *l3;
};
struct MlpShape {
  int64_t batch, c1, c2, hidden;
  bool affine;
  double logscale_factor;
};
// Largest hidden width the fused MLP kernels take (a row's hidden activations stay in registers / on the stack).
constexpr int64_t kMaxFusedHidden = 64;

// Which direction of the MLP coupling a backward differentiates.
enum class Direction : int { forward = 0, inverse = 1 };

namespace cpu {

// Runs fn(begin, end) over [0, n) split in chunks on the caller's thread pool (the binding passes
// at::parallel_for; C++ tests pass a serial loop). Chunks never share outputs, so the split does not change results.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t n, int64_t grain, const RangeFn& fn)>;
// c[m, n] (row stride ldc) = a[m, k] (row stride lda) @ B + bias[n], B = b^T for b [n, k] (transpose_b) or b for
// b [k, n]; b, bias contiguous, bias may be null; all of the accumulate type `acc` (f32 / f64). The binding passes
// ATen's GEMM (MKL / oneDNN), the C++ tests a loop.
using Gemm = std::function<void(DType acc, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                                const void* b, bool transpose_b, const void* bias, void* c, int64_t ldc)>;

// ---- Coupling epilogue on x2 [B, C2, P] given the subnet output h (h dtype may differ from x2's) ----
// additive: z2 = x2 + h (h [B, C2, P]); affine: h [B, 2 C2, P], channel 2c the shift, 2c+1 the raw scale,
// z2 = (x2 + shift) sigmoid(raw + 2), log_det[b] = sum log sigmoid(raw + 2) (0 for additive).
void coupling_epilogue_fwd(const void* x2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* z2, void* log_det, const ParallelFor& par);
void coupling_epilogue_inv(const void* z2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* x2, const ParallelFor& par);
// Affine only (the additive backward is the identity): dx2 [B, C2, P] in dtype, dh [B, 2 C2, P] in h_dtype.
void coupling_epilogue_bwd(const void* dz2, const void* dlog_det, const void* x2, DType dtype, const void* h,
                           DType h_dtype, int64_t batch, int64_t channels, int64_t pixels, void* dx2, void* dh,
                           const ParallelFor& par);

// ---- The channelwise ops (ActNorm, the N(0, I) prior; common/channelwise.cuh, ops/registry.h) ----
template <class Op>
void channelwise(DType dtype, const ChannelwiseArgs& args, const ParallelFor& par);

// ---- LU weight of the 1x1 convolution: W = P L (U + diag(sign_s exp(log_s))), row i of P M = M[perm[i]] ----
// All [C, C] / [C] tensors of `dtype` (fp32 or fp64: parameters), perm int64. log_det = sum(log_s) (a scalar).
void lu_weight_fwd(const int64_t* perm, const void* lower, const void* upper, const void* sign_s, const void* log_s,
                   DType dtype, int64_t channels, void* weight, void* log_det, const ParallelFor& par);
// dlower = tril(dM U'^T, -1), dupper = triu(L^T dM, 1), dlog_s = diag(L^T dM) sign_s exp(log_s) + dlog_det,
// with dM[perm[i]] = dweight[i]; dlog_det a scalar.
void lu_weight_bwd(const void* dweight, const void* dlog_det, const int64_t* perm, const void* lower,
                   const void* upper, const void* sign_s, const void* log_s, DType dtype, int64_t channels,
                   void* dlower, void* dupper, void* dlog_s, const ParallelFor& par);

// ---- The BERT-flow coupling with its MLP subnet (x1 [B, c1], x2 [B, c2]; hidden <= kMaxFusedHidden) ----
void mlp_coupling_fwd(const void* x1, const void* x2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* z2, void* log_det, const ParallelFor& par);
void mlp_coupling_inv(const void* x1, const void* z2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* x2, const ParallelFor& par);
// forward: (dz2, dlog_det, x1, x2) -> dx1, dx2 (`other` = x2, `dother` = dx2);
// inverse: (dx2, -, x1, z2) -> dx1, dz2 (`other` = z2, `dother` = dz2; dlog_det is null).
void mlp_coupling_bwd(Direction direction, const void* dout, const void* dlog_det, const void* x1, const void* other,
                      DType dtype, const MlpParams& w, const MlpShape& shape, void* dx1, void* dother,
                      const MlpParamGrads& grads, const ParallelFor& par);

// ---- The whole [B, C] Glow (flowkern.ops.glow: GlowPlan's tables, packed parameters) ----
struct GlowPlanView {
  const int64_t* meta;     // [steps, 16] offsets into params / mix, C1, CL (flowkern/kernels/glow_meta.py)
  const int32_t* an_idx;   // [steps, channels]: ActNorm channel of each physical channel, -1 when factored out
  // [2 * steps, channels]: row s, the physical channels of step s in the kernel's local order (conditioning, then
  // transformed, each ascending); row steps + s, the coupling channel of each (GlowPlan.local_order).
  const int32_t* local_order;
  const int32_t* z_idx;    // [channels]: the column of z each physical channel ends in
  int64_t params_numel, mix_numel;   // sizes of the packed parameters and mixing values (meta's offsets index them)
  int64_t steps, channels, hidden;
  bool affine, lu;
  double logscale_factor;
};
// z, log_det, log_prior from x. When `mid` is not null, saves the backward's inputs (acc-typed):
// mid [steps + 1, B, C]: each step's coupling input, then the final state; inp [steps, B, C] (LU flows): each
// mixing GEMM's input. log_det excludes the LU flows' constant (added by the caller).
void glow_fwd(const void* x, DType dtype, const void* params, const void* mix, const GlowPlanView& plan,
              int64_t batch, void* z, void* log_det, void* log_prior, void* mid, void* inp, const Gemm& gemm,
              const ParallelFor& par);
void glow_inv(const void* z, DType dtype, const void* params, const void* mix, const GlowPlanView& plan,
              int64_t batch, void* x, const Gemm& gemm, const ParallelFor& par);
// dx from dz, dlog_det, dlog_prior; dparams [plan.params_numel] summed in fixed order; LU flows: dmid [steps, B, C],
// the gradient at each mixing GEMM's output, which the caller turns into dW, db with one GEMM per step (with inp).
void glow_bwd(const void* dz, const void* dlog_det, const void* dlog_prior, DType dtype, const void* params,
              const void* mix, const void* mid, const GlowPlanView& plan, int64_t batch, void* dx,
              void* dparams, void* dmid, const Gemm& gemm, const ParallelFor& par);

}  // namespace cpu

namespace cuda {
// Same launchers as flowkern::cpu for CUDA pointers, enqueued on `stream` (a cudaStream_t). Parameter-gradient
// partials need scratch: `workspace` holds at least the bytes the matching *_workspace_bytes returns.
using Stream = void*;

// Channelwise ops: ops with channel sums need `workspace` of channelwise_workspace_bytes<Op> (0 for the others).
template <class Op>
int64_t channelwise_workspace_bytes(DType dtype, int64_t batch, int64_t channels, int64_t pixels);
template <class Op>
void channelwise(DType dtype, const ChannelwiseArgs& args, void* workspace, Stream stream);

void coupling_epilogue_fwd(const void* x2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* z2, void* log_det, Stream stream);
void coupling_epilogue_inv(const void* z2, DType dtype, const void* h, DType h_dtype, int64_t batch, int64_t channels,
                           int64_t pixels, bool affine, void* x2, Stream stream);
void coupling_epilogue_bwd(const void* dz2, const void* dlog_det, const void* x2, DType dtype, const void* h,
                           DType h_dtype, int64_t batch, int64_t channels, int64_t pixels, void* dx2, void* dh,
                           Stream stream);

void lu_weight_fwd(const int64_t* perm, const void* lower, const void* upper, const void* sign_s, const void* log_s,
                   DType dtype, int64_t channels, void* weight, void* log_det, Stream stream);
void lu_weight_bwd(const void* dweight, const void* dlog_det, const int64_t* perm, const void* lower,
                   const void* upper, const void* sign_s, const void* log_s, DType dtype, int64_t channels,
                   void* dlower, void* dupper, void* dlog_s, Stream stream);

void mlp_coupling_fwd(const void* x1, const void* x2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* z2, void* log_det, Stream stream);
void mlp_coupling_inv(const void* x1, const void* z2, DType dtype, const MlpParams& w, const MlpShape& shape,
                      void* x2, Stream stream);
int64_t mlp_coupling_bwd_workspace_bytes(DType dtype, const MlpShape& shape);
void mlp_coupling_bwd(Direction direction, const void* dout, const void* dlog_det, const void* x1, const void* other,
                      DType dtype, const MlpParams& w, const MlpShape& shape, void* dx1, void* dother,
                      const MlpParamGrads& grads, void* workspace, Stream stream);
}  // namespace cuda

}  // namespace flowkern
