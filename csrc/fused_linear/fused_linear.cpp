// distillm::_fused_linear_kd_forward and _fused_linear_kd_topk_forward: the chunk loop of the
// fused-linear losses, with their input checks and CPU / CUDA / Meta registrations (the
// per-chunk math is in chunk_math.h). The two differ only in the teacher's side of a chunk:
// logits from the teacher's hidden states, or the sparse teacher's rows (topk/topk.h).
//
// Only positions whose label is not ignore_index are gathered, a chunk of them at a time. For
// each chunk c, in float32 whatever the input dtype:
//   z = h_s[c] @ W_s[:V].T (+ b_s),  u = h_t[c] @ W_t[:V].T (+ b_t)        two GEMMs (one: top-k)
//   loss rows and g = d(loss)/dz from the existing row kernel (skew KL), or ATen (TVD, CE)
//   grad_h_s[c] = g @ W_s[:V],  grad_W_s[:V] += g.T @ h_s[c],  grad_b_s[:V] += sum(g)
// so no [positions, V] tensor exists, and prompt and padding cost no FLOPs. The loop is ATen
// calls (MKL/oneDNN on CPU, cuBLAS on CUDA) around the row kernels, so one implementation
// serves both devices.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "fused_linear/chunk_math.h"
#include "topk/topk.h"

namespace distillm::fused_linear_impl {
namespace {

constexpr const char* kOp = "fused_linear_kd";

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_model(const char* op, const char* name, const at::Tensor& hidden, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& student_hidden) {
  TORCH_CHECK(is_float_type(hidden.scalar_type()), op, ": ", name,
              "_hidden must be float32, float16 or bfloat16, got ", hidden.scalar_type());
  TORCH_CHECK(hidden.dim() >= 1, op, ": ", name,
              "_hidden must have at least one dimension (the hidden size), got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": ", name, "_weight must be a (vocabulary, hidden) "
              "matrix, got shape ", weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(0) != 0, op, ": the vocabulary is empty: ", name,
              "_weight has no rows (shape ", weight.sym_sizes(), ")");
  TORCH_CHECK(weight.sym_size(1) == hidden.sym_size(-1), op, ": ", name,
              "_weight has hidden size ", weight.sym_size(1), " (shape ", weight.sym_sizes(),
              ") but ", name, "_hidden has ", hidden.sym_size(-1), " (shape ",
              hidden.sym_sizes(), ")");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": ", name,
              "_weight (", weight.scalar_type(), ") must have the dtype of ", name,
              "_hidden (", hidden.scalar_type(), ")");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.sym_size(0) == weight.sym_size(0), op, ": ", name,
                "_bias must have shape (", weight.sym_size(0), ",), one entry per row of ",
                name, "_weight, got ", b.sym_sizes());
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(), op, ": ", name, "_bias (",
                b.scalar_type(), ") must have the dtype of ", name, "_weight (",
                weight.scalar_type(), ")");
  }
  for (const at::Tensor* t : {&weight, bias.has_value() ? &*bias : nullptr}) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == student_hidden.device(), op, ": all inputs must be on one "
                  "device; student_hidden is on ", student_hidden.device(), " but a ", name,
                  " weight or bias is on ", t->device());
    }
  }
  TORCH_CHECK(hidden.device() == student_hidden.device(), op, ": teacher_hidden is on ",
              hidden.device(), " but student_hidden is on ", student_hidden.device());
}

c10::SymIntArrayRef leading_of(const at::Tensor& hidden) { return hidden.sym_sizes().slice(0, hidden.dim() - 1); }

// The student's side and the settings, whatever the teacher.
void check_student(const char* op, const at::Tensor& student_hidden, const at::Tensor& student_weight,
                   const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& student_bias,
                   double alpha, double beta, double temperature, double kd_ratio, int64_t chunk_size) {
  check_model(op, "student", student_hidden, student_weight, student_bias, student_hidden);
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), op,
                ": labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK(l.sym_sizes() == leading_of(student_hidden), op, ": labels must have the leading shape of the "
                "hidden states ", leading_of(student_hidden), " (student_hidden ", student_hidden.sym_sizes(),
                "), got ", l.sym_sizes());
    TORCH_CHECK(l.device() == student_hidden.device(), op, ": labels must be on the device of the "
                "hidden states (", student_hidden.device(), "), got ", l.device());
  }
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, op, ": alpha must be in [0, 1), got ", alpha);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, op, ": beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), op,
                    ": temperature must be a positive finite number, got ", temperature);
  TORCH_CHECK_VALUE(kd_ratio >= 0.0 && kd_ratio <= 1.0, op, ": kd_ratio must be in [0, 1], got ",
                    kd_ratio);
  TORCH_CHECK_VALUE(chunk_size >= 0, op, ": chunk_size must be >= 0 (0 = automatic), got ",
                    chunk_size);
}

void check_dense_teacher(const char* op, const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                         const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias) {
  check_model(op, "teacher", teacher_hidden, teacher_weight, teacher_bias, student_hidden);
  TORCH_CHECK(leading_of(teacher_hidden) == leading_of(student_hidden), op,
              ": student_hidden and teacher_hidden must cover the same positions (the same leading "
              "shape), got ", student_hidden.sym_sizes(), " and ", teacher_hidden.sym_sizes());
}

// Positions per chunk when the caller does not say: the chunk's float32 logits about the size
// of the (valid) hidden states, as Liger-Kernel chooses, but at least 2^23 entries (32 MB; three
// such buffers live at once). Smaller chunks cost time, not only GEMM efficiency: every chunk
// reads and writes the whole float32 weight gradient once (CPU, 2048 x 512 x 32768: 64 rows
// took 1.47x the time of materializing the logits, 256 rows 1.11x; benchmarks/RESULTS.md).
// A power of two, at most 4096.
int64_t default_chunk_size(int64_t positions, int64_t hidden, int64_t vocab) {
  constexpr int64_t kMinEntries = int64_t{1} << 23;
  const int64_t entries = std::max(positions * hidden, kMinEntries);
  const int64_t wanted = (entries + vocab - 1) / vocab;
  int64_t chunk = 1;
  while (chunk < wanted && chunk < 4096) chunk *= 2;
  return chunk;
}

std::vector<c10::SymInt> leading_shape(const at::Tensor& t) {
  const auto sizes = t.sym_sizes();
  return {sizes.begin(), sizes.end() - 1};
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs allocate_outputs(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                         const std::optional<at::Tensor>& student_bias, std::array<bool, 3> grad_mask) {
  const auto rows_options = student_hidden.options().dtype(at::kFloat);
  const auto none = [&] { return at::empty({0}, student_hidden.options()); };  // distinct: no aliases
  return {at::zeros_symint(leading_shape(student_hidden), rows_options),
          at::zeros_symint(leading_shape(student_hidden), rows_options),
          // Contiguous, whatever the inputs' strides: the loop writes them through flat views.
          grad_mask[0] ? at::zeros_symint(student_hidden.sym_sizes(), student_hidden.options()) : none(),
          grad_mask[1] ? at::zeros_symint(student_weight.sym_sizes(), student_weight.options()) : none(),
          grad_mask[2] && student_bias.has_value() ? at::zeros_symint(student_bias->sym_sizes(), student_bias->options())
                                                   : none()};
}

// The teacher's side of one chunk: the KD loss of each of its rows (positions `index`, student
// logits z) and, if compute_grad and weight != 0, weight * d(loss)/dz; an undefined gradient
// otherwise.
using ChunkDivergence = std::function<std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& index, const at::Tensor& z, bool compute_grad, double weight)>;

// The settings the chunk loop needs, whatever the teacher.
struct LoopSettings {
  int64_t vocab;          // the rows of the output embedding that count
  int64_t teacher_width;  // the teacher's hidden size, for the automatic chunk size (0: none)
  double kd_ratio;
  int64_t ignore_index, chunk_size;
  std::array<bool, 3> grad_mask;
  double grad_scale;
};

Outputs chunk_loop(const char* op, const at::Tensor& student_hidden, const at::Tensor& student_weight,
                   const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& student_bias,
                   const std::optional<at::Tensor>& row_scale, const LoopSettings& settings,
                   const ChunkDivergence& divergence) {
  const auto& grad_mask = settings.grad_mask;
  const int64_t vocab = settings.vocab;
  auto outputs = allocate_outputs(student_hidden, student_weight, student_bias, grad_mask);
  auto& [kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias] = outputs;
  const bool compute_grad = grad_mask[0] || grad_mask[1] || (grad_mask[2] && student_bias.has_value());
  const bool with_ce = settings.kd_ratio < 1.0;
  TORCH_CHECK_VALUE(!with_ce || labels.has_value(), op, ": kd_ratio < 1 adds cross-entropy on the labels; pass labels");

  const int64_t hs_size = student_hidden.size(-1);
  const at::Tensor hs = student_hidden.reshape({-1, hs_size});
  at::Tensor flat_labels, positions;  // positions: the rows that count, when labels say
  if (labels.has_value()) {
    flat_labels = labels->reshape({-1}).to(at::kLong);
    positions = flat_labels.ne(settings.ignore_index).nonzero().squeeze(1);
  }
  const int64_t count = positions.defined() ? positions.size(0) : hs.size(0);
  if (count == 0) return outputs;
  if (with_ce) {
    const at::Tensor targets = flat_labels.index_select(0, positions);
    const int64_t lowest = targets.min().item<int64_t>(), highest = targets.max().item<int64_t>();
    TORCH_CHECK_INDEX(lowest >= 0 && highest < vocab, op, ": cross-entropy (kd_ratio < 1) needs "
                      "every label other than ignore_index in [0, ", vocab, "), the shared "
                      "vocabulary; got labels from ", lowest, " to ", highest);
  }
  at::Tensor flat_row_scale;
  if (row_scale.has_value()) flat_row_scale = row_scale->reshape({-1}).to(at::kFloat);

  const OutputLayer student(student_weight, student_bias, vocab);
  // Float32 accumulators of the weight and bias gradients: the outputs themselves when float32.
  const bool widen_weight_grad = grad_mask[1] && grad_weight.scalar_type() != at::kFloat;
  at::Tensor weight_acc, bias_acc;
  if (grad_mask[1]) weight_acc = grad_weight.narrow(0, 0, vocab);
  if (widen_weight_grad) weight_acc = at::zeros_like(weight_acc, at::kFloat);
  if (grad_bias.numel() != 0) bias_acc = at::zeros({vocab}, grad_bias.options().dtype(at::kFloat));
  at::Tensor flat_grad_hidden = grad_mask[0] ? grad_hidden.view({-1, hs_size}) : at::Tensor();
  at::Tensor flat_kd = kd_rows.view({-1}), flat_ce = ce_rows.view({-1});

  const int64_t chunk = settings.chunk_size > 0
                            ? settings.chunk_size
                            : default_chunk_size(count, std::max(hs_size, settings.teacher_width), vocab);
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t length = std::min(chunk, count - start);
    const at::Tensor index = positions.defined() ? positions.narrow(0, start, length)
                                                 : at::arange(start, start + length, hs.options().dtype(at::kLong));
    const at::Tensor hs_chunk = hs.index_select(0, index);
    const at::Tensor z = student.logits(hs_chunk);
    auto [kd, g] = divergence(index, z, compute_grad, settings.kd_ratio * settings.grad_scale);
    flat_kd.index_copy_(0, index, kd);
    if (with_ce) {
      const at::Tensor targets = flat_labels.index_select(0, index);
      flat_ce.index_copy_(0, index, cross_entropy_rows(z, targets, compute_grad,
                                                       (1.0 - settings.kd_ratio) * settings.grad_scale, g));
    }
    if (!g.defined()) continue;  // no gradient asked for, or every term had weight 0
    if (flat_row_scale.defined()) g.mul_(flat_row_scale.index_select(0, index).unsqueeze(1));
    if (grad_mask[0]) flat_grad_hidden.index_copy_(0, index, student.input_grad(g).to(grad_hidden.scalar_type()));
    if (grad_mask[1]) student.accumulate_weight_grad(weight_acc, g, hs_chunk);
    if (bias_acc.defined()) bias_acc.add_(g.sum(0));
  }
  if (widen_weight_grad) grad_weight.narrow(0, 0, vocab).copy_(weight_acc);
  if (bias_acc.defined()) grad_bias.narrow(0, 0, vocab).copy_(bias_acc);
  return outputs;
}

Outputs forward_impl(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                     const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                     const std::optional<at::Tensor>& labels,
                     const std::optional<at::Tensor>& student_bias,
                     const std::optional<at::Tensor>& teacher_bias, c10::string_view loss,
                     double alpha, double beta, double temperature, double kd_ratio,
                     int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> grad_mask,
                     double grad_scale, const std::optional<at::Tensor>& row_scale) {
  check_student(kOp, student_hidden, student_weight, labels, student_bias, alpha, beta, temperature, kd_ratio,
                chunk_size);
  check_dense_teacher(kOp, student_hidden, teacher_hidden, teacher_weight, teacher_bias);
  const LossSpec spec = parse_loss(loss, alpha, beta, temperature);
  const int64_t vocab = std::min(student_weight.size(0), teacher_weight.size(0));
  const int64_t ht_size = teacher_hidden.size(-1);
  const at::Tensor ht = teacher_hidden.reshape({-1, ht_size});
  const OutputLayer teacher(teacher_weight, teacher_bias, vocab);
  const LoopSettings settings{vocab, ht_size, kd_ratio, ignore_index, chunk_size, grad_mask, grad_scale};
  return chunk_loop(kOp, student_hidden, student_weight, labels, student_bias, row_scale, settings,
                    [&](const at::Tensor& index, const at::Tensor& z, bool compute_grad, double weight) {
                      // The teacher's chunk logits live only inside this call: two buffers at a time.
                      return divergence_rows(z, teacher.logits(ht.index_select(0, index)), spec, compute_grad, weight);
                    });
}

Outputs forward_meta(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                     const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                     const std::optional<at::Tensor>& labels,
                     const std::optional<at::Tensor>& student_bias,
                     const std::optional<at::Tensor>& teacher_bias, c10::string_view loss,
                     double alpha, double beta, double temperature, double kd_ratio,
                     int64_t /*ignore_index*/, int64_t chunk_size, std::array<bool, 3> grad_mask,
                     double /*grad_scale*/, const std::optional<at::Tensor>& /*row_scale*/) {
  check_student(kOp, student_hidden, student_weight, labels, student_bias, alpha, beta, temperature, kd_ratio,
                chunk_size);
  check_dense_teacher(kOp, student_hidden, teacher_hidden, teacher_weight, teacher_bias);
  parse_loss(loss, alpha, beta, temperature);
  return allocate_outputs(student_hidden, student_weight, student_bias, grad_mask);
}

// The sparse teacher (ids and log-probabilities at temperature T per position): the loss rows
// of a chunk from _kd_topk_forward, on the chunk's rows of the cache.
constexpr const char* kTopkOp = "fused_linear_kd_topk";

void check_topk(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
                const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
                const std::optional<at::Tensor>& student_bias, c10::string_view loss, double alpha, double beta,
                double temperature, double kd_ratio, int64_t chunk_size) {
  check_student(kTopkOp, student_hidden, student_weight, labels, student_bias, alpha, beta, temperature, kd_ratio,
                chunk_size);
  check_sparse_teacher(kTopkOp, leading_of(student_hidden), student_weight.sym_size(0), teacher_ids,
                       teacher_logprobs, student_hidden.device());
  parse_loss(loss, alpha, beta, temperature, kTopkOp);
}

Outputs topk_forward_impl(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
                          const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& student_bias,
                          c10::string_view loss, double alpha, double beta, double temperature, double kd_ratio,
                          int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> grad_mask,
                          double grad_scale, const std::optional<at::Tensor>& row_scale) {
  check_topk(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, student_bias, loss, alpha, beta,
             temperature, kd_ratio, chunk_size);
  const int64_t vocab = student_weight.size(0), k = teacher_ids.size(-1);
  check_sparse_teacher_ids(kTopkOp, teacher_ids, vocab);
  const at::Tensor ids = teacher_ids.reshape({-1, k}), log_probs = teacher_logprobs.reshape({-1, k});
  const LoopSettings settings{vocab, 0, kd_ratio, ignore_index, chunk_size, grad_mask, grad_scale};
  return chunk_loop(kTopkOp, student_hidden, student_weight, labels, student_bias, row_scale, settings,
                    [&](const at::Tensor& index, const at::Tensor& z, bool compute_grad, double weight) {
                      const bool with_grad = compute_grad && weight != 0.0;
                      auto [rows, g] = kd_topk_rows(z, ids.index_select(0, index), log_probs.index_select(0, index),
                                                    std::nullopt, loss, alpha, beta, temperature, ignore_index,
                                                    with_grad, weight);
                      return std::make_tuple(rows, with_grad ? g : at::Tensor());
                    });
}

Outputs topk_forward_meta(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
                          const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& student_bias,
                          c10::string_view loss, double alpha, double beta, double temperature, double kd_ratio,
                          int64_t /*ignore_index*/, int64_t chunk_size, std::array<bool, 3> grad_mask,
                          double /*grad_scale*/, const std::optional<at::Tensor>& /*row_scale*/) {
  check_topk(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, student_bias, loss, alpha, beta,
             temperature, kd_ratio, chunk_size);
  return allocate_outputs(student_hidden, student_weight, student_bias, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillm, CPU, m) {
  m.impl("_fused_linear_kd_forward", &forward_impl);
  m.impl("_fused_linear_kd_topk_forward", &topk_forward_impl);
}
TORCH_LIBRARY_IMPL(distillm, Meta, m) {
  m.impl("_fused_linear_kd_forward", &forward_meta);
  m.impl("_fused_linear_kd_topk_forward", &topk_forward_meta);
}
#ifdef DISTILLM_WITH_CUDA
TORCH_LIBRARY_IMPL(distillm, CUDA, m) {
  m.impl("_fused_linear_kd_forward", &forward_impl);
  m.impl("_fused_linear_kd_topk_forward", &topk_forward_impl);
}
#endif

}  // namespace distillm::fused_linear_impl
