// distillm::skew_kl on top of distillm::_skew_kl_forward: the reduction, the autograd kernel,
// and the C++ entry point. Living in C++, they give libtorch programs a differentiable op.
//
// The forward computes each row's gradient in the same pass as its loss (the kernels read the
// logits once for both), and the backward only scales it, in place, by the incoming gradient.
// Peak memory of forward + backward is therefore inputs + one gradient tensor + O(rows).
// The mean's 1/count goes into the kernel: as a number where the host knows it (CPU labels, or
// no labels), else as a device scalar the kernel reads (CUDA labels: no sync). A backward whose
// incoming gradient is exactly 1 (`loss.backward()`) then leaves the gradient alone: the
// scaling pass reads and writes a tensor of the logits' size, some 10% of a CPU forward +
// backward, and on CUDA a third of the bytes of the fused kernel itself (gradient_scale.h).
#include "skew_kl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "gradient_scale.h"
#include "reduction.h"

namespace distillm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// num_items as a 0-dim float32 tensor on the logits' device.
at::Tensor as_count(const at::Tensor& num_items, const at::Tensor& logits) {
  const at::Tensor on_device = num_items.device() == logits.device() ? num_items : num_items.to(logits.device());
  // A copy: an op below autograd must not hand its own input back (opcheck's schema test).
  return on_device.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).reshape({});
}

// "mean"'s denominator: num_items if given, else the valid positions (at least 1). A number
// where the host knows it for free (a plain CPU tensor; the rows of real logits without
// labels), which the kernel multiplies in; else a device scalar the kernel reads (no sync).
struct MeanDenominator {
  at::Tensor count;  // 0-dim float32 on the logits' device: the loss is divided by it
  double grad_scale = 1.0;
  std::optional<at::Tensor> grad_divisor;
};

MeanDenominator mean_denominator(const at::Tensor& student, const std::optional<at::Tensor>& labels,
                                 int64_t ignore_index, const std::optional<at::Tensor>& num_items) {
  MeanDenominator d;
  if (num_items) {
    d.count = as_count(*num_items, student);
  } else if (labels ? holds_host_data(*labels) : !at::isTensorSubclassLike(student)) {
    const double n = host_valid_count(leading_positions(student), labels, ignore_index);
    d.count = at::scalar_tensor(n, student.options().dtype(at::kFloat));
    d.grad_scale = 1.0 / n;
    return d;
  } else {
    d.count = valid_count(student.select(-1, 0), labels, ignore_index);
  }
  if (holds_host_data(d.count)) {
    d.grad_scale = 1.0 / d.count.item<double>();
  } else {
    d.grad_divisor = d.count;
  }
  return d;
}

void check_num_items(const std::optional<at::Tensor>& num_items, Reduction reduction) {
  if (!num_items) return;
  TORCH_CHECK_VALUE(reduction == Reduction::kMean, "skew_kl: num_items is the denominator of "
                    "reduction='mean'; it cannot be used with another reduction");
  TORCH_CHECK_VALUE(num_items->sym_numel() == 1 && num_items->scalar_type() != at::kBool &&
                        !at::isComplexType(num_items->scalar_type()),
                    "skew_kl: num_items must be one real number, got ", num_items->scalar_type(),
                    " of shape ", num_items->sym_sizes());
}

class SkewKLFunction : public torch::autograd::Function<SkewKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& student,
                            const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                            double alpha, bool reverse, double temperature, int64_t ignore_index,
                            Reduction reduction, const std::optional<at::Tensor>& num_items,
                            bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    MeanDenominator mean;
    if (reduction == Reduction::kMean) mean = mean_denominator(student, labels, ignore_index, num_items);
    auto [row_loss, grad] =
        skew_kl_rows(student, teacher, labels, alpha, reverse, temperature, ignore_index, compute_grad,
                     mean.grad_scale, compute_grad ? mean.grad_divisor : std::nullopt);
    const at::Tensor count = mean.count;
    if (compute_grad) {
      ctx->saved_data["grad"] = grad;  // already divided by the count for "mean"
      ctx->saved_data["reduction"] = static_cast<int64_t>(reduction);
    }
    return reduce(row_loss, count, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(10);  // one per forward argument after ctx; only the student's is set
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
      case Reduction::kMean:
      case Reduction::kSum: scale_unless_one_(grad, grad_output); break;
      case Reduction::kNone: grad.mul_(grad_output.unsqueeze(-1)); break;
    }
    grads[0] = grad;
    return grads;
  }
};

at::Tensor skew_kl_autograd(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                            double temperature, int64_t ignore_index, c10::string_view reduction,
                            const std::optional<at::Tensor>& num_items) {
  // The gradient costs a write of the logits' size: compute it only when it will be used.
  const bool compute_grad = at::GradMode::is_enabled() && student.requires_grad();
  const Reduction r = parse_reduction("skew_kl", reduction);
  check_num_items(num_items, r);
  return SkewKLFunction::apply(student, teacher, labels, alpha, reverse, temperature, ignore_index, r,
                               num_items, compute_grad);
}

// Below autograd (inference mode, fake tensors, or after the autograd kernel): loss only.
at::Tensor skew_kl_no_grad(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                           double temperature, int64_t ignore_index, c10::string_view reduction,
                           const std::optional<at::Tensor>& num_items) {
  const Reduction r = parse_reduction("skew_kl", reduction);
  check_num_items(num_items, r);
  auto [row_loss, grad] = skew_kl_rows(student, teacher, labels, alpha, reverse, temperature,
                                          ignore_index, /*compute_grad=*/false, /*grad_scale=*/1.0,
                                          /*grad_divisor=*/std::nullopt);
  const at::Tensor count =
      r == Reduction::kMean ? mean_denominator(student, labels, ignore_index, num_items).count : at::Tensor();
  return reduce(row_loss, count, r);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> skew_kl_rows(const at::Tensor& student,
                                                   const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels,
                                                   double alpha, bool reverse, double temperature,
                                                   int64_t ignore_index, bool compute_grad,
                                                   double grad_scale,
                                                   const std::optional<at::Tensor>& grad_divisor) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::_skew_kl_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, bool,
                                                    double, int64_t, bool, double,
                                                    const std::optional<at::Tensor>&)>();
  return op.call(student, teacher, labels, alpha, reverse, temperature, ignore_index, compute_grad,
                 grad_scale, grad_divisor);
}

at::Tensor skew_kl(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                   const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                   double temperature, int64_t ignore_index, c10::string_view reduction,
                   const std::optional<at::Tensor>& num_items) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::skew_kl", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            double, bool, double, int64_t, c10::string_view,
                            const std::optional<at::Tensor>&)>();
  return op.call(student_logits, teacher_logits, labels, alpha, reverse, temperature, ignore_index,
                 reduction, num_items);
}

TORCH_LIBRARY_IMPL(distillm, Autograd, m) { m.impl("skew_kl", &skew_kl_autograd); }
TORCH_LIBRARY_IMPL(distillm, CompositeExplicitAutograd, m) { m.impl("skew_kl", &skew_kl_no_grad); }

}  // namespace distillm
