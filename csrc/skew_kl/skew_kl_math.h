// Torch-free element and row math of the skew KL losses, shared by the CPU and CUDA schedules.
//
// Per row (student logits z, teacher logits u, temperature tau):
//   q = softmax(z / tau), p = softmax(u / tau)
//   forward (SKL):  first f = p, second s = q;  reverse (SRKL): f = q, s = p
//   m = alpha f + (1 - alpha) s,  loss = sum_v f_v (log f_v - log m_v)
//   g_v = dloss/dq_v,  dloss/dz_k = (1/tau) q_k (g_k - sum_v q_v g_v)
// Entries whose logit is -inf in either input, or whose f underflows to 0, are dropped (term 0,
// g 0). The schedules keep G = sum_v q_v g_v per row and write (q_k g_k - q_k G) / tau.
//
// exp and log are written out as branch-free polynomials so that the CPU loops vectorize
// without -ffast-math and the CUDA kernels produce the same numbers as the CPU ones.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DISTILLM_HD __host__ __device__ __forceinline__
#else
#define DISTILLM_HD inline
#endif

namespace distillm::skew_kl_impl {

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kFloatMin = 1.17549435e-38f;  // smallest normal float

// Everything about one call that is the same for every row.
struct Constants {
  float alpha;            // weight of the first distribution inside the mixture
  float one_minus_alpha;
  float log_alpha;        // -inf when alpha == 0
  float log_one_minus_alpha;
  float inv_temperature;
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
  const int32_t n_int = bits_of(shifted) - bits_of(kRoundMagic);
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
  const float result = float_of_bits(bits_of(mantissa) + (n_int << 23));
  return x < kUnderflow ? 0.0f : (x != x ? x : result);
}

// log(x) for positive normal x (callers clamp to kFloatMin). About 1 ulp (Cephes coefficients).
DISTILLM_HD float log_positive(float x) {
  constexpr float kSqrtHalf = 0.707106781186547524f;
  const int32_t bits = bits_of(x);
  float exponent = static_cast<float>((bits >> 23) - 126);
  float m = float_of_bits((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool small = m < kSqrtHalf;
  exponent = small ? exponent - 1.0f : exponent;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float m2 = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float y = poly * m * m2;
  y = y + exponent * -2.12194440e-4f;
  y = y - 0.5f * m2;
  const float result = m + y + exponent * 0.693359375f;
  return x != x ? x : result;
}

// Softmax statistics of one row of scaled logits: log q_v = (x_v - max) - log_sum.
struct SoftmaxStats {
  float max;      // of the scaled logits
  float log_sum;  // log sum_v exp(x_v - max)
};

// One vocabulary entry. `input_is_masked`: either logit is -inf. Returns the loss term and
// q_v * g_v; both are 0 on dropped entries.
template <bool kReverse, bool kMixed>
DISTILLM_HD void entry_terms(float log_q, float q, float log_p, float p, bool input_is_masked,
                             const Constants& c, float& term, float& q_times_g) {
  const float log_f = kReverse ? log_q : log_p;
  const float f = kReverse ? q : p;
  const float log_s = kReverse ? log_p : log_q;
  const float s = kReverse ? p : q;
  float log_m = log_s;
  float alpha_f_over_m = 0.0f;          // alpha f / m
  float one_minus_alpha_s_over_m = 1.0f;  // (1 - alpha) s / m
  if (kMixed) {
    const float mix = max_of(c.alpha * f + c.one_minus_alpha * s, kFloatMin);
    // log m is at least both of its parts' logs: this keeps it exact where f or s underflow.
    log_m = max_of(max_of(log_positive(mix), c.log_alpha + log_f), c.log_one_minus_alpha + log_s);
    const float inv_mix = 1.0f / mix;
    alpha_f_over_m = c.alpha * f * inv_mix;
    one_minus_alpha_s_over_m = c.one_minus_alpha * s * inv_mix;
  }
  const float log_f_over_m = log_f - log_m;
  // SKL:  q g = q * (-(1 - alpha) p / m) = -f (1 - alpha) s / m
  // SRKL: g = log(q / m) + 1 - alpha q / m, times q = f
  const float qg = kReverse ? f * (log_f_over_m + 1.0f - alpha_f_over_m)
                            : -f * one_minus_alpha_s_over_m;
  const bool dropped = input_is_masked || f == 0.0f;
  term = dropped ? 0.0f : f * log_f_over_m;
  q_times_g = dropped ? 0.0f : qg;
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
  Constants constants;
  bool reverse;
};

}  // namespace distillm::skew_kl_impl
