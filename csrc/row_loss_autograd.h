// The reduction and autograd of the row-kernel losses (skew_kl, skew_kl_topk), which share
// them: a row kernel returns each position's loss and, when asked, the gradient of the
// positions' losses with respect to the student logits, already scaled.
//
// The forward computes each row's gradient in the same pass as its loss (the kernels read the
// logits once for both), and the backward only scales it, in place, by the incoming gradient.
// Peak memory of forward + backward is therefore inputs + one gradient tensor + O(rows).
// The mean's 1/count goes into the kernel: as a number where the host knows it (CPU labels, or
// no labels), else as a device scalar the kernel reads (CUDA labels: no sync). A backward whose
// incoming gradient is exactly 1 (`loss.backward()`) then leaves the gradient alone: the
// scaling pass reads and writes a tensor of the logits' size, some 10% of a CPU forward +
// backward, and on CUDA a third of the bytes of the fused kernel itself (gradient_scale.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <functional>
#include <optional>
#include <tuple>

#include "reduction.h"
#include "skew_kl/gradient_scale.h"

namespace distillm {

// (row_loss, grad) of the student logits: grad_scale * d(loss_row)/d(student), divided by
// grad_divisor if given; an empty grad unless compute_grad. The teacher is captured: a constant.
using RowKernel = std::function<std::tuple<at::Tensor, at::Tensor>(
    bool compute_grad, double grad_scale, const std::optional<at::Tensor>& grad_divisor)>;

// What a row loss's op is called with, besides the student and the teacher.
struct RowLossArgs {
  const char* op;
  const std::optional<at::Tensor>& labels;
  int64_t ignore_index;
  c10::string_view reduction;
  const std::optional<at::Tensor>& num_items;
};

class RowLossFunction : public torch::autograd::Function<RowLossFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& student,
                            const RowKernel& rows, const std::optional<at::Tensor>& labels,
                            int64_t ignore_index, Reduction reduction,
                            const std::optional<at::Tensor>& num_items, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    MeanDenominator mean;
    if (reduction == Reduction::kMean) mean = mean_denominator(student, labels, ignore_index, num_items);
    auto [row_loss, grad] = rows(compute_grad, mean.grad_scale, compute_grad ? mean.grad_divisor : std::nullopt);
    if (compute_grad) {
      ctx->saved_data["grad"] = grad;  // already divided by the count for "mean"
      ctx->saved_data["reduction"] = static_cast<int64_t>(reduction);
    }
    return reduce(row_loss, mean.count, reduction);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(7);  // one per forward argument after ctx; only the student's is set
    const auto saved = ctx->saved_data.find("grad");
    if (saved == ctx->saved_data.end()) return grads;  // student_logits did not require grad
    TORCH_CHECK(!at::GradMode::is_enabled(), "double backward (create_graph=True) of a fused KD loss is not supported");
    TORCH_CHECK(saved->second.isTensor(),
                "this fused KD loss's graph was already backpropagated; the fused gradient is consumed "
                "by the first backward (retain_graph=True cannot reuse it). Call the loss again.");
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

// The Autograd kernel of a row loss.
inline at::Tensor row_loss_autograd(const at::Tensor& student, const RowLossArgs& args, const RowKernel& rows) {
  // The gradient costs a write of the logits' size: compute it only when it will be used.
  const bool compute_grad = at::GradMode::is_enabled() && student.requires_grad();
  const Reduction r = parse_reduction(args.op, args.reduction);
  check_num_items(args.op, args.num_items, r);
  return RowLossFunction::apply(student, rows, args.labels, args.ignore_index, r, args.num_items, compute_grad);
}

// Below autograd (inference mode, fake tensors, or after the autograd kernel): loss only.
inline at::Tensor row_loss_no_grad(const at::Tensor& student, const RowLossArgs& args, const RowKernel& rows) {
  const Reduction r = parse_reduction(args.op, args.reduction);
  check_num_items(args.op, args.num_items, r);
  auto [row_loss, grad] = rows(/*compute_grad=*/false, /*grad_scale=*/1.0, /*grad_divisor=*/std::nullopt);
  const at::Tensor count =
      r == Reduction::kMean ? mean_denominator(student, args.labels, args.ignore_index, args.num_items).count
                            : at::Tensor();
  return reduce(row_loss, count, r);
}

}  // namespace distillm
