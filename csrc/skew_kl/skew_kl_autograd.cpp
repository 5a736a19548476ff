// distillm::skew_kl on top of distillm::_skew_kl_forward: its Autograd and
// CompositeExplicitAutograd kernels (row_loss_autograd.h) and the C++ entry point. Living in
// C++, they give libtorch programs a differentiable op.
#include "skew_kl.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "row_loss_autograd.h"

namespace distillm {
namespace {

// The rows of skew_kl for one call, the teacher captured.
RowKernel skew_kl_kernel(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                         double alpha, bool reverse, double temperature, int64_t ignore_index) {
  return [=](bool compute_grad, double grad_scale, const std::optional<at::Tensor>& grad_divisor) {
    return skew_kl_rows(student, teacher, labels, alpha, reverse, temperature, ignore_index, compute_grad, grad_scale,
                        grad_divisor);
  };
}

at::Tensor skew_kl_autograd(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                            double temperature, int64_t ignore_index, c10::string_view reduction,
                            const std::optional<at::Tensor>& num_items) {
  return row_loss_autograd(student, {"skew_kl", labels, ignore_index, reduction, num_items},
                           skew_kl_kernel(student, teacher, labels, alpha, reverse, temperature, ignore_index));
}

at::Tensor skew_kl_no_grad(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                           double temperature, int64_t ignore_index, c10::string_view reduction,
                           const std::optional<at::Tensor>& num_items) {
  return row_loss_no_grad(student, {"skew_kl", labels, ignore_index, reduction, num_items},
                          skew_kl_kernel(student, teacher, labels, alpha, reverse, temperature, ignore_index));
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
