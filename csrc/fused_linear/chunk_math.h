// The per-chunk math of the fused-linear losses, on one chunk's float32 logits z (student) and
// u (teacher): each loss type's value per row and its gradient with respect to z, and the
// model's output layer (the GEMMs from hidden states to logits and back). ATen calls around the
// existing row kernels, so the same code runs on CPU and CUDA.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "skew_kl/skew_kl.h"

namespace distillm::fused_linear_impl {

enum class Divergence { kSkew, kJSD, kTVD };

// One loss type, resolved: fkl is skew KL at alpha 0, rkl skew reverse KL at alpha 0.
struct LossSpec {
  Divergence divergence = Divergence::kSkew;
  double alpha = 0.0;
  bool reverse = false;
  double beta = 0.5;
  double temperature = 1.0;
};

inline LossSpec parse_loss(c10::string_view name, double alpha, double beta, double temperature,
                           const char* op = "fused_linear_kd") {
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
    TORCH_CHECK_VALUE(false, op, ": unknown loss '", std::string(name),
                      "'; choose one of fkl, rkl, skl, sfkl, srkl, jsd, tvd");
  }
  return spec;
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
inline std::tuple<at::Tensor, at::Tensor> skew_rows(const at::Tensor& z, const at::Tensor& u, double alpha,
                                             bool reverse, double temperature, bool compute_grad,
                                             double weight) {
  const bool with_grad = compute_grad && weight != 0.0;
  auto [rows, g] = skew_kl_rows(z, u, std::nullopt, alpha, reverse, temperature, /*ignore_index=*/-100,
                                with_grad, weight);
  return {rows, with_grad ? g : at::Tensor()};  // the kernel returns an empty tensor for none
}

// 0.5 sum_v |p_v - q_v|, entries with a -inf logit counting 0 (as losses.TotalVariation), and
// weight * its gradient: with s_v = -0.5 sign(p_v - q_v), dL/dz_j = q_j (s_j - sum_v q_v s_v) / T.
inline std::tuple<at::Tensor, at::Tensor> total_variation_rows(const at::Tensor& z, const at::Tensor& u,
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

inline std::tuple<at::Tensor, at::Tensor> divergence_rows(const at::Tensor& z, const at::Tensor& u,
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
  TORCH_CHECK(false, "fused_linear_kd: unknown divergence");
}

// -log softmax(z)[label] per row, and weight * (softmax(z) - onehot(label)) added to g.
inline at::Tensor cross_entropy_rows(const at::Tensor& z, const at::Tensor& labels, bool compute_grad,
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

}  // namespace distillm::fused_linear_impl
