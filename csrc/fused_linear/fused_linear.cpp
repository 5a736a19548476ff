// distillm::_fused_linear_kd_forward: the chunk loop of the fused-linear losses, with its input
// checks and its CPU / CUDA / Meta registrations.
//
// Only positions whose label is not ignore_index are gathered, a chunk of them at a time. For
// each chunk c, in float32 whatever the input dtype:
//   z = h_s[c] @ W_s[:V].T (+ b_s),  u = h_t[c] @ W_t[:V].T (+ b_t)        two GEMMs
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
#include <string>
#include <vector>

#include "skew_kl/skew_kl.h"

namespace distillm::fused_linear_impl {
namespace {

constexpr const char* kOp = "fused_linear_kd";

enum class Divergence { kSkew, kJSD, kTVD };

// One loss type, resolved: fkl is skew KL at alpha 0, rkl skew reverse KL at alpha 0.
struct LossSpec {
  Divergence divergence = Divergence::kSkew;
  double alpha = 0.0;
  bool reverse = false;
  double beta = 0.5;
  double temperature = 1.0;
};

LossSpec parse_loss(c10::string_view name, double alpha, double beta, double temperature) {
  LossSpec spec;
  spec.beta = beta;
  spec.temperature = temperature;
  if (name == "fkl" || name == "rkl") {
    spec.reverse = name == "rkl";
  } else if (name == "skl" || name == "sfkl" || name == "srkl") {
    spec.alpha = alpha;
    spec.reverse = name == "srkl";
  } else if (name == "jsd") {
    spec.divergence = Divergence::kJSD;
  } else if (name == "tvd") {
    spec.divergence = Divergence::kTVD;
  } else {
    TORCH_CHECK_VALUE(false, kOp, ": unknown loss '", std::string(name),
                      "'; choose one of fkl, rkl, skl, sfkl, srkl, jsd, tvd");
  }
  return spec;
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_inputs(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                  const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                  const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& student_bias,
                  const std::optional<at::Tensor>& teacher_bias, double alpha, double beta,
                  double temperature, double kd_ratio, int64_t chunk_size) {
  struct Model {
    const char* name;
    const at::Tensor& hidden;
    const at::Tensor& weight;
    const std::optional<at::Tensor>& bias;
  };
  for (const Model& m : {Model{"student", student_hidden, student_weight, student_bias},
                         Model{"teacher", teacher_hidden, teacher_weight, teacher_bias}}) {
    TORCH_CHECK(is_float_type(m.hidden.scalar_type()), kOp, ": ", m.name,
                "_hidden must be float32, float16 or bfloat16, got ", m.hidden.scalar_type());
    TORCH_CHECK(m.hidden.dim() >= 1, kOp, ": ", m.name,
                "_hidden must have at least one dimension (the hidden size), got a scalar");
    TORCH_CHECK(m.weight.dim() == 2, kOp, ": ", m.name, "_weight must be a (vocabulary, hidden) "
                "matrix, got shape ", m.weight.sym_sizes());
    TORCH_CHECK(m.weight.sym_size(0) != 0, kOp, ": the vocabulary is empty: ", m.name,
                "_weight has no rows (shape ", m.weight.sym_sizes(), ")");
    TORCH_CHECK(m.weight.sym_size(1) == m.hidden.sym_size(-1), kOp, ": ", m.name,
                "_weight has hidden size ", m.weight.sym_size(1), " (shape ", m.weight.sym_sizes(),
                ") but ", m.name, "_hidden has ", m.hidden.sym_size(-1), " (shape ",
                m.hidden.sym_sizes(), ")");
    TORCH_CHECK(m.weight.scalar_type() == m.hidden.scalar_type(), kOp, ": ", m.name,
                "_weight (", m.weight.scalar_type(), ") must have the dtype of ", m.name,
                "_hidden (", m.hidden.scalar_type(), ")");
    if (m.bias.has_value()) {
      const at::Tensor& b = *m.bias;
      TORCH_CHECK(b.dim() == 1 && b.sym_size(0) == m.weight.sym_size(0), kOp, ": ", m.name,
                  "_bias must have shape (", m.weight.sym_size(0), ",), one entry per row of ",
                  m.name, "_weight, got ", b.sym_sizes());
      TORCH_CHECK(b.scalar_type() == m.weight.scalar_type(), kOp, ": ", m.name, "_bias (",
                  b.scalar_type(), ") must have the dtype of ", m.name, "_weight (",
                  m.weight.scalar_type(), ")");
    }
    for (const at::Tensor* t : {&m.weight, m.bias.has_value() ? &*m.bias : nullptr}) {
      if (t != nullptr) {
        TORCH_CHECK(t->device() == student_hidden.device(), kOp, ": all inputs must be on one "
                    "device; student_hidden is on ", student_hidden.device(), " but a ", m.name,
                    " weight or bias is on ", t->device());
      }
    }
    TORCH_CHECK(m.hidden.device() == student_hidden.device(), kOp, ": teacher_hidden is on ",
                m.hidden.device(), " but student_hidden is on ", student_hidden.device());
  }
  const auto leading = student_hidden.sym_sizes().slice(0, student_hidden.dim() - 1);
  TORCH_CHECK(teacher_hidden.sym_sizes().slice(0, teacher_hidden.dim() - 1) == leading, kOp,
              ": student_hidden and teacher_hidden must cover the same positions (the same leading "
              "shape), got ", student_hidden.sym_sizes(), " and ", teacher_hidden.sym_sizes());
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), kOp,
                ": labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK(l.sym_sizes() == leading, kOp, ": labels must have the leading shape of the hidden "
                "states ", leading, " (student_hidden ", student_hidden.sym_sizes(), "), got ",
                l.sym_sizes());
    TORCH_CHECK(l.device() == student_hidden.device(), kOp, ": labels must be on the device of the "
                "hidden states (", student_hidden.device(), "), got ", l.device());
  }
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, kOp, ": alpha must be in [0, 1), got ", alpha);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, kOp, ": beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), kOp,
                    ": temperature must be a positive finite number, got ", temperature);
  TORCH_CHECK_VALUE(kd_ratio >= 0.0 && kd_ratio <= 1.0, kOp, ": kd_ratio must be in [0, 1], got ",
                    kd_ratio);
  TORCH_CHECK_VALUE(chunk_size >= 0, kOp, ": chunk_size must be >= 0 (0 = automatic), got ",
                    chunk_size);
}

// Positions per chunk when the caller does not say: one float32 [chunk, V] buffer about the
// size of the (valid) hidden states, as Liger-Kernel chooses, rounded to a power of two, and at
// least 64 rows so that the GEMMs stay efficient.
int64_t default_chunk_size(int64_t positions, int64_t hidden, int64_t vocab) {
  const int64_t wanted = std::max<int64_t>(1, (positions * hidden + vocab - 1) / vocab);
  int64_t chunk = 64;
  while (chunk < wanted && chunk < 4096) chunk *= 2;
  return chunk;
}

// One model's output layer, restricted to the shared vocabulary rows: float32 logits, and the
// two GEMMs of their gradient, whatever the input dtype.
//  - float32: plain GEMMs.
//  - float16/bfloat16 on CUDA: cuBLAS accumulates in float32 and writes float32 (`out_dtype`),
//    so the logits are never rounded to 8 mantissa bits (the error of Liger-Kernel#1432). The
//    gradient g enters the backward GEMMs in the input dtype, as in any bf16 training, and the
//    weight gradient is accumulated over chunks in float32.
//  - float16/bfloat16 on CPU: the weight is widened to float32 once per call (a product of two
//    bf16 numbers is exact in float32, so this equals out_dtype), then float32 GEMMs.
class OutputLayer {
 public:
  OutputLayer(const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t vocab)
      : weight_(weight.narrow(0, 0, vocab)),
        low_precision_(weight.scalar_type() != at::kFloat),
        widen_(low_precision_ && !weight.is_cuda()) {
    if (widen_) weight_ = weight_.to(at::kFloat);
    if (bias.has_value()) bias_ = bias->narrow(0, 0, vocab).to(at::kFloat);
  }

  at::Tensor logits(const at::Tensor& hidden) const {
    at::Tensor z = widen_           ? at::mm(hidden.to(at::kFloat), weight_.t())
                   : low_precision_ ? at::mm(hidden, weight_.t(), at::kFloat)
                                    : at::mm(hidden, weight_.t());
    if (bias_.defined()) z.add_(bias_);
    return z;
  }

  // d/d(hidden) = g @ W, float32.
  at::Tensor input_grad(const at::Tensor& g) const {
    if (!low_precision_ || widen_) return at::mm(g, weight_);
    return at::mm(g.to(weight_.scalar_type()), weight_, at::kFloat);
  }

  // acc (float32, V x H) += g.T @ hidden.
  void accumulate_weight_grad(at::Tensor& acc, const at::Tensor& g, const at::Tensor& hidden) const {
    if (!low_precision_) {
      acc.addmm_(g.t(), hidden);
    } else if (widen_) {
      acc.addmm_(g.t(), hidden.to(at::kFloat));
    } else {
      at::addmm_out(acc, acc, g.to(hidden.scalar_type()).t(), hidden, at::kFloat);
    }
  }

 private:
  at::Tensor weight_, bias_;
  bool low_precision_, widen_;
};

// Loss per row of a chunk, and (if weight != 0 and compute_grad) weight * d(loss)/dz in g.
std::tuple<at::Tensor, at::Tensor> skew_rows(const at::Tensor& z, const at::Tensor& u, double alpha,
                                             bool reverse, double temperature, bool compute_grad,
                                             double weight) {
  const bool with_grad = compute_grad && weight != 0.0;
  auto [rows, g] = skew_kl_rows(z, u, std::nullopt, alpha, reverse, temperature, /*ignore_index=*/-100,
                                with_grad, weight);
  return {rows, with_grad ? g : at::Tensor()};  // the kernel returns an empty tensor for none
}

// 0.5 sum_v |p_v - q_v|, entries with a -inf logit counting 0 (as losses.TotalVariation), and
// weight * its gradient: with s_v = -0.5 sign(p_v - q_v), dL/dz_j = q_j (s_j - sum_v q_v s_v) / T.
std::tuple<at::Tensor, at::Tensor> total_variation_rows(const at::Tensor& z, const at::Tensor& u,
                                                        double temperature, bool compute_grad,
                                                        double weight) {
  const at::Tensor q = at::softmax(z / temperature, 1);
  const at::Tensor kept = at::logical_not(at::logical_or(at::isneginf(z), at::isneginf(u)));
  const at::Tensor difference = (at::softmax(u / temperature, 1) - q).mul_(kept);
  const at::Tensor rows = difference.abs().sum(1).mul_(0.5);
  at::Tensor g;
  if (compute_grad && weight != 0.0) {
    const at::Tensor s = difference.sign().mul_(-0.5);
    g = q * (s - (q * s).sum(1, /*keepdim=*/true));
    g.mul_(weight / temperature);
  }
  return {rows, g};
}

std::tuple<at::Tensor, at::Tensor> divergence_rows(const at::Tensor& z, const at::Tensor& u,
                                                   const LossSpec& spec, bool compute_grad,
                                                   double weight) {
  switch (spec.divergence) {
    case Divergence::kSkew:
      return skew_rows(z, u, spec.alpha, spec.reverse, spec.temperature, compute_grad, weight);
    case Divergence::kJSD: {
      // JSD_beta = beta SKL_beta + (1 - beta) SRKL_(1-beta), both terms from the same logits.
      const double beta = spec.beta;
      auto [towards_teacher, g] = skew_rows(z, u, beta, false, spec.temperature, compute_grad, weight * beta);
      auto [towards_student, g2] = skew_rows(z, u, 1.0 - beta, true, spec.temperature, compute_grad,
                                             weight * (1.0 - beta));
      if (g.defined()) g.add_(g2);
      return {towards_teacher.mul_(beta).add_(towards_student, 1.0 - beta), g};
    }
    case Divergence::kTVD:
      return total_variation_rows(z, u, spec.temperature, compute_grad, weight);
  }
  TORCH_CHECK(false, kOp, ": unknown divergence");
}

// -log softmax(z)[label] per row, and weight * (softmax(z) - onehot(label)) added to g.
at::Tensor cross_entropy_rows(const at::Tensor& z, const at::Tensor& labels, bool compute_grad,
                              double weight, at::Tensor& g) {
  const at::Tensor lse = at::logsumexp(z, {1});
  const at::Tensor rows = lse - z.gather(1, labels.unsqueeze(1)).squeeze(1);
  if (compute_grad && weight != 0.0) {
    at::Tensor softmax = (z - lse.unsqueeze(1)).exp_();
    if (g.defined()) {
      g.add_(softmax, weight);
    } else {
      g = softmax.mul_(weight);
    }
    g.scatter_add_(1, labels.unsqueeze(1), at::full({z.size(0), 1}, -weight, z.options()));
  }
  return rows;
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
          grad_mask[0] ? at::zeros_like(student_hidden) : none(),
          grad_mask[1] ? at::zeros_like(student_weight) : none(),
          grad_mask[2] && student_bias.has_value() ? at::zeros_like(*student_bias) : none()};
}

Outputs forward_impl(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                     const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                     const std::optional<at::Tensor>& labels,
                     const std::optional<at::Tensor>& student_bias,
                     const std::optional<at::Tensor>& teacher_bias, c10::string_view loss,
                     double alpha, double beta, double temperature, double kd_ratio,
                     int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> grad_mask,
                     double grad_scale, const std::optional<at::Tensor>& row_scale) {
  check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
               teacher_bias, alpha, beta, temperature, kd_ratio, chunk_size);
  const LossSpec spec = parse_loss(loss, alpha, beta, temperature);
  auto outputs = allocate_outputs(student_hidden, student_weight, student_bias, grad_mask);
  auto& [kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias] = outputs;
  const bool compute_grad = grad_mask[0] || grad_mask[1] || (grad_mask[2] && student_bias.has_value());
  const bool with_ce = kd_ratio < 1.0;
  TORCH_CHECK_VALUE(!with_ce || labels.has_value(), kOp,
                    ": kd_ratio < 1 adds cross-entropy on the labels; pass labels");

  const int64_t hs_size = student_hidden.size(-1), ht_size = teacher_hidden.size(-1);
  const int64_t vocab = std::min(student_weight.size(0), teacher_weight.size(0));
  const at::Tensor hs = student_hidden.reshape({-1, hs_size});
  const at::Tensor ht = teacher_hidden.reshape({-1, ht_size});
  at::Tensor flat_labels, positions;  // positions: the rows that count, when labels say
  if (labels.has_value()) {
    flat_labels = labels->reshape({-1}).to(at::kLong);
    positions = flat_labels.ne(ignore_index).nonzero().squeeze(1);
  }
  const int64_t count = positions.defined() ? positions.size(0) : hs.size(0);
  if (count == 0) return outputs;
  if (with_ce) {
    const at::Tensor targets = flat_labels.index_select(0, positions);
    const int64_t lowest = targets.min().item<int64_t>(), highest = targets.max().item<int64_t>();
    TORCH_CHECK_INDEX(lowest >= 0 && highest < vocab, kOp, ": cross-entropy (kd_ratio < 1) needs "
                      "every label other than ignore_index in [0, ", vocab, "), the shared "
                      "vocabulary; got labels from ", lowest, " to ", highest);
  }
  at::Tensor flat_row_scale;
  if (row_scale.has_value()) flat_row_scale = row_scale->reshape({-1}).to(at::kFloat);

  const OutputLayer student(student_weight, student_bias, vocab);
  const OutputLayer teacher(teacher_weight, teacher_bias, vocab);
  // Float32 accumulators of the weight and bias gradients: the outputs themselves when float32.
  const bool widen_weight_grad = grad_mask[1] && grad_weight.scalar_type() != at::kFloat;
  at::Tensor weight_acc, bias_acc;
  if (grad_mask[1]) weight_acc = grad_weight.narrow(0, 0, vocab);
  if (widen_weight_grad) weight_acc = at::zeros_like(weight_acc, at::kFloat);
  if (grad_bias.numel() != 0) bias_acc = at::zeros({vocab}, grad_bias.options().dtype(at::kFloat));
  at::Tensor flat_grad_hidden = grad_mask[0] ? grad_hidden.view({-1, hs_size}) : at::Tensor();
  at::Tensor flat_kd = kd_rows.view({-1}), flat_ce = ce_rows.view({-1});

  const int64_t chunk = chunk_size > 0 ? chunk_size
                                       : default_chunk_size(count, std::max(hs_size, ht_size), vocab);
  for (int64_t start = 0; start < count; start += chunk) {
    const int64_t length = std::min(chunk, count - start);
    const at::Tensor index = positions.defined() ? positions.narrow(0, start, length)
                                                 : at::arange(start, start + length, hs.options().dtype(at::kLong));
    const at::Tensor hs_chunk = hs.index_select(0, index);
    const at::Tensor z = student.logits(hs_chunk);
    at::Tensor u = teacher.logits(ht.index_select(0, index));
    auto [kd, g] = divergence_rows(z, u, spec, compute_grad, kd_ratio * grad_scale);
    u.reset();  // the teacher's chunk logits are done with: keep the workspace at two buffers
    flat_kd.index_copy_(0, index, kd);
    if (with_ce) {
      const at::Tensor targets = flat_labels.index_select(0, index);
      flat_ce.index_copy_(0, index, cross_entropy_rows(z, targets, compute_grad, (1.0 - kd_ratio) * grad_scale, g));
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

Outputs forward_meta(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                     const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                     const std::optional<at::Tensor>& labels,
                     const std::optional<at::Tensor>& student_bias,
                     const std::optional<at::Tensor>& teacher_bias, c10::string_view loss,
                     double alpha, double beta, double temperature, double kd_ratio,
                     int64_t /*ignore_index*/, int64_t chunk_size, std::array<bool, 3> grad_mask,
                     double /*grad_scale*/, const std::optional<at::Tensor>& /*row_scale*/) {
  check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
               teacher_bias, alpha, beta, temperature, kd_ratio, chunk_size);
  parse_loss(loss, alpha, beta, temperature);
  return allocate_outputs(student_hidden, student_weight, student_bias, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillm, CPU, m) { m.impl("_fused_linear_kd_forward", &forward_impl); }
TORCH_LIBRARY_IMPL(distillm, Meta, m) { m.impl("_fused_linear_kd_forward", &forward_meta); }
#ifdef DISTILLM_WITH_CUDA
TORCH_LIBRARY_IMPL(distillm, CUDA, m) { m.impl("_fused_linear_kd_forward", &forward_impl); }
#endif

}  // namespace distillm::fused_linear_impl
