// Per-element math shared by the CPU (.cpp) and CUDA (.cu) kernels: torch-free, host-device.
// Data are fp16/bf16/fp32/fp64 in memory; every kernel computes in the accumulate type (fp64 for fp64 data,
// fp32 otherwise) and rounds once when it stores, like the Triton kernels and the references.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FLOWKERN_HD __host__ __device__ __forceinline__
#else
#define FLOWKERN_HD inline
#endif
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>  // fp16 <-> fp32 in one instruction on x86 CPUs that have it (-march=native)
#endif

namespace flowkern {

// Storage types of the 16-bit formats: plain bits, so this header needs neither torch nor CUDA's types on the host.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

FLOWKERN_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

FLOWKERN_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
#endif
}

// bf16 is the top half of an fp32; rounding to nearest even, NaN kept quiet.
FLOWKERN_HD float to_float(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }

FLOWKERN_HD BFloat16 to_bfloat16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{uint16_t(u >> 16)};
}

FLOWKERN_HD float to_float(Half v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#elif defined(__F16C__)
  return _cvtsh_ss(v.bits);
#else
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal: value = mantissa * 2^-24.
  const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
#endif
}

FLOWKERN_HD Half to_half(float f) {
#if defined(__CUDA_ARCH__)
  return Half{__half_as_ushort(__float2half_rn(f))};
#elif defined(__F16C__)
  return Half{uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
#else
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};             // nan
  if (abs_bits >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};            // rounds to inf
  if (abs_bits < 0x38800000u) {                                                  // subnormal or zero in fp16
    // Adding 0.5 (2^-1) aligns the fp16 subnormal step (2^-24) with the last mantissa bit; fp32 rounds to even.
    const float shifted = bits_to_float(abs_bits) + 0.5f;
    return Half{uint16_t(sign | uint16_t(float_to_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (abs_bits >> 13) & 1u;
  const uint32_t rounded = abs_bits + 0xfffu + odd - (112u << 23);
  return Half{uint16_t(sign | uint16_t(rounded >> 13))};
#endif
}

// Accumulate type of each storage type.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A> FLOWKERN_HD A load_as(float v) { return A(v); }
template <typename A> FLOWKERN_HD A load_as(double v) { return A(v); }
template <typename A> FLOWKERN_HD A load_as(Half v) { return A(to_float(v)); }
template <typename A> FLOWKERN_HD A load_as(BFloat16 v) { return A(to_float(v)); }

template <typename T> struct Store;
template <> struct Store<float> { template <typename A> FLOWKERN_HD static float from(A v) { return float(v); } };
template <> struct Store<double> { template <typename A> FLOWKERN_HD static double from(A v) { return double(v); } };
template <> struct Store<Half> { template <typename A> FLOWKERN_HD static Half from(A v) { return to_half(float(v)); } };
template <> struct Store<BFloat16> {
  template <typename A> FLOWKERN_HD static BFloat16 from(A v) { return to_bfloat16(float(v)); }
};
template <typename T, typename A> FLOWKERN_HD T store_as(A v) { return Store<T>::from(v); }

FLOWKERN_HD float exp_(float v) { return expf(v); }
FLOWKERN_HD double exp_(double v) { return exp(v); }
FLOWKERN_HD float log1p_(float v) { return log1pf(v); }
FLOWKERN_HD double log1p_(double v) { return log1p(v); }

// The affine coupling's scale: sigmoid(raw) with raw = h_scale + 2 (Glow's and BERT-flow's convention).
constexpr double kAffineScaleOffset = 2.0;

template <typename A> FLOWKERN_HD A sigmoid(A v) { return A(1) / (A(1) + exp_(-v)); }

// log(sigmoid(v)) without overflow for large |v|.
template <typename A> FLOWKERN_HD A log_sigmoid(A v) {
  return v >= A(0) ? -log1p_(exp_(-v)) : v - log1p_(exp_(v));
}

template <typename A> FLOWKERN_HD A relu(A v) { return v > A(0) ? v : A(0); }

// -0.5 * log(2 pi): the N(0, 1) log-density is this minus 0.5 * z^2.
constexpr double kHalfLog2Pi = 0.91893853320467274178;

}  // namespace flowkern
