// distillm::skew_kl_topk on top of distillm::_kd_topk_forward: its Autograd and
// CompositeExplicitAutograd kernels (row_loss_autograd.h, shared with skew_kl) and the C++
// entry points.
#include "topk/topk.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "row_loss_autograd.h"

namespace distillm {
namespace {

// The rows of skew_kl_topk for one call, the sparse teacher captured.
RowKernel skew_kl_topk_kernel(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& log_probs,
                              const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                              double temperature, int64_t ignore_index) {
  return [=](bool compute_grad, double grad_scale, const std::optional<at::Tensor>& grad_divisor) {
    return kd_topk_rows(student, ids, log_probs, labels, reverse ? "srkl" : "skl", alpha, /*beta=*/0.5, temperature,
                        ignore_index, compute_grad, grad_scale, grad_divisor);
  };
}

at::Tensor skew_kl_topk_autograd(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& log_probs,
                                 const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                                 double temperature, int64_t ignore_index, c10::string_view reduction,
                                 const std::optional<at::Tensor>& num_items) {
  return row_loss_autograd(
      student, {"skew_kl_topk", labels, ignore_index, reduction, num_items},
      skew_kl_topk_kernel(student, ids, log_probs, labels, alpha, reverse, temperature, ignore_index));
}

at::Tensor skew_kl_topk_no_grad(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& log_probs,
                                const std::optional<at::Tensor>& labels, double alpha, bool reverse,
                                double temperature, int64_t ignore_index, c10::string_view reduction,
                                const std::optional<at::Tensor>& num_items) {
  return row_loss_no_grad(
      student, {"skew_kl_topk", labels, ignore_index, reduction, num_items},
      skew_kl_topk_kernel(student, ids, log_probs, labels, alpha, reverse, temperature, ignore_index));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_topk_rows(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                                                const at::Tensor& teacher_logprobs,
                                                const std::optional<at::Tensor>& labels, c10::string_view loss,
                                                double alpha, double beta, double temperature, int64_t ignore_index,
                                                bool compute_grad, double grad_scale,
                                                const std::optional<at::Tensor>& grad_divisor) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::_kd_topk_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, c10::string_view, double,
                                                    double, double, int64_t, bool, double,
                                                    const std::optional<at::Tensor>&)>();
  return op.call(student_logits, teacher_ids, teacher_logprobs, labels, loss, alpha, beta, temperature, ignore_index,
                 compute_grad, grad_scale, grad_divisor);
}

at::Tensor skew_kl_topk(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                        const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels, double alpha,
                        bool reverse, double temperature, int64_t ignore_index, c10::string_view reduction,
                        const std::optional<at::Tensor>& num_items) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::skew_kl_topk", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            double, bool, double, int64_t, c10::string_view, const std::optional<at::Tensor>&)>();
  return op.call(student_logits, teacher_ids, teacher_logprobs, labels, alpha, reverse, temperature, ignore_index,
                 reduction, num_items);
}

TORCH_LIBRARY_IMPL(distillm, Autograd, m) { m.impl("skew_kl_topk", &skew_kl_topk_autograd); }
TORCH_LIBRARY_IMPL(distillm, CompositeExplicitAutograd, m) { m.impl("skew_kl_topk", &skew_kl_topk_no_grad); }

}  // namespace distillm
