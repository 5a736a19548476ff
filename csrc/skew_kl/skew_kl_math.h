// Torch-free element and row math of the skew KL losses, shared by the CPU and CUDA schedules.
//
// Per row (student logits z, teacher logits u, temperature tau):
//   q = softmax(z / tau), p = softmax(u / tau)
//   forward (SKL):  first f = p, second s = q;  reverse (SRKL): f = q, s = p
//   m = alpha f + (1 - alpha) s,  loss = sum_v f_v (log f_v - log m_v)
//   g_v = dloss/dq_v,  dloss/dz_k = (1/tau) q_k (g_k - sum_v q_v g_v)
// Entries whose logit is -inf in either input, or whose f underflows to 0, are dropped (term 0,
// g 0). The schedules keep G = sum_v q_v g_v per row and write q_k (g_k - G) / tau.
//
// exp and log are written out as branch-free polynomials so that the CPU loops vectorize
// without -ffast-math and the CUDA kernels produce the same numbers as the CPU ones.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace distillm::skew_kl_impl {

constexpr float kNegInf = -__builtin_huge_valf();

// Everything about one call that is the same for every row.
struct Constants {
  float alpha;              // weight of the first distribution inside the mixture
  float odds;               // (1 - alpha) / alpha: m / f = alpha (1 + odds * s / f)
  float neg_log_alpha;      // -log(alpha), rounded once from double
  float inv_temperature;
  // The largest y = odds * s / f used (1e30: finite 1 + y, y / (1 + y) and log1p(y)). A field,
  // not a literal: with the literal, GCC threaded the clamp's branch through the whole log1p,
  // which the vectorized loop then paid for as a blend of every intermediate (AVX2: 16 blends
  // per 8 entries, 10 with a field).
  float max_y;
};

DISTILLM_HD float max_of(float a, float b) { return a > b ? a : b; }

DISTILLM_HD int32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

DISTILLM_HD float float_of_bits(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

// exp(x) for x <= 0, the only arguments a shifted softmax needs. About 1 ulp (Cephes
// coefficients). Results below the smallest normal float flush to 0; NaN stays NaN.
DISTILLM_HD float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kUnderflow = -87.0f;
  const float clamped = max_of(x, kUnderflow);
  const float shifted = clamped * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  float r = clamped - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float r2 = r * r;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float mantissa = poly * r2 + r + 1.0f;
  // The low bits of `shifted` hold n; shifted left 23 they land in the exponent field, and
  // the magic constant's own bits shift out.
  const uint32_t scale_bits = static_cast<uint32_t>(bits_of(shifted)) << 23;
  const float result = float_of_bits(static_cast<int32_t>(static_cast<uint32_t>(bits_of(mantissa)) + scale_bits));
  return x < kUnderflow ? 0.0f : (x != x ? x : result);
}

// log(1 + y) for y >= 0 (NaN stays NaN; +inf gives a finite ~88.7). 1 + y = 2^e m with m in
// [sqrt(1/2), sqrt(2)); log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| < 0.172, whose odd
// series to t^7 is within 3e-8. For e = 0, m - 1 is taken as y itself, so small y keep their
// digits (the point of log1p).
DISTILLM_HD float log1p_nonnegative(float y) {
  constexpr float kSqrt2 = 1.41421356237f;
  const float one_plus_y = 1.0f + y;
  const int32_t bits = bits_of(one_plus_y);
  float exponent = static_cast<float>((bits >> 23) - 127);
  float m = float_of_bits((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > kSqrt2;
  m = big ? 0.5f * m : m;
  exponent = big ? exponent + 1.0f : exponent;
  const bool near_one = exponent == 0.0f;
  const float t = (near_one ? y : m - 1.0f) / (near_one ? 2.0f + y : m + 1.0f);
  const float t2 = t * t;
  float poly = 2.0f / 7.0f;
  poly = poly * t2 + 2.0f / 5.0f;
  poly = poly * t2 + 2.0f / 3.0f;
  poly = poly * t2 + 2.0f;
  const float result = exponent * 0.693359375f + (t * poly + exponent * -2.12194440e-4f);
  return y != y ? y : result;
}

// What one vocabulary entry contributes; all 0 on dropped entries.
struct EntryTerms {
  float term;       // f (log f - log m), the entry's share of the loss
  float q_times_g;  // q_v g_v, the entry's share of G = sum_v q_v g_v
  float g;          // g_v = dloss/dq_v less a constant of the row, which q_k (g_k - G) does
                    // not see (SRKL only: for SKL it overflows where q underflows)
};

// One vocabulary entry. `log_q_over_p` = log q - log p, which the schedules form as
// ((z - max z) - (u - max u)) / tau + log(sum_u / sum_z) so that it keeps its digits when q ~ p.
// `input_is_masked`: either logit is -inf. kMixed: alpha > 0 (at alpha = 0, m = s exactly).
template <bool kReverse, bool kMixed>
DISTILLM_HD EntryTerms entry_terms(float log_q_over_p, float q, float p, bool input_is_masked,
                                   const Constants& c) {
  const float f = kReverse ? q : p;
  const float s = kReverse ? p : q;
  // With y = odds * s / f, m / f = alpha (1 + y): log(f / m) = -log(alpha) - log1p(y),
  // alpha f / m = 1 / (1 + y), (1 - alpha) s / m = y / (1 + y). Working from y keeps every
  // quantity exact to float precision where s << f, e.g. near the optimum of SRKL, which
  // log f - log m (two rounded logs of similar size) is not.
  float log_f_over_m, alpha_f_over_m, one_minus_alpha_s_over_m, g;
  if (kMixed) {
    // f below 1e-30 is clamped: such entries add < 1e-28 to anything. NaN passes the clamps.
    const float raw_y = c.odds * (s / (f < 1e-30f ? 1e-30f : f));
    const float y = raw_y > c.max_y ? c.max_y : raw_y;
    const float log1p_y = log1p_nonnegative(y);
    alpha_f_over_m = 1.0f / (1.0f + y);
    one_minus_alpha_s_over_m = y * alpha_f_over_m;
    log_f_over_m = c.neg_log_alpha - log1p_y;
    // SRKL: g = 1 - log(alpha) - log1p(y) - 1 / (1 + y) = -log(alpha) + (y / (1 + y) - log1p(y)).
    // Only the last part is kept: where q is large, g_k - G keeps just a few digits of g, so
    // g must not carry the constant's rounding (1 ulp of 1 - log(alpha) >= 1): y / (1 + y) -
    // log1p(y) is ~ -y^2 / 2, exact to ~3 ulp of y, where s << f. That constant, not the
    // exp/log polynomials, the sum order or FMA contraction, is what put the AVX2 copy over
    // its float64 bound: with it, every copy's SRKL gradient at tau = 0.5 erred 1.4-5.7x the
    // bound's rtol, and the copies differed only in how far.
    g = one_minus_alpha_s_over_m - log1p_y;
  } else {  // alpha = 0: m = s
    log_f_over_m = kReverse ? log_q_over_p : -log_q_over_p;
    alpha_f_over_m = 0.0f;
    one_minus_alpha_s_over_m = 1.0f;
    g = log_f_over_m;  // SRKL: g = log(q / p) + 1, less the constant, as above
  }
  const bool dropped = input_is_masked || f == 0.0f;
  if (kReverse) {
    // A dropped entry's g is 0, so less the constant it is -constant; its q g still enters
    // G, which must lose the same constant times sum q.
    const float shifted_g = dropped ? (kMixed ? -c.neg_log_alpha : -1.0f) : g;
    return {dropped ? 0.0f : f * log_f_over_m, f * shifted_g, shifted_g};
  }
  // SKL: q g = q * (-(1 - alpha) p / m) = -f (1 - alpha) s / m
  const float qg = -f * one_minus_alpha_s_over_m;
  return {dropped ? 0.0f : f * log_f_over_m, dropped ? 0.0f : qg, 0.0f};
}

// G = sum_v q_v g_v as an unevaluated sum hi + lo of two floats: near the mode of a sharp q,
// g_k - G keeps only a few of G's digits, so G is summed in double and kept to ~48 bits.
struct SplitSum {
  float hi, lo;
};

// d loss / d z_k * tau = q_k (g_k - G). `saved` is what the schedule kept of the entry:
// g for SRKL, where subtracting G before multiplying by q avoids cancelling two rounded
// products near the mode of q; q g for SKL, whose g is unbounded but q g is not.
template <bool kReverse>
DISTILLM_HD float entry_grad(float q, float saved, SplitSum sum_qg) {
  return kReverse ? q * ((saved - sum_qg.hi) - sum_qg.lo) : (saved - q * sum_qg.hi) - q * sum_qg.lo;
}

template <bool kReverse>
DISTILLM_HD float saved_for_grad(const EntryTerms& e) {
  return kReverse ? e.g : e.q_times_g;
}

// The offset of row `row` in a tensor whose leading dimensions (all but the last) have the
// given sizes and strides, innermost last. Lets the kernels read sliced logits without a copy.
constexpr int kMaxLeadingDims = 4;

struct RowLayout {
  int num_dims;
  int64_t sizes[kMaxLeadingDims];
  int64_t strides[kMaxLeadingDims];
};

DISTILLM_HD int64_t row_offset(const RowLayout& layout, int64_t row) {
  int64_t offset = 0;
  for (int d = layout.num_dims - 1; d >= 0; --d) {
    const int64_t size = layout.sizes[d];
    offset += (row % size) * layout.strides[d];
    row /= size;
  }
  return offset;
}

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Raw-pointer view of one skew_kl forward call: what a schedule needs, nothing torch.
struct ForwardParams {
  const void* student;  // (rows, vocab) rows as described by student_rows, last dim contiguous
  const void* teacher;
  DType student_dtype;
  DType teacher_dtype;
  RowLayout student_rows;
  RowLayout teacher_rows;
  int64_t num_rows;
  int64_t vocab;
  const int64_t* labels;  // (rows,) contiguous, or nullptr
  int64_t ignore_index;
  float* row_loss;        // (rows,) out
  void* grad;             // (rows, vocab) contiguous, student dtype; nullptr: loss only
  float grad_scale;       // the kernels write q (g - G) times this: the caller's scale over tau
  const float* grad_divisor;  // nullptr, or one float the gradient is also divided by (the
                              // CUDA kernel reads it on the device; the CPU folds it first)
  Constants constants;
  bool reverse;
};

// The CUDA kernel (and its emulation) index the entries of a row with 32 bits; an index may step
// a block's stride past the row's end, so rows stay far below 2^31 entries.
constexpr int64_t kMaxCudaVocab = int64_t{1} << 30;

// The factor the kernels write the gradient with: grad_scale, divided by *grad_divisor if set.
DISTILLM_HD float gradient_factor(const ForwardParams& prm) {
  return prm.grad_divisor ? prm.grad_scale / *prm.grad_divisor : prm.grad_scale;
}

}  // namespace distillm::skew_kl_impl
