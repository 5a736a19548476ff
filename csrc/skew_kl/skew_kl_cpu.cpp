// CPU schedule of the skew KL forward (loss, and the gradient when asked for).
//
// Rows are spread over threads with at::parallel_for. One row goes through four passes that
// stay in cache for vocabularies up to ~256k: max (converting 16-bit rows to float once),
// exp-sums, loss terms, gradient. Only the first and last know the input dtypes, so the math
// passes are compiled once, for float.
// The loops are plain `omp simd` loops over the shared math header, so GCC/Clang vectorize
// them for whatever vector ISA the build targets, and `target_clones` adds x86-64-v4 (AVX-512)
// and x86-64-v3 (AVX2 + FMA + F16C) clones chosen at load time, so a portable build still runs
// the wide code where it can. AVX-512 is worth its clone even where it runs at 256-bit width
// (AMD Zen 4): the masks replace the blends of the selects, and 32 registers end the spills
// of the loss-terms loop (1.6 -> 1.0 ns per entry, one core).
#include "skew_kl_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DISTILLM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DISTILLM_CPU_CLONES
#endif

namespace distillm::skew_kl_impl {
namespace {

template <typename T>
inline float to_float(T value) { return static_cast<float>(value); }

template <typename T>
inline T from_float(float value) { return static_cast<T>(value); }

// One thread's row buffers: the rows as float (16-bit inputs only), then exps, then q and
// what entry_grad needs.
struct RowScratch {
  std::vector<float> student, teacher, student_exp, teacher_exp;
  RowScratch(int64_t vocab, bool convert_student, bool convert_teacher)
      : student(convert_student ? vocab : 0), teacher(convert_teacher ? vocab : 0),
        student_exp(vocab), teacher_exp(vocab) {}
};

// The row maxima, and whether the row has a -inf entry. Rows that are not float are converted
// into `out` on the way and `out` is returned; float rows are used where they are.
template <typename T>
DISTILLM_CPU_CLONES const float* row_as_float(const T* row, int64_t vocab, float* out, float& max,
                                              int& neg_inf) {
  constexpr bool kConvert = !std::is_same_v<T, float>;
  float m = kNegInf;
  int found = 0;
#pragma omp simd reduction(max : m) reduction(| : found)
  for (int64_t v = 0; v < vocab; ++v) {
    const float x = to_float(row[v]);
    if (kConvert) out[v] = x;
    m = max_of(m, x);
    found |= x == kNegInf;
  }
  max = m;
  neg_inf |= found;
  if constexpr (kConvert) {
    return out;
  } else {
    return row;
  }
}

// The sums of the loss-terms pass are taken in float over blocks of kSumBlock entries and the
// blocks added in double: a plain float sum of 2^18 entries is off by ~1e-5.
constexpr int64_t kSumBlock = 1024;

// The softmax denominators need more: their rounding scales every q or p of the row, and
// log(sum_u / sum_z) enters every loss term, so a 1e-7 error there is a 1e-7 error in a loss
// between nearly equal distributions. They are float sums in kLanes lanes with Kahan
// compensation, about as exact as summing in double: measured, +7% on the exp pass, where
// converting every entry to double costs +60%.
constexpr int64_t kLanes = 16;

struct LaneSum {
  float sum[kLanes] = {};
  float carry[kLanes] = {};  // what the last addition to each lane lost, negated

  void add(int64_t lane, float x) {
    const float y = x - carry[lane];
    const float t = sum[lane] + y;
    carry[lane] = (t - sum[lane]) - y;
    sum[lane] = t;
  }
  double total() const {
    double result = 0.0;
    for (int64_t lane = 0; lane < kLanes; ++lane) result += double(sum[lane]) - double(carry[lane]);
    return result;
  }
};

// Fills exp_* with exp((logit - max) / tau) and returns the two sums.
DISTILLM_CPU_CLONES void row_exps(const float* z, const float* u, int64_t vocab, float max_z,
                                  float max_u, float inv_tau, float* exp_z, float* exp_u,
                                  double& sum_z, double& sum_u) {
  LaneSum sz, su;
  const auto entry = [&](int64_t v, int64_t lane) {
    const float ez = exp_nonpositive((z[v] - max_z) * inv_tau);
    const float eu = exp_nonpositive((u[v] - max_u) * inv_tau);
    exp_z[v] = ez;
    exp_u[v] = eu;
    sz.add(lane, ez);
    su.add(lane, eu);
  };
  const int64_t full = vocab - vocab % kLanes;
  for (int64_t start = 0; start < full; start += kLanes) {
#pragma omp simd
    for (int64_t lane = 0; lane < kLanes; ++lane) entry(start + lane, lane);
  }
  for (int64_t v = full; v < vocab; ++v) entry(v, v - full);
  sum_z = sz.total();
  sum_u = su.total();
}

struct RowSoftmax {
  float max_z, max_u, inv_sum_z, inv_sum_u;
  float log_sum_u_over_sum_z;  // log q - log p = ((z - max_z) - (u - max_u)) / tau + this
};

// Sums the loss terms and G = sum q g. kMasked: the row has -inf logits to drop.
// kWithGrad: overwrites the exps with q and what entry_grad needs.
template <bool kReverse, bool kMixed, bool kMasked, bool kWithGrad>
DISTILLM_CPU_CLONES void row_terms(const float* z, const float* u, int64_t vocab,
                                   const RowSoftmax& sm, const Constants& c, float* exp_z,
                                   float* exp_u, float& loss, double& sum_qg) {
  double loss_acc = 0.0, qg_acc = 0.0, f_acc = 0.0;
  const float inv_tau = c.inv_temperature;
  for (int64_t start = 0; start < vocab; start += kSumBlock) {
    const int64_t stop = std::min(vocab, start + kSumBlock);
    float block_loss = 0.0f, block_qg = 0.0f, block_f = 0.0f;
#pragma omp simd reduction(+ : block_loss, block_qg, block_f)
    for (int64_t v = start; v < stop; ++v) {
      const float log_q_over_p = ((z[v] - sm.max_z) - (u[v] - sm.max_u)) * inv_tau + sm.log_sum_u_over_sum_z;
      const float q = exp_z[v] * sm.inv_sum_z;
      const float p = exp_u[v] * sm.inv_sum_u;
      const bool masked = kMasked && (z[v] == kNegInf || u[v] == kNegInf);
      const EntryTerms e = entry_terms<kReverse, kMixed>(log_q_over_p, q, p, masked, c);
      block_loss += e.term;
      block_qg += e.q_times_g;
      block_f += kReverse ? q : p;
      if (kWithGrad) {
        exp_z[v] = q;
        exp_u[v] = saved_for_grad<kReverse>(e);
      }
    }
    loss_acc += block_loss;
    qg_acc += block_qg;
    f_acc += block_f;
  }
  // The rounding of 1 / sum(exp) scales every f of the row alike; dividing by the f's own sum
  // removes that shared error, which G = sum q g would otherwise carry into every g_k - G.
  loss = static_cast<float>(loss_acc / f_acc);
  sum_qg = qg_acc / f_acc;
}

template <bool kReverse, typename S>
DISTILLM_CPU_CLONES void row_grad(const float* q, const float* saved, int64_t vocab,
                                  SplitSum sum_qg, float scale, S* grad) {
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) {
    grad[v] = from_float<S>(entry_grad<kReverse>(q[v], saved[v], sum_qg) * scale);
  }
}

template <typename S>
void fill_row(S* grad, int64_t vocab, float value) {
  std::fill(grad, grad + vocab, from_float<S>(value));
}

// A row whose maximum stays -inf is dropped (every entry -inf), unless the maximum stayed -inf
// because every entry is NaN (comparisons ignore NaN): then the row's loss and gradient are NaN.
bool has_nan(const float* row, int64_t vocab) {
  return std::any_of(row, row + vocab, [](float x) { return std::isnan(x); });
}

// Picks the row_terms instantiation for this call and row.
template <bool kWithGrad>
void dispatch_row_terms(bool reverse, bool mixed, bool masked, const float* z, const float* u,
                        int64_t vocab, const RowSoftmax& sm, const Constants& c, float* exp_z,
                        float* exp_u, float& loss, double& sum_qg) {
#define DISTILLM_ROW_TERMS(R, M, K) \
  return row_terms<R, M, K, kWithGrad>(z, u, vocab, sm, c, exp_z, exp_u, loss, sum_qg)
  if (reverse) {
    if (mixed) {
      if (masked) DISTILLM_ROW_TERMS(true, true, true);
      DISTILLM_ROW_TERMS(true, true, false);
    }
    if (masked) DISTILLM_ROW_TERMS(true, false, true);
    DISTILLM_ROW_TERMS(true, false, false);
  }
  if (mixed) {
    if (masked) DISTILLM_ROW_TERMS(false, true, true);
    DISTILLM_ROW_TERMS(false, true, false);
  }
  if (masked) DISTILLM_ROW_TERMS(false, false, true);
  DISTILLM_ROW_TERMS(false, false, false);
#undef DISTILLM_ROW_TERMS
}

template <typename S, typename T>
void forward_rows(const ForwardParams& prm, int64_t begin, int64_t end) {
  const int64_t vocab = prm.vocab;
  const Constants& c = prm.constants;
  const bool mixed = c.alpha != 0.0f;
  RowScratch scratch(vocab, !std::is_same_v<S, float>, !std::is_same_v<T, float>);
  float* exp_z = scratch.student_exp.data();
  float* exp_u = scratch.teacher_exp.data();
  for (int64_t row = begin; row < end; ++row) {
    S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
    prm.row_loss[row] = 0.0f;
    if (prm.labels != nullptr && prm.labels[row] == prm.ignore_index) {
      if (grad) fill_row(grad, vocab, 0.0f);
      continue;
    }
    RowSoftmax sm;
    int neg_inf = 0;
    const float* z = row_as_float(static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row),
                                  vocab, scratch.student.data(), sm.max_z, neg_inf);
    const float* u = row_as_float(static_cast<const T*>(prm.teacher) + row_offset(prm.teacher_rows, row),
                                  vocab, scratch.teacher.data(), sm.max_u, neg_inf);
    if (sm.max_z == kNegInf || sm.max_u == kNegInf) {  // every entry dropped, or NaN
      const float value = has_nan(z, vocab) || has_nan(u, vocab) ? std::nanf("") : 0.0f;
      prm.row_loss[row] = value;
      if (grad) fill_row(grad, vocab, value);
      continue;
    }
    double sum_z, sum_u;
    row_exps(z, u, vocab, sm.max_z, sm.max_u, c.inv_temperature, exp_z, exp_u, sum_z, sum_u);
    sm.inv_sum_z = static_cast<float>(1.0 / sum_z);
    sm.inv_sum_u = static_cast<float>(1.0 / sum_u);
    sm.log_sum_u_over_sum_z = static_cast<float>(std::log(sum_u / sum_z));
    float loss;
    double sum_qg;
    if (grad) {
      dispatch_row_terms<true>(prm.reverse, mixed, neg_inf, z, u, vocab, sm, c, exp_z, exp_u, loss, sum_qg);
      const float hi = static_cast<float>(sum_qg);
      const SplitSum split{hi, static_cast<float>(sum_qg - hi)};
      if (prm.reverse) {
        row_grad<true>(exp_z, exp_u, vocab, split, c.inv_temperature, grad);
      } else {
        row_grad<false>(exp_z, exp_u, vocab, split, c.inv_temperature, grad);
      }
    } else {
      dispatch_row_terms<false>(prm.reverse, mixed, neg_inf, z, u, vocab, sm, c, exp_z, exp_u, loss, sum_qg);
    }
    prm.row_loss[row] = loss;
  }
}

template <typename S, typename T>
void forward_typed(const ForwardParams& prm) {
  // Rows are long (a whole vocabulary), so a handful per task already amortizes the overhead.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(prm.vocab, 1));
  at::parallel_for(0, prm.num_rows, grain, [&](int64_t begin, int64_t end) {
    forward_rows<S, T>(prm, begin, end);
  });
}

template <typename S>
void forward_with_student(const ForwardParams& prm) {
  switch (prm.teacher_dtype) {
    case DType::kFloat32: return forward_typed<S, float>(prm);
    case DType::kFloat16: return forward_typed<S, c10::Half>(prm);
    case DType::kBFloat16: return forward_typed<S, c10::BFloat16>(prm);
  }
  TORCH_CHECK(false, "skew_kl: unsupported teacher dtype code ", static_cast<int>(prm.teacher_dtype));
}

}  // namespace

void skew_kl_forward_cpu(const ForwardParams& prm) {
  switch (prm.student_dtype) {
    case DType::kFloat32: return forward_with_student<float>(prm);
    case DType::kFloat16: return forward_with_student<c10::Half>(prm);
    case DType::kBFloat16: return forward_with_student<c10::BFloat16>(prm);
  }
  TORCH_CHECK(false, "skew_kl: unsupported student dtype code ", static_cast<int>(prm.student_dtype));
}

}  // namespace distillm::skew_kl_impl
