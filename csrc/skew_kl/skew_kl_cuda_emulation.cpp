// Host emulation of the CUDA skew KL kernel: its formulas (skew_kl_gpu_math.h) with each MUFU
// result moved by the instruction's documented worst-case error (approx_math.h), and its split
// of a row among 512 threads, vector steps of 8 entries and per-thread partial sums merged at
// the end. With DISTILLM_CUDA_EMULATION set, the CPU op runs this instead of its own kernels,
// so the op-family tests check the GPU's numbers against the float64 reference on a machine
// without a GPU (test_cuda_emulation.py). Only the order of the final block sums differs.
#include "skew_kl_cuda_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "skew_kl_gpu_math.h"

namespace distillm::skew_kl_impl {
namespace {

using namespace gpu;

constexpr int kThreads = 512;  // as skew_kl_cuda.cu launches

template <typename T>
float load(const T* row, int64_t v) {
  return static_cast<float>(row[v]);
}

// Runs fn(zs, us) over the entries of `thread`, as the kernel's for_each_entry does.
template <typename S, typename T, typename O, typename Fn>
void for_each_entry(const S* z, const T* u, const O* out, int64_t vocab, int thread, Fn&& fn) {
  const RowSpan span = row_span(z, u, out, vocab);
  for_thread_entries(
      thread, kThreads, vocab, span,
      [&](int64_t v) {
        float zs[kChunk], us[kChunk];
        for (int j = 0; j < kChunk; ++j) {
          zs[j] = load(z, v + j);
          us[j] = load(u, v + j);
        }
        fn(v, zs, us);
      },
      [&](int64_t v) {
        const float zs[1] = {load(z, v)}, us[1] = {load(u, v)};
        fn(v, zs, us);
      });
}

template <typename S, typename T, bool kReverse, bool kMixed>
void emulate_row(const ForwardParams& prm, const CallConstants& c, int64_t row) {
  const int64_t vocab = prm.vocab;
  S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
  const S* z = static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row);
  const T* u = static_cast<const T*>(prm.teacher) + row_offset(prm.teacher_rows, row);
  const bool skip = prm.labels != nullptr && prm.labels[row] == prm.ignore_index;
  const S* no_output = nullptr;

  constexpr bool kTwoPasses = !kReverse && !kMixed;
  std::vector<PairSums<kTwoPasses>> pass1(kThreads);
  float max_z = kNegInf, max_u = kNegInf;
  for (int t = 0; t < kThreads && !skip; ++t) {
    for_each_entry(z, u, no_output, vocab, t,
                   [&](int64_t, const auto& zs, const auto& us) { add_pair(pass1[t], zs, us, c.k); });
    max_z = fmaxf(max_z, pass1[t].student.max);
    max_u = fmaxf(max_u, pass1[t].teacher.max);
  }
  double sums_z = 0.0, sums_u = 0.0, dropped_mass = 0.0;
  for (int t = 0; t < kThreads; ++t) {
    sums_z += sum_at(pass1[t].student, max_z, c.k);
    sums_u += sum_at(pass1[t].teacher, max_u, c.k);
    if (kTwoPasses) dropped_mass += at_row_max(pass1[t].dropped_mass, pass1[t].teacher, max_u, c.k);
  }

  float value;
  if (uniform_row(skip, vocab, max_z, max_u, sums_z, sums_u, value)) {
    prm.row_loss[row] = value;
    for (int64_t v = 0; grad && v < vocab; ++v) grad[v] = static_cast<S>(value);
    return;
  }

  const RowConstants r = row_constants(max_z, max_u, sums_z, sums_u, c, gradient_factor(prm));
  float loss = 0.0f, sum_qg = 0.0f, sum_f = 0.0f;
  if (kTwoPasses && grad) {  // FKL: G from pass 1; loss and gradient in one pass
    sum_qg = fkl_sum_qg(sums_u, dropped_mass);
    for (int t = 0; t < kThreads; ++t) {
      float thread_loss = 0.0f, thread_f = 0.0f;
      for_each_entry(z, u, grad, vocab, t, [&](int64_t v, const auto& zs, const auto& us) {
        for (size_t j = 0; j < sizeof(zs) / sizeof(float); ++j) {
          const Pass2Terms e = plain_terms<false>(zs[j], us[j], r);
          thread_loss += e.term;
          thread_f += e.f;
          grad[v + j] = static_cast<S>(pass3_grad<false, false>(zs[j], us[j], r, c, sum_qg));
        }
      });
      loss += thread_loss;
      sum_f += thread_f;
    }
    prm.row_loss[row] = loss / sum_f;
    return;
  }
  for (int t = 0; t < kThreads; ++t) {
    float thread_loss = 0.0f, thread_qg = 0.0f, thread_f = 0.0f;
    for_each_entry(z, u, no_output, vocab, t, [&](int64_t, const auto& zs, const auto& us) {
      for (size_t j = 0; j < sizeof(zs) / sizeof(float); ++j) {
        const Pass2Terms e = pass2_terms<kReverse, kMixed>(zs[j], us[j], r, c);
        thread_loss += e.term;
        thread_qg += e.q_times_g;
        thread_f += e.f;
      }
    });
    loss += thread_loss;
    sum_qg += thread_qg;
    sum_f += thread_f;
  }
  loss /= sum_f;
  sum_qg /= sum_f;
  prm.row_loss[row] = loss;
  if (!grad) return;
  for (int t = 0; t < kThreads; ++t) {
    for_each_entry(z, u, grad, vocab, t, [&](int64_t v, const auto& zs, const auto& us) {
      for (size_t j = 0; j < sizeof(zs) / sizeof(float); ++j) {
        grad[v + j] = static_cast<S>(pass3_grad<kReverse, kMixed>(zs[j], us[j], r, c, sum_qg));
      }
    });
  }
}

template <typename S, typename T>
void emulate(const ForwardParams& prm) {
  const CallConstants c = call_constants(prm.constants);
  const bool mixed = prm.constants.alpha != 0.0f;
  for (int64_t row = 0; row < prm.num_rows; ++row) {
    if (prm.reverse) {
      mixed ? emulate_row<S, T, true, true>(prm, c, row) : emulate_row<S, T, true, false>(prm, c, row);
    } else {
      mixed ? emulate_row<S, T, false, true>(prm, c, row) : emulate_row<S, T, false, false>(prm, c, row);
    }
  }
}

template <typename S>
void emulate_with_student(const ForwardParams& prm) {
  switch (prm.teacher_dtype) {
    case DType::kFloat32: return emulate<S, float>(prm);
    case DType::kFloat16: return emulate<S, c10::Half>(prm);
    case DType::kBFloat16: return emulate<S, c10::BFloat16>(prm);
  }
}

std::optional<approx::ErrorModel> requested_model() {
  const char* value = std::getenv("DISTILLM_CUDA_EMULATION");
  if (value == nullptr || *value == '\0') return std::nullopt;
  if (std::strcmp(value, "hashed") == 0) return approx::ErrorModel::kHashed;
  if (std::strcmp(value, "high") == 0) return approx::ErrorModel::kHigh;
  if (std::strcmp(value, "low") == 0) return approx::ErrorModel::kLow;
  TORCH_CHECK(false, "DISTILLM_CUDA_EMULATION=", value,
              " is not an error model; use one of hashed, high, low (or leave it unset)");
}

}  // namespace

bool cuda_emulation_requested() {
  static const std::optional<approx::ErrorModel> model = requested_model();
  if (model) approx::error_model = *model;
  return model.has_value();
}

void skew_kl_forward_cuda_emulation(const ForwardParams& prm) {
  switch (prm.student_dtype) {
    case DType::kFloat32: return emulate_with_student<float>(prm);
    case DType::kFloat16: return emulate_with_student<c10::Half>(prm);
    case DType::kBFloat16: return emulate_with_student<c10::BFloat16>(prm);
  }
}

}  // namespace distillm::skew_kl_impl
