// distillm::skew_kl on top of distillm::_skew_kl_forward: the reduction, the autograd kernel,
// and the C++ entry point. Living in C++, they give libtorch programs a differentiable op.
//
// The forward computes each row's gradient in the same pass as its loss (the kernels read the
// logits once for both), and the backward only scales it, in place, by the incoming gradient.
// Peak memory of forward + backward is therefore inputs + one gradient tensor + O(rows).
#include "skew_kl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

namespace distillm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum class Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "skew_kl: reduction must be 'mean', 'sum' or 'none', got '",
                    std::string(reduction), "'");
}

std::tuple<at::Tensor, at::Tensor> skew_kl_forward(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels,
                                                   double alpha, bool reverse, double temperature,
                                                   int64_t ignore_index, bool compute_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::_skew_kl_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, bool,
                                                    double, int64_t, bool)>();
  return op.call(student, teacher, labels, alpha, reverse, temperature, ignore_index, compute_grad);
}

// Number of positions that count for "mean": a 0-dim float tensor on the loss device, so that
// nothing waits for the device. Clamped to 1: no valid position gives a 0 loss, not NaN.
at::Tensor valid_count(const at::Tensor& row_loss, const std::optional<at::Tensor>& labels,
                       int64_t ignore_index) {
  at::Tensor valid = labels.has_value() ? labels->ne(ignore_index) : at::ones_like(row_loss);
  return valid.sum(at::kFloat).clamp_min(1.0);
}

struct Reduced {
  at::Tensor loss;
  at::Tensor count;  // defined for "mean" only
};

Reduced reduce(const at::Tensor& row_loss, const std::optional<at::Tensor>& labels,
               int64_t ignore_index, Reduction reduction) {
  switch (reduction) {
    case Reduction::kMean: {
      at::Tensor count = valid_count(row_loss, labels, ignore_index);
      return {row_loss.sum() / count, count};
    }
    case Reduction::kSum: return {row_loss.sum(), at::Tensor()};
    case Reduction::kNone: return {row_loss, at::Tensor()};
  }
  TORCH_CHECK(false, "skew_kl: unknown reduction code ", static_cast<int64_t>(reduction));
}

class SkewKLFunction : public torch::autograd::Function<SkewKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                            double alpha, bool reverse, double temperature, int64_t ignore_index,
                            Reduction reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [row_loss, grad] = skew_kl_forward(student, teacher, labels, alpha, reverse, temperature,
                                            ignore_index, compute_grad);
    Reduced reduced = reduce(row_loss, labels, ignore_index, reduction);
    if (compute_grad) {
      ctx->saved_data["grad"] = grad;
      ctx->saved_data["count"] = reduced.count;
      ctx->saved_data["reduction"] = static_cast<int64_t>(reduction);
    }
    return reduced.loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(9);  // one per forward argument after ctx; only the student's is set
    const auto saved = ctx->saved_data.find("grad");
    if (saved == ctx->saved_data.end()) return grads;  // student_logits did not require grad
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "skew_kl: double backward (create_graph=True) is not supported");
    TORCH_CHECK(saved->second.isTensor(),
                "skew_kl: this graph was already backpropagated; the fused gradient is consumed "
                "by the first backward (retain_graph=True cannot reuse it). Call skew_kl again.");
    at::Tensor grad = saved->second.toTensor();
    saved->second = c10::IValue();  // the returned tensor is the only owner from here on

    const at::Tensor& grad_output = grad_outputs[0];
    switch (static_cast<Reduction>(ctx->saved_data["reduction"].toInt())) {
      case Reduction::kMean: grad.mul_(grad_output / ctx->saved_data["count"].toTensor()); break;
      case Reduction::kSum: grad.mul_(grad_output); break;
      case Reduction::kNone: grad.mul_(grad_output.unsqueeze(-1)); break;
    }
    grads[0] = grad;
    return grads;
  }
};

at::Tensor skew_kl_autograd(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                            double temperature, int64_t ignore_index, c10::string_view reduction) {
  // The gradient costs a write of the logits' size: compute it only when it will be used.
  const bool compute_grad = at::GradMode::is_enabled() && student.requires_grad();
  return SkewKLFunction::apply(student, teacher, labels, alpha, reverse, temperature, ignore_index,
                               parse_reduction(reduction), compute_grad);
}

// Below autograd (inference mode, fake tensors, or after the autograd kernel): loss only.
at::Tensor skew_kl_no_grad(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                           double temperature, int64_t ignore_index, c10::string_view reduction) {
  const Reduction r = parse_reduction(reduction);
  auto [row_loss, grad] = skew_kl_forward(student, teacher, labels, alpha, reverse, temperature,
                                          ignore_index, /*compute_grad=*/false);
  return reduce(row_loss, labels, ignore_index, r).loss;
}

}  // namespace

at::Tensor skew_kl(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                   const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                   double temperature, int64_t ignore_index, c10::string_view reduction) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::skew_kl", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            double, bool, double, int64_t, c10::string_view)>();
  return op.call(student_logits, teacher_logits, labels, alpha, reverse, temperature, ignore_index,
                 reduction);
}

TORCH_LIBRARY_IMPL(distillm, Autograd, m) { m.impl("skew_kl", &skew_kl_autograd); }
TORCH_LIBRARY_IMPL(distillm, CompositeExplicitAutograd, m) { m.impl("skew_kl", &skew_kl_no_grad); }

}  // namespace distillm
