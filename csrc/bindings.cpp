// flowkern._C: registers the compiled kernels as torch ops `flowkern_C::<op>` (CPU and, when built with CUDA,
// CUDA implementations of one schema), checks tensors and calls the torch-free launchers of csrc/flowkern.h.
//
// The autograd-visible ops stay `flowkern::<op>` (flowkern/ops/*.py): their `impl` argument picks the backend, and
// for "cpp" / "cuda" they call these ops through flowkern/kernels/compiled.py, which also registers the fake
// (meta) kernels so torch.compile can trace them. The 1x1 convolution's product goes through ATen (MKL / cuBLAS):
// a hand-written GEMM would not beat it, so only the cheap parts around it are fused here (ActNorm folded into W).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <numeric>
#include <string>
#include <vector>

#include "flowkern.h"
#include "common/channelwise.cuh"
#include "ops/registry.h"

#ifdef FLOWKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using at::Tensor;
using flowkern::DType;

const flowkern::cpu::ParallelFor kParallelFor = [](int64_t n, int64_t grain, const flowkern::cpu::RangeFn& fn) {
  at::parallel_for(0, n, grain, fn);
};

// The LU Glow's mixing GEMM (flowkern::cpu::Gemm) through ATen: MKL / oneDNN on CPU.
const flowkern::cpu::Gemm kGemm = [](DType acc, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                                     const void* b, bool transpose_b, const void* bias, void* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(acc == DType::f64 ? at::kDouble : at::kFloat);
  const Tensor a_t = at::from_blob(const_cast<void*>(a), {m, k}, {lda, 1}, options);
  const Tensor b_t = transpose_b ? at::from_blob(const_cast<void*>(b), {n, k}, options).t()
                                 : at::from_blob(const_cast<void*>(b), {k, n}, options);
  Tensor c_t = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (bias) {
    at::addmm_out(c_t, at::from_blob(const_cast<void*>(bias), {n}, options), a_t, b_t);
  } else {
    at::mm_out(c_t, a_t, b_t);
  }
};

DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

// Kernels compute (and keep log-dets and parameter gradients) in fp64 for fp64 data, else in fp32.
at::ScalarType acc_type(const Tensor& data) {
  return data.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_device(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the data is on ",
                    like.device());
}

void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// A [B, C] or [B, C, H, W] data tensor: (B, C, P).
std::tuple<int64_t, int64_t, int64_t> rows_of(const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 4, op, ": ", name, " must be [B, C] or [B, C, H, W], got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": ", name, " has an empty batch");
  const int64_t pixels = x.dim() == 4 ? x.size(2) * x.size(3) : 1;
  return {x.size(0), x.size(1), pixels};
}

// A parameter vector / matrix as a contiguous acc-typed tensor on the data's device.
Tensor param(const Tensor& p, const Tensor& data, at::IntArrayRef shape, const char* op, const char* name) {
  check_device(p, data, op, name);
  check_shape(p, shape, op, name);
  TORCH_CHECK_VALUE(p.is_floating_point(), op, ": ", name, " must be floating point, got ", p.scalar_type());
  return p.to(acc_type(data)).contiguous();
}

// Contiguous output in the data's dtype (rows of C * P values, channels first within a row).
Tensor new_like_rows(const Tensor& x) { return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)); }

// The MLP coupling's ops promise empty_like(input) outputs (the Triton kernels write through strides): the
// kernels here write contiguous rows, copied into the input's layout only when that differs.
Tensor in_layout_of(const Tensor& out, const Tensor& like) {
  const bool same = like.is_contiguous() || !like.is_non_overlapping_and_dense();  // empty_like: contiguous
  return same ? out : at::empty_like(like).copy_(out);
}

Tensor acc_vector(const Tensor& data, int64_t n) { return at::empty({n}, data.options().dtype(acc_type(data))); }

#ifdef FLOWKERN_WITH_CUDA
void* stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

#ifdef FLOWKERN_WITH_CUDA
constexpr bool kHasCuda = true;
#else
constexpr bool kHasCuda = false;
#endif

// Whether the op runs its CUDA launcher; the binding checks every other tensor against the data's device.
bool on_cuda(const Tensor& t, const char* op) {
  if (t.is_cpu()) return false;
  TORCH_CHECK_VALUE(kHasCuda && t.is_cuda(), op, ": tensors on ", t.device(),
                    " are not supported by this build of flowkern._C (", kHasCuda ? "CPU and CUDA" : "CPU only", ")");
  return true;
}

// dlog_det [B] as a contiguous acc-typed tensor (autograd may hand an expanded scalar).
Tensor per_row(const Tensor& g, const Tensor& data, int64_t batch, const char* op, const char* name) {
  check_device(g, data, op, name);
  check_shape(g, {batch}, op, name);
  return g.to(acc_type(data)).contiguous();
}

// ---------------------------------------------------------------------------------------------------------------
// Channelwise ops (ops/registry.h): one binding for all of them, from each op's kSchema and kRoles.

std::string schema_name(const char* schema) {
  const std::string text(schema);
  return text.substr(0, text.find('('));
}

// The argument names of "name(Type a, Type b) -> ...", in order.
std::vector<std::string> schema_args(const char* schema) {
  const std::string text(schema);
  const size_t open = text.find('('), close = text.find(')');
  std::vector<std::string> names;
  size_t begin = open + 1;
  while (begin < close) {
    size_t end = std::min(text.find(',', begin), close);
    const std::string arg = text.substr(begin, end - begin);
    names.push_back(arg.substr(arg.rfind(' ') + 1));
    begin = end + 1;
  }
  return names;
}

template <class Op>
class Channelwise {
 public:
  // One argument, in schema order (its role from Op::kRoles).
  void add(const Tensor& t, int position) {
    const char role = Op::kRoles[position];
    auto& group = role == 'd' ? data_ : role == 'r' ? rows_ : params_;
    group.push_back({t, names_[position].c_str()});
  }
  void add(double value, int /*position*/) { scalars_.push_back(value); }

  std::vector<Tensor> run() const {
    const char* op = op_.c_str();
    const Tensor& like = data_[Op::kDtypeFrom].tensor;
    const char* like_name = data_[Op::kDtypeFrom].name;
    int64_t batch, channels, pixels;
    if constexpr (Op::kFlat) {
      TORCH_CHECK_VALUE(like.dim() >= 1 && like.size(0) > 0, op, ": ", like_name, " must be [B, ...] with B > 0, got ",
                        like.sizes());
      batch = like.size(0), channels = 1, pixels = like.numel() / batch;
    } else {
      std::tie(batch, channels, pixels) = rows_of(like, op, like_name);
    }
    const DType dtype = dtype_of(like, op, like_name);
    flowkern::ChannelwiseArgs args{batch, channels, pixels, {}, {}, {}, {}, {}, {}, {}};
    std::vector<Tensor> keep, results;   // the inputs as the kernels read them; what the op returns
    for (size_t k = 0; k < data_.size(); ++k) {
      const auto& [t, name] = data_[k];
      check_device(t, like, op, name);
      check_shape(t, like.sizes(), op, name);
      dtype_of(t, op, name);   // a supported dtype, else a ValueError naming it
      keep.push_back(t.to(like.scalar_type()).contiguous());
      args.inputs[k] = keep.back().data_ptr();
    }
    for (size_t k = 0; k < rows_.size(); ++k) {
      keep.push_back(per_row(rows_[k].tensor, like, batch, op, rows_[k].name));
      args.rows[k] = keep.back().data_ptr();
    }
    for (size_t k = 0; k < params_.size(); ++k) {
      keep.push_back(param(params_[k].tensor, like, {channels}, op, params_[k].name));
      args.params[k] = keep.back().data_ptr();
    }
    for (size_t k = 0; k < scalars_.size(); ++k) args.scalars[k] = scalars_[k];
    for (int k = 0; k < Op::kOutputs; ++k) {
      results.push_back(new_like_rows(like));
      args.outputs[k] = results.back().data_ptr();
    }
    for (int k = 0; k < Op::kRowSums; ++k) {
      results.push_back(acc_vector(like, batch));
      args.row_sums[k] = results.back().data_ptr();
    }
    for (int k = 0; k < Op::kChannelSums; ++k) {
      results.push_back(acc_vector(like, channels));
      args.channel_sums[k] = results.back().data_ptr();
    }
    if (on_cuda(like, op)) {
#ifdef FLOWKERN_WITH_CUDA
      const c10::cuda::CUDAGuard guard(like.device());
      const Tensor workspace = at::empty(
          {flowkern::cuda::channelwise_workspace_bytes<Op>(dtype, batch, channels, pixels)},
          like.options().dtype(at::kByte));
      flowkern::cuda::channelwise<Op>(dtype, args, workspace.data_ptr(), stream_of(like));
#endif
    } else {
      flowkern::cpu::channelwise<Op>(dtype, args, kParallelFor);
    }
    // A parameter's gradient (channel sum k) in that parameter's dtype.
    for (int k = 0; k < Op::kChannelSums; ++k) {
      Tensor& sum = results[Op::kOutputs + Op::kRowSums + k];
      sum = sum.to(params_[k].tensor.scalar_type());
    }
    return results;
  }

 private:
  struct Named {
    Tensor tensor;
    const char* name;   // in names_, which lives as long as the program
  };
  inline static const std::string op_ = schema_name(Op::kSchema);
  inline static const std::vector<std::string> names_ = schema_args(Op::kSchema);
  std::vector<Named> data_, rows_, params_;
  std::vector<double> scalars_;
};

template <class X, size_t>
using Repeat = X;
template <char Role>
using ArgOf = std::conditional_t<Role == 's', double, const Tensor&>;

// The torch-facing function of a channelwise op: its arguments typed by kRoles, its results a Tensor or a tuple.
template <class Op, class Args = std::make_index_sequence<sizeof(Op::kRoles) - 1>,
          class Results = std::make_index_sequence<Op::kOutputs + Op::kRowSums + Op::kChannelSums>>
struct ChannelwiseBinding;

template <class Op, size_t... I, size_t... J>
struct ChannelwiseBinding<Op, std::index_sequence<I...>, std::index_sequence<J...>> {
  using Result = std::conditional_t<sizeof...(J) == 1, Tensor, std::tuple<Repeat<Tensor, J>...>>;
  static Result call(ArgOf<Op::kRoles[I]>... args) {
    Channelwise<Op> binding;
    (binding.add(args, int(I)), ...);
    std::vector<Tensor> results = binding.run();
    if constexpr (sizeof...(J) == 1) {
      return results[0];
    } else {
      return Result(results[J]...);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Coupling epilogue

void check_coupling_epilogue(const Tensor& x2, const Tensor& h, bool affine, const char* op, const char* x2_name) {
  check_device(h, x2, op, "h");
  TORCH_CHECK_VALUE(h.dim() == x2.dim() && h.size(0) == x2.size(0) && h.size(1) == x2.size(1) * (affine ? 2 : 1) &&
                        (x2.dim() == 2 || (h.size(2) == x2.size(2) && h.size(3) == x2.size(3))),
                    op, ": h must have ", affine ? "2 x " : "", "the channels of ", x2_name, " and its other dims: ",
                    x2_name, " ", x2.sizes(), ", h ", h.sizes());
}

std::tuple<Tensor, Tensor> coupling_epilogue_fwd(const Tensor& x2_in, const Tensor& h_in, bool affine) {
  const char* op = "coupling_epilogue_fwd";
  auto [batch, channels, pixels] = rows_of(x2_in, op, "x2");
  check_coupling_epilogue(x2_in, h_in, affine, op, "x2");
  const DType dtype = dtype_of(x2_in, op, "x2"), h_dtype = dtype_of(h_in, op, "h");
  const Tensor x2 = x2_in.contiguous(), h = h_in.contiguous();
  Tensor z2 = new_like_rows(x2), log_det = acc_vector(x2, batch);
  if (on_cuda(x2, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x2.device());
    flowkern::cuda::coupling_epilogue_fwd(x2.data_ptr(), dtype, h.data_ptr(), h_dtype, batch, channels, pixels, affine,
                                          z2.data_ptr(), log_det.data_ptr(), stream_of(x2));
#endif
  } else {
    flowkern::cpu::coupling_epilogue_fwd(x2.data_ptr(), dtype, h.data_ptr(), h_dtype, batch, channels, pixels, affine,
                                         z2.data_ptr(), log_det.data_ptr(), kParallelFor);
  }
  return {z2, log_det};
}

Tensor coupling_epilogue_inv(const Tensor& z2_in, const Tensor& h_in, bool affine) {
  const char* op = "coupling_epilogue_inv";
  auto [batch, channels, pixels] = rows_of(z2_in, op, "z2");
  check_coupling_epilogue(z2_in, h_in, affine, op, "z2");
  const DType dtype = dtype_of(z2_in, op, "z2"), h_dtype = dtype_of(h_in, op, "h");
  const Tensor z2 = z2_in.contiguous(), h = h_in.contiguous();
  Tensor x2 = new_like_rows(z2);
  if (on_cuda(z2, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z2.device());
    flowkern::cuda::coupling_epilogue_inv(z2.data_ptr(), dtype, h.data_ptr(), h_dtype, batch, channels, pixels, affine,
                                          x2.data_ptr(), stream_of(z2));
#endif
  } else {
    flowkern::cpu::coupling_epilogue_inv(z2.data_ptr(), dtype, h.data_ptr(), h_dtype, batch, channels, pixels, affine,
                                         x2.data_ptr(), kParallelFor);
  }
  return x2;
}

std::tuple<Tensor, Tensor> coupling_epilogue_bwd(const Tensor& dz2_in, const Tensor& dlog_det_in, const Tensor& x2_in,
                                                 const Tensor& h_in) {
  const char* op = "coupling_epilogue_bwd";
  auto [batch, channels, pixels] = rows_of(x2_in, op, "x2");
  check_coupling_epilogue(x2_in, h_in, /*affine=*/true, op, "x2");
  check_shape(dz2_in, x2_in.sizes(), op, "grad_z2");
  check_device(dz2_in, x2_in, op, "grad_z2");
  const DType dtype = dtype_of(x2_in, op, "x2"), h_dtype = dtype_of(h_in, op, "h");
  const Tensor x2 = x2_in.contiguous(), h = h_in.contiguous(), dz2 = dz2_in.to(x2_in.scalar_type()).contiguous();
  const Tensor dlog_det = per_row(dlog_det_in, x2, batch, op, "grad_log_det");
  Tensor dx2 = new_like_rows(x2), dh = new_like_rows(h);
  if (on_cuda(x2, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x2.device());
    flowkern::cuda::coupling_epilogue_bwd(dz2.data_ptr(), dlog_det.data_ptr(), x2.data_ptr(), dtype, h.data_ptr(),
                                          h_dtype, batch, channels, pixels, dx2.data_ptr(), dh.data_ptr(),
                                          stream_of(x2));
#endif
  } else {
    flowkern::cpu::coupling_epilogue_bwd(dz2.data_ptr(), dlog_det.data_ptr(), x2.data_ptr(), dtype, h.data_ptr(),
                                         h_dtype, batch, channels, pixels, dx2.data_ptr(), dh.data_ptr(),
                                         kParallelFor);
  }
  return {dx2, dh};
}

// ---------------------------------------------------------------------------------------------------------------
// LU weight of the 1x1 convolution

struct LuFactors {
  Tensor perm, lower, upper, sign_s, log_s;
  int64_t channels;
  DType dtype;
};

LuFactors lu_factors(const Tensor& perm, const Tensor& lower, const Tensor& upper, const Tensor& sign_s,
                     const Tensor& log_s, const char* op) {
  TORCH_CHECK_VALUE(lower.dim() == 2 && lower.size(0) == lower.size(1) && lower.size(0) > 0, op,
                    ": lower must be a square [C, C] matrix, got ", lower.sizes());
  const int64_t c = lower.size(0);
  TORCH_CHECK_VALUE(lower.scalar_type() == at::kFloat || lower.scalar_type() == at::kDouble, op,
                    ": LU factors must be float32 or float64, got ", lower.scalar_type());
  check_shape(upper, {c, c}, op, "upper");
  check_shape(sign_s, {c}, op, "sign_s");
  check_shape(log_s, {c}, op, "log_s");
  check_shape(perm, {c}, op, "perm");
  TORCH_CHECK_VALUE(perm.scalar_type() == at::kLong, op, ": perm must be int64, got ", perm.scalar_type());
  for (const Tensor* t : {&upper, &sign_s, &log_s, &perm}) check_device(*t, lower, op, "an LU factor");
  const auto dt = lower.scalar_type();
  return {perm.contiguous(), lower.contiguous(), upper.to(dt).contiguous(), sign_s.to(dt).contiguous(),
          log_s.to(dt).contiguous(), c, dt == at::kDouble ? DType::f64 : DType::f32};
}

std::tuple<Tensor, Tensor> lu_weight_fwd(const Tensor& perm, const Tensor& lower, const Tensor& upper,
                                         const Tensor& sign_s, const Tensor& log_s) {
  const char* op = "lu_weight_fwd";
  const LuFactors f = lu_factors(perm, lower, upper, sign_s, log_s, op);
  Tensor weight = at::empty({f.channels, f.channels}, f.lower.options()), log_det = at::empty({}, f.lower.options());
  if (on_cuda(f.lower, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(f.lower.device());
    flowkern::cuda::lu_weight_fwd(f.perm.data_ptr<int64_t>(), f.lower.data_ptr(), f.upper.data_ptr(),
                                  f.sign_s.data_ptr(), f.log_s.data_ptr(), f.dtype, f.channels, weight.data_ptr(),
                                  log_det.data_ptr(), stream_of(f.lower));
#endif
  } else {
    flowkern::cpu::lu_weight_fwd(f.perm.data_ptr<int64_t>(), f.lower.data_ptr(), f.upper.data_ptr(),
                                 f.sign_s.data_ptr(), f.log_s.data_ptr(), f.dtype, f.channels, weight.data_ptr(),
                                 log_det.data_ptr(), kParallelFor);
  }
  return {weight, log_det.to(log_s.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor> lu_weight_bwd(const Tensor& dweight_in, const Tensor& dlog_det_in,
                                                 const Tensor& perm, const Tensor& lower, const Tensor& upper,
                                                 const Tensor& sign_s, const Tensor& log_s) {
  const char* op = "lu_weight_bwd";
  const LuFactors f = lu_factors(perm, lower, upper, sign_s, log_s, op);
  check_shape(dweight_in, {f.channels, f.channels}, op, "grad_weight");
  check_device(dweight_in, lower, op, "grad_weight");
  const Tensor dweight = dweight_in.to(lower.scalar_type()).contiguous();
  const Tensor dlog_det = dlog_det_in.to(lower.scalar_type()).reshape({}).contiguous();
  Tensor dlower = at::empty_like(f.lower), dupper = at::empty_like(f.lower), dlog_s = at::empty({f.channels}, f.lower.options());
  if (on_cuda(f.lower, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(f.lower.device());
    flowkern::cuda::lu_weight_bwd(dweight.data_ptr(), dlog_det.data_ptr(), f.perm.data_ptr<int64_t>(),
                                  f.lower.data_ptr(), f.upper.data_ptr(), f.sign_s.data_ptr(), f.log_s.data_ptr(),
                                  f.dtype, f.channels, dlower.data_ptr(), dupper.data_ptr(), dlog_s.data_ptr(),
                                  stream_of(f.lower));
#endif
  } else {
    flowkern::cpu::lu_weight_bwd(dweight.data_ptr(), dlog_det.data_ptr(), f.perm.data_ptr<int64_t>(),
                                 f.lower.data_ptr(), f.upper.data_ptr(), f.sign_s.data_ptr(), f.log_s.data_ptr(),
                                 f.dtype, f.channels, dlower.data_ptr(), dupper.data_ptr(), dlog_s.data_ptr(),
                                 kParallelFor);
  }
  return {dlower, dupper.to(upper.scalar_type()),
          dlog_s.to(log_s.scalar_type())};
}

// ---------------------------------------------------------------------------------------------------------------
// The 1x1 convolution: y = W x per pixel through ATen's GEMM, with the preceding ActNorm folded into W and a bias.

// x as [N, C] rows (a view for [B, C]; channels moved last for images) in the compute dtype.
Tensor channel_rows(const Tensor& x, at::ScalarType dtype) {
  const Tensor xc = x.to(dtype);
  return x.dim() == 2 ? xc : xc.movedim(1, -1).reshape({-1, x.size(1)});
}

// Back to like's shape, dtype and memory format (as empty_like(like): channels-last images stay channels-last).
Tensor from_channel_rows(const Tensor& rows, const Tensor& like) {
  Tensor out = at::empty_like(like);
  if (like.dim() == 2) return out.copy_(rows);
  return out.copy_(rows.reshape({like.size(0), like.size(2), like.size(3), like.size(1)}).movedim(-1, 1));
}

at::ScalarType gemm_type(const Tensor& x, const Tensor& weight) {
  return at::promote_types(acc_type(x), weight.scalar_type());
}

void check_invconv(const Tensor& x, const Tensor& weight, const char* op) {
  rows_of(x, op, "x");
  dtype_of(x, op, "x");
  check_device(weight, x, op, "weight");
  check_shape(weight, {x.size(1), x.size(1)}, op, "weight");
}

Tensor invconv_fwd(const Tensor& x, const Tensor& weight) {
  check_invconv(x, weight, "invconv_fwd");
  const auto dt = gemm_type(x, weight);
  return from_channel_rows(at::matmul(channel_rows(x, dt), weight.to(dt).t()), x);
}

std::tuple<Tensor, Tensor> invconv_bwd(const Tensor& dy, const Tensor& x, const Tensor& weight) {
  check_invconv(x, weight, "invconv_bwd");
  check_shape(dy, x.sizes(), "invconv_bwd", "grad_y");
  const auto dt = gemm_type(x, weight);
  const Tensor dy_rows = channel_rows(dy, dt);
  const Tensor dx = from_channel_rows(at::matmul(dy_rows, weight.to(dt)), x);
  return {dx, at::matmul(dy_rows.t(), channel_rows(x, dt)).to(weight.scalar_type())};
}

Tensor actnorm_invconv_fwd(const Tensor& x, const Tensor& bias, const Tensor& logs, double logscale_factor,
                           const Tensor& weight) {
  const char* op = "actnorm_invconv_fwd";
  check_invconv(x, weight, op);
  const auto dt = gemm_type(x, weight);
  const Tensor scale = at::exp(logscale_factor * param(logs, x, {x.size(1)}, op, "logs").to(dt));
  const Tensor folded = weight.to(dt) * scale.unsqueeze(0);                 // W diag(s)
  const Tensor shift = at::matmul(folded, param(bias, x, {x.size(1)}, op, "bias").to(dt));   // W diag(s) b
  return from_channel_rows(at::addmm(shift, channel_rows(x, dt), folded.t()), x);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> actnorm_invconv_bwd(const Tensor& dy, const Tensor& x, const Tensor& bias,
                                                               const Tensor& logs, double logscale_factor,
                                                               const Tensor& weight) {
  const char* op = "actnorm_invconv_bwd";
  check_invconv(x, weight, op);
  check_shape(dy, x.sizes(), op, "grad_y");
  const auto dt = gemm_type(x, weight);
  const Tensor scale = at::exp(logscale_factor * param(logs, x, {x.size(1)}, op, "logs").to(dt));
  const Tensor normed = (channel_rows(x, dt) + param(bias, x, {x.size(1)}, op, "bias").to(dt)) * scale;
  const Tensor dy_rows = channel_rows(dy, dt);
  const Tensor dnormed = at::matmul(dy_rows, weight.to(dt));
  const Tensor dx_rows = dnormed * scale;
  return {from_channel_rows(dx_rows, x), dx_rows.sum(0).to(bias.scalar_type()),
          (logscale_factor * (dnormed * normed).sum(0)).to(logs.scalar_type()),
          at::matmul(dy_rows.t(), normed).to(weight.scalar_type())};
}

// ---------------------------------------------------------------------------------------------------------------
// The BERT-flow coupling with its MLP subnet

struct Mlp {
  std::vector<Tensor> params;   // acc-typed, contiguous: w1, b1, l1, w2, b2, l2, w3, b3, l3
  flowkern::MlpShape shape;
  flowkern::MlpParams weights() const {
    return {params[0].data_ptr(), params[1].data_ptr(), params[2].data_ptr(), params[3].data_ptr(),
            params[4].data_ptr(), params[5].data_ptr(), params[6].data_ptr(), params[7].data_ptr(),
            params[8].data_ptr()};
  }
};

// The subnet's tensors (flowkern.ops.spec.MlpParams, one Tensor[] argument) unpacked into MlpParams, checked once.
Mlp mlp(const Tensor& x1, const Tensor& other, at::TensorList p, bool affine, double logscale_factor,
        const char* op) {
  TORCH_CHECK_VALUE(x1.dim() == 2 && other.dim() == 2 && x1.size(0) == other.size(0) && x1.size(0) > 0, op,
                    ": takes [B, C1] and [B, C2] data with B > 0, got ", x1.sizes(), " and ", other.sizes());
  TORCH_CHECK_VALUE(x1.scalar_type() == other.scalar_type(), op, ": x1 and the other half must share a dtype, got ",
                    x1.scalar_type(), " and ", other.scalar_type());
  check_device(x1, other, op, "x1");
  TORCH_CHECK_VALUE(p.size() == 9, op, ": expected 9 subnet parameters, got ", p.size());
  const int64_t hidden = p[0].size(0), c1 = x1.size(1), c2 = other.size(1), outputs = c2 * (affine ? 2 : 1);
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= flowkern::kMaxFusedHidden, op, ": hidden width must be in [1, ",
                    flowkern::kMaxFusedHidden, "], got ", hidden);
  const std::vector<std::vector<int64_t>> shapes = {{hidden, c1}, {hidden}, {hidden}, {hidden, hidden}, {hidden},
                                                    {hidden}, {outputs, hidden}, {outputs}, {outputs}};
  static const char* names[] = {"w1", "b1", "l1", "w2", "b2", "l2", "w3", "b3", "l3"};
  Mlp m;
  for (size_t i = 0; i < 9; ++i) m.params.push_back(param(p[i], other, shapes[i], op, names[i]));
  m.shape = {x1.size(0), c1, c2, hidden, affine, logscale_factor};
  return m;
}

std::tuple<Tensor, Tensor> mlp_coupling_fwd(const Tensor& x1_in, const Tensor& x2_in, at::TensorList params,
                                            bool affine, double logscale_factor) {
  const char* op = "mlp_coupling_fwd";
  const Mlp m = mlp(x1_in, x2_in, params, affine, logscale_factor, op);
  const DType dtype = dtype_of(x2_in, op, "x2");
  const Tensor x1 = x1_in.contiguous(), x2 = x2_in.contiguous();
  Tensor z2 = new_like_rows(x2), log_det = acc_vector(x2, m.shape.batch);
  if (on_cuda(x2, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x2.device());
    flowkern::cuda::mlp_coupling_fwd(x1.data_ptr(), x2.data_ptr(), dtype, m.weights(), m.shape, z2.data_ptr(),
                                     log_det.data_ptr(), stream_of(x2));
#endif
  } else {
    flowkern::cpu::mlp_coupling_fwd(x1.data_ptr(), x2.data_ptr(), dtype, m.weights(), m.shape, z2.data_ptr(),
                                    log_det.data_ptr(), kParallelFor);
  }
  return {in_layout_of(z2, x2_in), log_det};
}

Tensor mlp_coupling_inv(const Tensor& x1_in, const Tensor& z2_in, at::TensorList params, bool affine,
                        double logscale_factor) {
  const char* op = "mlp_coupling_inv";
  const Mlp m = mlp(x1_in, z2_in, params, affine, logscale_factor, op);
  const DType dtype = dtype_of(z2_in, op, "z2");
  const Tensor x1 = x1_in.contiguous(), z2 = z2_in.contiguous();
  Tensor x2 = new_like_rows(z2);
  if (on_cuda(z2, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(z2.device());
    flowkern::cuda::mlp_coupling_inv(x1.data_ptr(), z2.data_ptr(), dtype, m.weights(), m.shape, x2.data_ptr(),
                                     stream_of(z2));
#endif
  } else {
    flowkern::cpu::mlp_coupling_inv(x1.data_ptr(), z2.data_ptr(), dtype, m.weights(), m.shape, x2.data_ptr(),
                                    kParallelFor);
  }
  return in_layout_of(x2, z2_in);
}

std::vector<Tensor> mlp_coupling_backward(flowkern::Direction direction, const Tensor& dout_in,
                                          const c10::optional<Tensor>& dlog_det_in, const Tensor& x1_in,
                                          const Tensor& other_in, at::TensorList params, bool affine,
                                          double logscale_factor, const char* op) {
  const Mlp m = mlp(x1_in, other_in, params, affine, logscale_factor, op);
  const DType dtype = dtype_of(other_in, op, "x2");
  check_shape(dout_in, other_in.sizes(), op, "the output gradient");
  check_device(dout_in, other_in, op, "the output gradient");
  const Tensor x1 = x1_in.contiguous(), other = other_in.contiguous();
  const Tensor dout = dout_in.to(other_in.scalar_type()).contiguous();
  Tensor dlog_det;
  if (dlog_det_in.has_value()) dlog_det = per_row(*dlog_det_in, other, m.shape.batch, op, "grad_log_det");
  Tensor dx1 = new_like_rows(x1), dother = new_like_rows(other);
  std::vector<Tensor> grads;
  for (const Tensor& p : m.params) grads.push_back(at::empty_like(p));
  const flowkern::MlpParamGrads g{grads[0].data_ptr(), grads[1].data_ptr(), grads[2].data_ptr(),
                             grads[3].data_ptr(), grads[4].data_ptr(), grads[5].data_ptr(),
                             grads[6].data_ptr(), grads[7].data_ptr(), grads[8].data_ptr()};
  const void* dlog_det_ptr = dlog_det.defined() ? dlog_det.data_ptr() : nullptr;
  if (on_cuda(other, op)) {
#ifdef FLOWKERN_WITH_CUDA
    const c10::cuda::CUDAGuard guard(other.device());
    Tensor workspace = at::empty({flowkern::cuda::mlp_coupling_bwd_workspace_bytes(dtype, m.shape)},
                                 other.options().dtype(at::kByte));
    flowkern::cuda::mlp_coupling_bwd(direction, dout.data_ptr(), dlog_det_ptr, x1.data_ptr(), other.data_ptr(),
                                     dtype, m.weights(), m.shape, dx1.data_ptr(), dother.data_ptr(), g,
                                     workspace.data_ptr(), stream_of(other));
#endif
  } else {
    flowkern::cpu::mlp_coupling_bwd(direction, dout.data_ptr(), dlog_det_ptr, x1.data_ptr(), other.data_ptr(),
                                    dtype, m.weights(), m.shape, dx1.data_ptr(), dother.data_ptr(), g,
                                    kParallelFor);
  }
  std::vector<Tensor> out = {in_layout_of(dx1, x1_in), in_layout_of(dother, other_in)};
  for (size_t i = 0; i < grads.size(); ++i) out.push_back(grads[i].to(params[i].scalar_type()));
  return out;
}

std::vector<Tensor> mlp_coupling_bwd(const Tensor& dz2, const Tensor& dlog_det, const Tensor& x1, const Tensor& x2,
                                     at::TensorList params, bool affine, double logscale_factor) {
  return mlp_coupling_backward(flowkern::Direction::forward, dz2, dlog_det, x1, x2, params, affine, logscale_factor,
                               "mlp_coupling_bwd");
}

std::vector<Tensor> mlp_coupling_inv_bwd(const Tensor& dx2, const Tensor& x1, const Tensor& z2, at::TensorList params,
                                         bool affine, double logscale_factor) {
  return mlp_coupling_backward(flowkern::Direction::inverse, dx2, c10::nullopt, x1, z2, params, affine,
                               logscale_factor, "mlp_coupling_inv_bwd");
}

// ---------------------------------------------------------------------------------------------------------------
// The whole [B, C] Glow (CPU; on CUDA the Triton kernel serves it)

struct Plan {
  flowkern::cpu::GlowPlanView view;
  Tensor params, mix;
};

// The plan GlowPlan built once in Python (flowkern.ops.glow_ops.GlowTables: meta, an_idx, z_idx, order,
// local_order; this kernel reads all but order) and the parameter tensors, packed here into one acc-typed vector.
Plan glow_plan(const Tensor& data, at::TensorList params, const Tensor& mix, at::TensorList tables,
               at::IntArrayRef level_steps, at::IntArrayRef level_channels, int64_t hidden, bool affine, bool lu,
               double logscale_factor, const char* op) {
  TORCH_CHECK_VALUE(data.dim() == 2 && data.size(0) > 0, op, ": takes [B, C] data with B > 0, got ", data.sizes());
  TORCH_CHECK_VALUE(data.is_cpu(), op, ": the compiled Glow runs on CPU tensors (the Triton backend serves CUDA)");
  TORCH_CHECK_VALUE(tables.size() == 5, op, ": plan must be the 5 tables of GlowTables, got ", tables.size());
  TORCH_CHECK_VALUE(!params.empty(), op, ": params must list the parameter tensors");
  const Tensor &meta = tables[0], &an_idx = tables[1], &z_idx = tables[2], &local_order = tables[4];
  const int64_t channels = data.size(1), steps = meta.size(0);
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(1) == 16 && meta.scalar_type() == at::kLong, op,
                    ": meta must be int64 [steps, 16], got ", meta.scalar_type(), " ", meta.sizes());
  TORCH_CHECK_VALUE(an_idx.scalar_type() == at::kInt && an_idx.sizes() == at::IntArrayRef({steps, channels}), op,
                    ": an_idx must be int32 [steps, C] = [", steps, ", ", channels, "], got ", an_idx.scalar_type(),
                    " ", an_idx.sizes());
  TORCH_CHECK_VALUE(local_order.scalar_type() == at::kInt &&
                        local_order.sizes() == at::IntArrayRef({2 * steps, channels}),
                    op, ": local_order must be int32 [2 * steps, C] = [", 2 * steps, ", ", channels, "], got ",
                    local_order.scalar_type(), " ", local_order.sizes());
  TORCH_CHECK_VALUE(z_idx.scalar_type() == at::kInt && z_idx.sizes() == at::IntArrayRef({channels}), op,
                    ": z_idx must be int32 [C], got ", z_idx.scalar_type(), " ", z_idx.sizes());
  TORCH_CHECK_VALUE(level_steps.size() == level_channels.size() &&
                        std::accumulate(level_steps.begin(), level_steps.end(), int64_t{0}) == steps,
                    op, ": level_steps ", level_steps, " must have one entry per level (", level_channels.size(),
                    ") and sum to the plan's ", steps, " steps");
  for (const Tensor* t : {&mix, &meta, &an_idx, &z_idx, &local_order}) check_device(*t, data, op, "a plan tensor");
  for (const Tensor& p : params) check_device(p, data, op, "a parameter");
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= flowkern::kMaxFusedHidden, op, ": hidden width must be in [1, ",
                    flowkern::kMaxFusedHidden, "], got ", hidden);
  // The view points into the caller's plan tensors (GlowPlan keeps them contiguous), which outlive the call.
  TORCH_CHECK_VALUE(meta.is_contiguous() && an_idx.is_contiguous() && z_idx.is_contiguous() &&
                        local_order.is_contiguous(),
                    op, ": plan tables must be contiguous");
  std::vector<Tensor> flat;
  for (const Tensor& p : params) flat.push_back(p.reshape({-1}));
  Plan plan;
  plan.params = at::cat(flat).to(acc_type(data)).contiguous();
  plan.mix = mix.to(acc_type(data)).contiguous();
  plan.view = {meta.data_ptr<int64_t>(), an_idx.data_ptr<int32_t>(), local_order.data_ptr<int32_t>(),
               z_idx.data_ptr<int32_t>(), plan.params.numel(), plan.mix.numel(), steps, channels, hidden, affine, lu,
               logscale_factor};
  return plan;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> glow_fwd(const Tensor& x_in, at::TensorList params,
                                                            const Tensor& mix, at::TensorList tables,
                                                            at::IntArrayRef level_steps,
                                                            at::IntArrayRef level_channels, int64_t hidden,
                                                            bool affine, bool lu, double logscale_factor, bool save) {
  const char* op = "glow_fwd";
  const Plan plan = glow_plan(x_in, params, mix, tables, level_steps, level_channels, hidden, affine, lu,
                              logscale_factor, op);
  const DType dtype = dtype_of(x_in, op, "x");
  const Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0), channels = x.size(1), steps = plan.view.steps;
  const auto acc = x.options().dtype(acc_type(x));
  Tensor z = new_like_rows(x), log_det = acc_vector(x, batch), log_prior = acc_vector(x, batch);
  Tensor mid = save ? at::empty({steps + 1, batch, channels}, acc) : at::empty({0}, acc);
  Tensor inp = save && lu ? at::empty({steps, batch, channels}, acc) : at::empty({0}, acc);
  flowkern::cpu::glow_fwd(x.data_ptr(), dtype, plan.params.data_ptr(), plan.mix.data_ptr(), plan.view, batch,
                          z.data_ptr(), log_det.data_ptr(), log_prior.data_ptr(), save ? mid.data_ptr() : nullptr,
                          save && lu ? inp.data_ptr() : nullptr, kGemm, kParallelFor);
  return {z, log_det, log_prior, mid, inp};
}

Tensor glow_inv(const Tensor& z_in, at::TensorList params, const Tensor& mix, at::TensorList tables,
                at::IntArrayRef level_steps, at::IntArrayRef level_channels, int64_t hidden, bool affine, bool lu,
                double logscale_factor) {
  const char* op = "glow_inv";
  const Plan plan = glow_plan(z_in, params, mix, tables, level_steps, level_channels, hidden, affine, lu,
                              logscale_factor, op);
  const DType dtype = dtype_of(z_in, op, "z");
  const Tensor z = z_in.contiguous();
  Tensor x = new_like_rows(z);
  flowkern::cpu::glow_inv(z.data_ptr(), dtype, plan.params.data_ptr(), plan.mix.data_ptr(), plan.view, z.size(0),
                          x.data_ptr(), kGemm, kParallelFor);
  return x;
}

// (dx, dparams packed, dmid): LU flows' dmid [steps, B, C] is the gradient at each mixing GEMM's output, which
// flowkern.ops.glow_ops.mix_gradient turns into the mixing gradient for every backend.
std::tuple<Tensor, Tensor, Tensor> glow_bwd(const Tensor& dz_in, const Tensor& dlog_det_in,
                                            const Tensor& dlog_prior_in, const Tensor& z, at::TensorList params,
                                            const Tensor& mix, const Tensor& mid, at::TensorList tables,
                                            at::IntArrayRef level_steps, at::IntArrayRef level_channels,
                                            int64_t hidden, bool affine, bool lu, double logscale_factor) {
  const char* op = "glow_bwd";
  const Plan plan = glow_plan(z, params, mix, tables, level_steps, level_channels, hidden, affine, lu,
                              logscale_factor, op);
  const DType dtype = dtype_of(z, op, "z");
  const int64_t batch = z.size(0), channels = z.size(1), steps = plan.view.steps;
  check_shape(dz_in, z.sizes(), op, "grad_z");
  check_shape(mid, {steps + 1, batch, channels}, op, "mid (saved activations)");
  TORCH_CHECK_VALUE(mid.scalar_type() == acc_type(z) && mid.is_contiguous(), op,
                    ": mid must be contiguous ", acc_type(z));
  const Tensor dz = dz_in.to(z.scalar_type()).contiguous();
  const Tensor dlog_det = per_row(dlog_det_in, z, batch, op, "grad_log_det");
  const Tensor dlog_prior = per_row(dlog_prior_in, z, batch, op, "grad_log_prior");
  const auto acc = z.options().dtype(acc_type(z));
  Tensor dx = new_like_rows(z), dparams = at::empty({plan.params.numel()}, acc);
  Tensor dmid = lu ? at::empty({steps, batch, channels}, acc) : at::empty({0}, acc);
  flowkern::cpu::glow_bwd(dz.data_ptr(), dlog_det.data_ptr(), dlog_prior.data_ptr(), dtype, plan.params.data_ptr(),
                          plan.mix.data_ptr(), mid.data_ptr(), plan.view, batch, dx.data_ptr(), dparams.data_ptr(),
                          lu ? dmid.data_ptr() : nullptr, kGemm, kParallelFor);
  return {dx, dparams.to(params[0].scalar_type()), dmid};
}

}  // namespace

TORCH_LIBRARY(flowkern_C, m) {
#define FLOWKERN_DEF(Op) m.def(Op::kSchema);
  FLOWKERN_CHANNELWISE_OPS(FLOWKERN_DEF)
#undef FLOWKERN_DEF
  m.def("coupling_epilogue_fwd(Tensor x2, Tensor h, bool affine) -> (Tensor, Tensor)");
  m.def("coupling_epilogue_inv(Tensor z2, Tensor h, bool affine) -> Tensor");
  m.def("coupling_epilogue_bwd(Tensor grad_z2, Tensor grad_log_det, Tensor x2, Tensor h) -> (Tensor, Tensor)");
  m.def("lu_weight_fwd(Tensor perm, Tensor lower, Tensor upper, Tensor sign_s, Tensor log_s) -> (Tensor, Tensor)");
  m.def("lu_weight_bwd(Tensor grad_weight, Tensor grad_log_det, Tensor perm, Tensor lower, Tensor upper, "
        "Tensor sign_s, Tensor log_s) -> (Tensor, Tensor, Tensor)");
  m.def("invconv_fwd(Tensor x, Tensor weight) -> Tensor");
  m.def("invconv_bwd(Tensor grad_y, Tensor x, Tensor weight) -> (Tensor, Tensor)");
  m.def("actnorm_invconv_fwd(Tensor x, Tensor bias, Tensor logs, float logscale_factor, Tensor weight) -> Tensor");
  m.def("actnorm_invconv_bwd(Tensor grad_y, Tensor x, Tensor bias, Tensor logs, float logscale_factor, "
        "Tensor weight) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("mlp_coupling_fwd(Tensor x1, Tensor x2, Tensor[] mlp, bool affine, float logscale_factor) -> (Tensor, Tensor)");
  m.def("mlp_coupling_inv(Tensor x1, Tensor z2, Tensor[] mlp, bool affine, float logscale_factor) -> Tensor");
  m.def("mlp_coupling_bwd(Tensor grad_z2, Tensor grad_log_det, Tensor x1, Tensor x2, Tensor[] mlp, bool affine, "
        "float logscale_factor) -> Tensor[]");
  m.def("mlp_coupling_inv_bwd(Tensor grad_x2, Tensor x1, Tensor z2, Tensor[] mlp, bool affine, "
        "float logscale_factor) -> Tensor[]");
  const std::string glow_plan = "Tensor[] plan, int[] level_steps, int[] level_channels, int hidden, bool affine, "
                                "bool lu, float logscale_factor";
  m.def(("glow_fwd(Tensor x, Tensor[] params, Tensor mix, " + glow_plan +
         ", bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def(("glow_inv(Tensor z, Tensor[] params, Tensor mix, " + glow_plan + ") -> Tensor").c_str());
  m.def(("glow_bwd(Tensor grad_z, Tensor grad_log_det, Tensor grad_log_prior, Tensor z, Tensor[] params, Tensor mix, "
         "Tensor mid, " + glow_plan + ") -> (Tensor, Tensor, Tensor)").c_str());
}

#define FLOWKERN_IMPL_CHANNELWISE(Op) m.impl(schema_name(Op::kSchema).c_str(), &ChannelwiseBinding<Op>::call);
#define FLOWKERN_IMPL_ALL(m)                                     \
  FLOWKERN_CHANNELWISE_OPS(FLOWKERN_IMPL_CHANNELWISE)            \
  m.impl("coupling_epilogue_fwd", &coupling_epilogue_fwd);       \
  m.impl("coupling_epilogue_inv", &coupling_epilogue_inv);       \
  m.impl("coupling_epilogue_bwd", &coupling_epilogue_bwd);       \
  m.impl("lu_weight_fwd", &lu_weight_fwd);                       \
  m.impl("lu_weight_bwd", &lu_weight_bwd);                       \
  m.impl("invconv_fwd", &invconv_fwd);                           \
  m.impl("invconv_bwd", &invconv_bwd);                           \
  m.impl("actnorm_invconv_fwd", &actnorm_invconv_fwd);           \
  m.impl("actnorm_invconv_bwd", &actnorm_invconv_bwd);           \
  m.impl("mlp_coupling_fwd", &mlp_coupling_fwd);                 \
  m.impl("mlp_coupling_inv", &mlp_coupling_inv);                 \
  m.impl("mlp_coupling_bwd", &mlp_coupling_bwd);                 \
  m.impl("mlp_coupling_inv_bwd", &mlp_coupling_inv_bwd)

TORCH_LIBRARY_IMPL(flowkern_C, CPU, m) {
  FLOWKERN_IMPL_ALL(m);
  m.impl("glow_fwd", &glow_fwd);
  m.impl("glow_inv", &glow_inv);
  m.impl("glow_bwd", &glow_bwd);
}

#ifdef FLOWKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(flowkern_C, CUDA, m) { FLOWKERN_IMPL_ALL(m); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "flowkern's compiled kernels; the ops are torch.ops.flowkern_C.* (see flowkern/kernels/compiled.py)";
  module.attr("has_cuda") = kHasCuda;
}
