// CPU schedule of the skew KL forward (loss, and the gradient when asked for).
//
// Rows are spread over threads with at::parallel_for. One row is read in four passes, all
// of which stay in cache for vocabularies up to ~256k: max, exp-sums, loss terms, gradient.
// The loops are plain `omp simd` loops over the shared math header, so GCC/Clang vectorize
// them for whatever vector ISA the build targets, and `target_clones` adds an AVX2 + FMA
// clone chosen at load time, so a portable build still runs the wide code where it can.
#include "skew_kl_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define DISTILLM_CPU_CLONES __attribute__((target_clones("avx2,default")))
#else
#define DISTILLM_CPU_CLONES
#endif

namespace distillm::skew_kl_impl {
namespace {

template <typename T>
inline float to_float(T value) { return static_cast<float>(value); }

template <typename T>
inline T from_float(float value) { return static_cast<T>(value); }

// Per-thread row buffers: exps, then probabilities and q*g of one row.
struct RowScratch {
  std::vector<float> student;
  std::vector<float> teacher;
  explicit RowScratch(int64_t vocab) : student(vocab), teacher(vocab) {}
};

template <typename S, typename T>
DISTILLM_CPU_CLONES void row_max(const S* z, const T* u, int64_t vocab, float& max_z, float& max_u) {
  float mz = kNegInf, mu = kNegInf;
#pragma omp simd reduction(max : mz, mu)
  for (int64_t v = 0; v < vocab; ++v) {
    mz = max_of(mz, to_float(z[v]));
    mu = max_of(mu, to_float(u[v]));
  }
  max_z = mz;
  max_u = mu;
}

// Fills the scratch with exp((logit - max) / tau) and returns the two sums.
template <typename S, typename T>
DISTILLM_CPU_CLONES void row_exps(const S* z, const T* u, int64_t vocab, float max_z, float max_u,
                                  float inv_tau, float* exp_z, float* exp_u, float& sum_z,
                                  float& sum_u) {
  float sz = 0.0f, su = 0.0f;
#pragma omp simd reduction(+ : sz, su)
  for (int64_t v = 0; v < vocab; ++v) {
    const float ez = exp_nonpositive((to_float(z[v]) - max_z) * inv_tau);
    const float eu = exp_nonpositive((to_float(u[v]) - max_u) * inv_tau);
    exp_z[v] = ez;
    exp_u[v] = eu;
    sz += ez;
    su += eu;
  }
  sum_z = sz;
  sum_u = su;
}

// Sums the loss terms and G = sum q g. With kWithGrad, overwrites the scratch with q and q*g.
template <bool kReverse, bool kMixed, bool kWithGrad, typename S, typename T>
DISTILLM_CPU_CLONES void row_terms(const S* z, const T* u, int64_t vocab, float max_z, float max_u,
                                   float log_sum_z, float log_sum_u, float inv_sum_z,
                                   float inv_sum_u, const Constants& c, float* scratch_z,
                                   float* scratch_u, float& loss, float& sum_qg) {
  float loss_acc = 0.0f, qg_acc = 0.0f;
  const float inv_tau = c.inv_temperature;
#pragma omp simd reduction(+ : loss_acc, qg_acc)
  for (int64_t v = 0; v < vocab; ++v) {
    const float zv = to_float(z[v]);
    const float uv = to_float(u[v]);
    const float log_q = (zv - max_z) * inv_tau - log_sum_z;
    const float log_p = (uv - max_u) * inv_tau - log_sum_u;
    const float q = scratch_z[v] * inv_sum_z;
    const float p = scratch_u[v] * inv_sum_u;
    float term, qg;
    entry_terms<kReverse, kMixed>(log_q, q, log_p, p, zv == kNegInf || uv == kNegInf, c, term, qg);
    loss_acc += term;
    qg_acc += qg;
    if (kWithGrad) {
      scratch_z[v] = q;
      scratch_u[v] = qg;
    }
  }
  loss = loss_acc;
  sum_qg = qg_acc;
}

template <typename S>
DISTILLM_CPU_CLONES void row_grad(const float* q, const float* qg, int64_t vocab, float sum_qg,
                                  float scale, S* grad) {
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) {
    grad[v] = from_float<S>((qg[v] - q[v] * sum_qg) * scale);
  }
}

template <typename S>
void zero_row(S* grad, int64_t vocab) {
  for (int64_t v = 0; v < vocab; ++v) grad[v] = from_float<S>(0.0f);
}

template <bool kReverse, bool kMixed, typename S, typename T>
void forward_rows(const ForwardParams& prm, int64_t begin, int64_t end) {
  const int64_t vocab = prm.vocab;
  const Constants& c = prm.constants;
  RowScratch scratch(vocab);
  for (int64_t row = begin; row < end; ++row) {
    S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
    prm.row_loss[row] = 0.0f;
    if (prm.labels != nullptr && prm.labels[row] == prm.ignore_index) {
      if (grad) zero_row(grad, vocab);
      continue;
    }
    const S* z = static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row);
    const T* u = static_cast<const T*>(prm.teacher) + row_offset(prm.teacher_rows, row);
    float max_z, max_u;
    row_max(z, u, vocab, max_z, max_u);
    if (max_z == kNegInf || max_u == kNegInf) {  // every entry dropped
      if (grad) zero_row(grad, vocab);
      continue;
    }
    float sum_z, sum_u;
    row_exps(z, u, vocab, max_z, max_u, c.inv_temperature, scratch.student.data(),
             scratch.teacher.data(), sum_z, sum_u);
    const float log_sum_z = std::log(sum_z), log_sum_u = std::log(sum_u);
    const float inv_sum_z = 1.0f / sum_z, inv_sum_u = 1.0f / sum_u;
    float loss, sum_qg;
    if (grad) {
      row_terms<kReverse, kMixed, true>(z, u, vocab, max_z, max_u, log_sum_z, log_sum_u, inv_sum_z,
                                        inv_sum_u, c, scratch.student.data(),
                                        scratch.teacher.data(), loss, sum_qg);
      row_grad(scratch.student.data(), scratch.teacher.data(), vocab, sum_qg, c.inv_temperature,
               grad);
    } else {
      row_terms<kReverse, kMixed, false>(z, u, vocab, max_z, max_u, log_sum_z, log_sum_u,
                                         inv_sum_z, inv_sum_u, c, scratch.student.data(),
                                         scratch.teacher.data(), loss, sum_qg);
    }
    prm.row_loss[row] = loss;
  }
}

template <typename S, typename T>
void forward_typed(const ForwardParams& prm) {
  // Rows are long (a whole vocabulary), so a handful per task already amortizes the overhead.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(prm.vocab, 1));
  const bool mixed = prm.constants.alpha != 0.0f;
  at::parallel_for(0, prm.num_rows, grain, [&](int64_t begin, int64_t end) {
    if (prm.reverse) {
      mixed ? forward_rows<true, true, S, T>(prm, begin, end)
            : forward_rows<true, false, S, T>(prm, begin, end);
    } else {
      mixed ? forward_rows<false, true, S, T>(prm, begin, end)
            : forward_rows<false, false, S, T>(prm, begin, end);
    }
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
