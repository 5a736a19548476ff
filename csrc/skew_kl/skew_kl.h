// C++ entry point of the fused skew KL loss, for libtorch programs. The same operator as
// torch.ops.distillm.skew_kl: differentiable with respect to student_logits.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace distillm {

// student_logits, teacher_logits: (..., V) float32/float16/bfloat16; labels: (...) integer.
// num_items: one number, the denominator of "mean" instead of the valid positions.
// Returns the float32 loss: a scalar for "mean"/"sum", shape (...) for "none".
at::Tensor skew_kl(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                   const std::optional<at::Tensor>& labels = std::nullopt, double alpha = 0.1,
                   bool reverse = false, double temperature = 1.0, int64_t ignore_index = -100,
                   c10::string_view reduction = "mean",
                   const std::optional<at::Tensor>& num_items = std::nullopt);

// The building block of skew_kl (torch.ops.distillm._skew_kl_forward): the float32 loss per
// position and, if compute_grad, grad_scale * d(loss_row)/d(student_logits) in the student's
// dtype and shape (an empty tensor otherwise), divided by grad_divisor if given (one float32
// element on the logits' device). Not differentiable itself.
std::tuple<at::Tensor, at::Tensor> skew_kl_rows(const at::Tensor& student_logits,
                                                const at::Tensor& teacher_logits,
                                                const std::optional<at::Tensor>& labels,
                                                double alpha, bool reverse, double temperature,
                                                int64_t ignore_index, bool compute_grad,
                                                double grad_scale,
                                                const std::optional<at::Tensor>& grad_divisor = std::nullopt);

}  // namespace distillm
