// distillm::skew_kl on top of distillm::_skew_kl_forward: the reduction, the autograd kernel,
// and the C++ entry point. Living in C++, they give libtorch programs a differentiable op.
//
// The forward computes each row's gradient in the same pass as its loss (the kernels read the
// logits once for both), and the backward only scales it, in place, by the incoming gradient.
// Peak memory of forward + backward is therefore inputs + one gradient tensor + O(rows).
// On CPU the mean's 1/count is known on the host before the kernel runs, so the kernel writes
// it in, and a backward whose incoming gradient is exactly 1 (`loss.backward()`) leaves the
// gradient alone: the scaling pass reads and writes a tensor of the logits' size, some 10% of
// a CPU forward + backward. On CUDA reading the count would wait for the device.
#include "skew_kl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "reduction.h"

namespace distillm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SkewKLFunction : public torch::autograd::Function<SkewKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                            double alpha, bool reverse, double temperature, int64_t ignore_index,
                            Reduction reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool mean_in_kernel = compute_grad && reduction == Reduction::kMean &&
                                holds_host_data(student) && (!labels || holds_host_data(*labels));
    const double grad_scale =
        mean_in_kernel ? 1.0 / host_valid_count(leading_positions(student), labels, ignore_index) : 1.0;
    auto [row_loss, grad] = skew_kl_rows(student, teacher, labels, alpha, reverse, temperature,
                                            ignore_index, compute_grad, grad_scale);
    at::Tensor count;
    if (reduction == Reduction::kMean) count = valid_count(row_loss, labels, ignore_index);
    if (compute_grad) {
      ctx->saved_data["grad"] = grad;
      // What the backward still has to divide by: the count, unless the kernel did.
      ctx->saved_data["count"] = mean_in_kernel ? at::Tensor() : count;
      ctx->saved_data["reduction"] = static_cast<int64_t>(reduction);
    }
    return reduce(row_loss, count, reduction);
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
    const at::Tensor count = ctx->saved_data["count"].toTensor();
    switch (static_cast<Reduction>(ctx->saved_data["reduction"].toInt())) {
      case Reduction::kMean:
      case Reduction::kSum:
        if (count.defined()) {
          grad.mul_(grad_output / count);
        } else if (!is_exactly_one_on_cpu(grad_output)) {
          grad.mul_(grad_output);
        }
        break;
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
                               parse_reduction("skew_kl", reduction), compute_grad);
}

// Below autograd (inference mode, fake tensors, or after the autograd kernel): loss only.
at::Tensor skew_kl_no_grad(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                           double temperature, int64_t ignore_index, c10::string_view reduction) {
  const Reduction r = parse_reduction("skew_kl", reduction);
  auto [row_loss, grad] = skew_kl_rows(student, teacher, labels, alpha, reverse, temperature,
                                          ignore_index, /*compute_grad=*/false, /*grad_scale=*/1.0);
  const at::Tensor count = r == Reduction::kMean ? valid_count(row_loss, labels, ignore_index) : at::Tensor();
  return reduce(row_loss, count, r);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> skew_kl_rows(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels,
                                                   double alpha, bool reverse, double temperature,
                                                   int64_t ignore_index, bool compute_grad,
                                                   double grad_scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::_skew_kl_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, bool,
                                                    double, int64_t, bool, double)>();
  return op.call(student, teacher, labels, alpha, reverse, temperature, ignore_index, compute_grad,
                 grad_scale);
}

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
