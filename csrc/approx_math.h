// The GPU's approximate special functions, one MUFU instruction each, and a host emulation of
// each at its documented worst-case error, so that the CPU test suite can check every formula
// built on them against the float64 reference (DISTILLM_CUDA_EMULATION, cpu_capability.h).
//
//   fast_exp2(x)  ex2.approx.ftz.f32  relative error <= 2^-22 (2 ulp); results below 2^-126 are 0
//   fast_log2(x)  lg2.approx.ftz.f32  absolute error <= 2^-22 for x in [0.5, 2], relative 2^-22
//                                     elsewhere
//   fast_rcp(x)   rcp.approx.ftz.f32  relative error <= 2^-23 (1 ulp)
//
// The bounds: the CUDA Programming Guide's for exp2f (which is ex2.approx) and __log2f (which
// is lg2.approx), and the PTX ISA's for rcp.approx. The emulation rounds the exact value (from double)
// to float, then moves it by the full bound: up, down, or with a sign drawn from the
// argument's bits (ErrorModel). A real MUFU errs by at most that, and mostly by less.
#pragma once

#include <cstdint>

#include "host_device.h"

#if !defined(__CUDA_ARCH__)
#include <cfloat>
#include <cmath>
#include <cstring>
#endif

namespace distillm::approx {

#if defined(__CUDA_ARCH__)

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

#else  // host emulation

// Which way each emulated result errs, at the bound's full size.
enum class ErrorModel : int {
  kHashed = 0,  // a sign drawn from the argument's bits: errors that average out over a row
  kHigh = 1,    // always up: a systematic bias, which averaging cannot hide
  kLow = 2,     // always down
};

// Set by the emulation's driver before it runs (one model per process).
inline ErrorModel error_model = ErrorModel::kHashed;

inline double error_sign(float argument) {
  switch (error_model) {
    case ErrorModel::kHigh: return 1.0;
    case ErrorModel::kLow: return -1.0;
    case ErrorModel::kHashed: break;
  }
  uint32_t bits;
  std::memcpy(&bits, &argument, sizeof(bits));
  bits *= 0x9E3779B1u;  // Fibonacci hashing: the top bit depends on every bit of the argument
  return (bits >> 31) ? 1.0 : -1.0;
}

// Flush-to-zero of a subnormal result, as .ftz does.
inline float flush(double value) {
  const float rounded = static_cast<float>(value);
  return std::fabs(rounded) < FLT_MIN ? std::copysign(0.0f, rounded) : rounded;
}

constexpr double kTwoToMinus22 = 2.384185791015625e-07;
constexpr double kTwoToMinus23 = 1.1920928955078125e-07;

inline float fast_exp2(float x) {
  if (std::isnan(x) || std::isinf(x)) return std::exp2(x);  // NaN, +inf, 0 exactly
  const double exact = std::exp2(static_cast<double>(x));
  return flush(exact * (1.0 + error_sign(x) * kTwoToMinus22));
}

inline float fast_log2(float x) {
  if (!(x > 0.0f) || std::isinf(x)) return std::log2(x);  // NaN, -inf at 0, NaN below, +inf
  const float in = std::fabs(x) < FLT_MIN ? 0.0f : x;      // .ftz: a subnormal input is 0
  if (in == 0.0f) return -INFINITY;
  const double exact = std::log2(static_cast<double>(in));
  const double error = (in >= 0.5f && in <= 2.0f) ? kTwoToMinus22 : kTwoToMinus22 * std::fabs(exact);
  return static_cast<float>(exact + error_sign(x) * error);
}

inline float fast_rcp(float x) {
  if (std::isnan(x) || std::isinf(x) || std::fabs(x) < FLT_MIN) {
    return std::fabs(x) < FLT_MIN ? std::copysign(INFINITY, x) : 1.0f / x;
  }
  return flush((1.0 / x) * (1.0 + error_sign(x) * kTwoToMinus23));
}

#endif

}  // namespace distillm::approx
