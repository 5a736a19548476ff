// distillm::fused_linear_kd, fused_linear_skew_kl and fused_linear_kd_topk on top of
// _fused_linear_kd_forward / _fused_linear_kd_topk_forward: the reductions, the autograd kernel
// and the C++ entry points.
//
// For "mean" and "sum" the forward computes the student's gradients in the same chunk loop as
// the loss (each chunk's logits exist once), so the backward only scales three small tensors
// (hidden states, output embedding, bias) by the incoming gradient. The mean's 1/count is
// folded into the loop: counting the valid positions waits for the device on CUDA, but the loop
// gathers them (nonzero) and waits there anyway. For "none" the gradient of each position is
// weighted by the incoming gradient, known only in the backward, which therefore runs the loop
// again from the saved inputs.
#include "fused_linear.h"

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <string>

#include "reduction.h"

namespace distillm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The loss settings, passed through the autograd function as one value.
struct LossArgs {
  std::string loss;
  double alpha, beta, temperature, kd_ratio;
  int64_t ignore_index, chunk_size;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["kd_ratio"] = kd_ratio;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["chunk_size"] = chunk_size;
  }

  static LossArgs load(AutogradContext* ctx) {
    auto& d = ctx->saved_data;
    return {d["loss"].toStringRef(), d["alpha"].toDouble(), d["beta"].toDouble(),
            d["temperature"].toDouble(), d["kd_ratio"].toDouble(), d["ignore_index"].toInt(),
            d["chunk_size"].toInt()};
  }
};

// The teacher's side of a fused-linear loss: dense (its hidden states, output embedding and
// bias) or sparse (top-k ids and log-probabilities). Constants: never differentiated.
struct Teacher {
  bool sparse;
  at::Tensor first, second;  // hidden and weight, or ids and log-probabilities
  std::optional<at::Tensor> bias;
};

ForwardOutputs fused_forward(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                             const Teacher& teacher, const std::optional<at::Tensor>& labels,
                             const std::optional<at::Tensor>& student_bias, const LossArgs& args,
                             std::array<bool, 3> grad_mask, double grad_scale,
                             const std::optional<at::Tensor>& row_scale) {
  using Optional = const std::optional<at::Tensor>&;
  if (teacher.sparse) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("distillm::_fused_linear_kd_topk_forward", "")
            .typed<ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  Optional, Optional, c10::string_view, double, double, double, double, int64_t,
                                  int64_t, std::array<bool, 3>, double, Optional)>();
    return op.call(student_hidden, student_weight, teacher.first, teacher.second, labels, student_bias, args.loss,
                   args.alpha, args.beta, args.temperature, args.kd_ratio, args.ignore_index, args.chunk_size,
                   grad_mask, grad_scale, row_scale);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::_fused_linear_kd_forward", "")
          .typed<ForwardOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                Optional, Optional, Optional, c10::string_view, double, double, double, double,
                                int64_t, int64_t, std::array<bool, 3>, double, Optional)>();
  return op.call(student_hidden, student_weight, teacher.first, teacher.second, labels, student_bias, teacher.bias,
                 args.loss, args.alpha, args.beta, args.temperature, args.kd_ratio, args.ignore_index,
                 args.chunk_size, grad_mask, grad_scale, row_scale);
}

// kd_ratio * kd + (1 - kd_ratio) * ce, without 0 * inf where a part is unused. Always a new
// tensor: the differentiable output must not alias the non-differentiable kd or ce.
at::Tensor mix(const at::Tensor& kd, const at::Tensor& ce, double kd_ratio) {
  if (kd_ratio == 1.0) return kd.clone();
  if (kd_ratio == 0.0) return ce.clone();
  return kd * kd_ratio + ce * (1.0 - kd_ratio);
}

// (loss, kd, ce), each reduced; `count` is valid_count's, needed for "mean" only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> reduce_all(const at::Tensor& kd_rows, const at::Tensor& ce_rows,
                                                          const at::Tensor& count, const LossArgs& args,
                                                          Reduction reduction) {
  return {reduce(mix(kd_rows, ce_rows, args.kd_ratio), count, reduction), reduce(kd_rows, count, reduction),
          reduce(ce_rows, count, reduction)};
}

at::Tensor count_for(Reduction reduction, const at::Tensor& kd_rows, const std::optional<at::Tensor>& labels,
                     const LossArgs& args) {
  return reduction == Reduction::kMean ? valid_count(kd_rows, labels, args.ignore_index) : at::Tensor();
}

bool can_read_values(const at::Tensor& hidden, const std::optional<at::Tensor>& labels) {
  return !at::isTensorSubclassLike(hidden) && (!labels || !at::isTensorSubclassLike(*labels));
}

class FusedLinearKDFunction : public torch::autograd::Function<FusedLinearKDFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student_hidden,
                               const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
                               const Teacher& teacher, const std::optional<at::Tensor>& labels,
                               const LossArgs& args, Reduction reduction, std::array<bool, 3> grad_mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool any_grad = grad_mask[0] || grad_mask[1] || grad_mask[2];
    const bool grad_now = any_grad && reduction != Reduction::kNone;
    const bool mean_in_loop = grad_now && reduction == Reduction::kMean && can_read_values(student_hidden, labels);
    const double grad_scale =
        mean_in_loop ? 1.0 / host_valid_count(leading_positions(student_hidden), labels, args.ignore_index) : 1.0;
    auto [kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias] =
        fused_forward(student_hidden, student_weight, teacher, labels, student_bias, args,
                      grad_now ? grad_mask : std::array<bool, 3>{}, grad_scale, std::nullopt);
    const at::Tensor count = count_for(reduction, kd_rows, labels, args);
    auto [loss, kd, ce] = reduce_all(kd_rows, ce_rows, count, args, reduction);
    ctx->mark_non_differentiable({kd, ce});
    ctx->saved_data["reduction"] = static_cast<int64_t>(reduction);
    if (grad_now) {
      ctx->saved_data["grads"] = std::vector<at::Tensor>{grad_hidden, grad_weight, grad_bias};
      // What the backward still has to divide by: the count, unless the loop did.
      ctx->saved_data["count"] = mean_in_loop ? at::Tensor() : count;
    } else if (any_grad) {  // "none": the backward runs the loop again, weighted per position
      ctx->save_for_backward({student_hidden, student_weight, student_bias.value_or(at::Tensor()),
                              labels.value_or(at::Tensor()), teacher.first, teacher.second,
                              teacher.bias.value_or(at::Tensor())});
      ctx->saved_data["sparse_teacher"] = teacher.sparse;
      args.save(ctx);
      ctx->saved_data["grad_mask"] = std::vector<bool>(grad_mask.begin(), grad_mask.end());
    }
    return {loss, kd, ce};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);  // one per forward argument after ctx
    const at::Tensor& grad_output = grad_outputs[0];
    if (!grad_output.defined()) return grads;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused_linear_kd: double backward (create_graph=True) is not supported");
    const auto saved = ctx->saved_data.find("grads");
    if (saved != ctx->saved_data.end()) {
      TORCH_CHECK(!saved->second.isNone(),
                  "fused_linear_kd: this graph was already backpropagated; the gradients are "
                  "computed in the forward and consumed by the first backward (retain_graph=True "
                  "cannot reuse them). Call the loss again.");
      auto computed = saved->second.toTensorVector();
      saved->second = c10::IValue();  // the returned tensors are the only owners from here on
      const at::Tensor count = ctx->saved_data["count"].toTensor();
      const bool identity = !count.defined() && is_exactly_one_on_cpu(grad_output);
      const at::Tensor scale = count.defined() ? grad_output / count : grad_output;
      for (const int64_t i : {0, 1, 2}) {
        if (computed[i].sym_numel() == 0) continue;  // not asked for
        if (!identity) computed[i].mul_(scale);
        grads[i] = computed[i];  // hidden, weight, bias: the first three arguments
      }
      return grads;
    }
    if (!ctx->saved_data.count("grad_mask")) return grads;  // nothing required grad
    const auto inputs = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const LossArgs args = LossArgs::load(ctx);
    const auto mask = ctx->saved_data["grad_mask"].toBoolList();
    const Teacher teacher{ctx->saved_data["sparse_teacher"].toBool(), inputs[4], inputs[5], optional(inputs[6])};
    auto [kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias] =
        fused_forward(inputs[0], inputs[1], teacher, optional(inputs[3]), optional(inputs[2]), args,
                      {mask[0], mask[1], mask[2]}, 1.0, grad_output);
    if (mask[0]) grads[0] = grad_hidden;
    if (mask[1]) grads[1] = grad_weight;
    if (mask[2] && grad_bias.sym_numel() != 0) grads[2] = grad_bias;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> as_tuple(const variable_list& outputs) {
  return {outputs[0], outputs[1], outputs[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_with_grad(
    const char* op, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const Teacher& teacher, const std::optional<at::Tensor>& labels,
    const LossArgs& args, c10::string_view reduction) {
  // Each gradient costs a GEMM per chunk (the weight's also a float32 accumulator): only those
  // that will be used.
  const bool grad_mode = at::GradMode::is_enabled();
  const std::array<bool, 3> grad_mask{
      grad_mode && student_hidden.requires_grad(), grad_mode && student_weight.requires_grad(),
      grad_mode && student_bias.has_value() && student_bias->requires_grad()};
  return as_tuple(FusedLinearKDFunction::apply(student_hidden, student_weight, student_bias, teacher, labels, args,
                                               parse_reduction(op, reduction), grad_mask));
}

// Below autograd (inference mode, fake tensors, or after the autograd kernel): loss only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_without_grad(
    const char* op, const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const std::optional<at::Tensor>& student_bias, const Teacher& teacher, const std::optional<at::Tensor>& labels,
    const LossArgs& args, c10::string_view reduction) {
  const Reduction r = parse_reduction(op, reduction);
  auto [kd_rows, ce_rows, grad_hidden, grad_weight, grad_bias] =
      fused_forward(student_hidden, student_weight, teacher, labels, student_bias, args, {}, 1.0, std::nullopt);
  return reduce_all(kd_rows, ce_rows, count_for(r, kd_rows, labels, args), args, r);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_autograd(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
    c10::string_view loss, double alpha, double beta, double temperature, double kd_ratio,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  return loss_with_grad("fused_linear_kd", student_hidden, student_weight, student_bias,
                        {false, teacher_hidden, teacher_weight, teacher_bias}, labels,
                        {std::string(loss), alpha, beta, temperature, kd_ratio, ignore_index, chunk_size}, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_no_grad(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
    c10::string_view loss, double alpha, double beta, double temperature, double kd_ratio,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  return loss_without_grad("fused_linear_kd", student_hidden, student_weight, student_bias,
                           {false, teacher_hidden, teacher_weight, teacher_bias}, labels,
                           {std::string(loss), alpha, beta, temperature, kd_ratio, ignore_index, chunk_size},
                           reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_topk_autograd(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, c10::string_view loss, double alpha, double beta,
    double temperature, double kd_ratio, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  return loss_with_grad("fused_linear_kd_topk", student_hidden, student_weight, student_bias,
                        {true, teacher_ids, teacher_logprobs, std::nullopt}, labels,
                        {std::string(loss), alpha, beta, temperature, kd_ratio, ignore_index, chunk_size}, reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_topk_no_grad(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, c10::string_view loss, double alpha, double beta,
    double temperature, double kd_ratio, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  return loss_without_grad("fused_linear_kd_topk", student_hidden, student_weight, student_bias,
                           {true, teacher_ids, teacher_logprobs, std::nullopt}, labels,
                           {std::string(loss), alpha, beta, temperature, kd_ratio, ignore_index, chunk_size},
                           reduction);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
    c10::string_view loss, double alpha, double beta, double temperature, double kd_ratio,
    int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::fused_linear_kd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, c10::string_view, double, double, double, double,
              int64_t, c10::string_view, int64_t)>();
  return op.call(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                 teacher_bias, loss, alpha, beta, temperature, kd_ratio, ignore_index, reduction, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_topk(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& student_bias, c10::string_view loss, double alpha, double beta,
    double temperature, double kd_ratio, int64_t ignore_index, c10::string_view reduction, int64_t chunk_size) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("distillm::fused_linear_kd_topk", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view, double, double,
              double, double, int64_t, c10::string_view, int64_t)>();
  return op.call(student_hidden, student_weight, teacher_ids, teacher_logprobs, labels, student_bias, loss, alpha, beta,
                 temperature, kd_ratio, ignore_index, reduction, chunk_size);
}

// skew_kl's fused-linear form: fused_linear_kd with skl (srkl when reverse), no cross-entropy.
at::Tensor fused_linear_skew_kl(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                                const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                                const std::optional<at::Tensor>& labels,
                                const std::optional<at::Tensor>& student_bias,
                                const std::optional<at::Tensor>& teacher_bias, double alpha, bool reverse,
                                double temperature, int64_t ignore_index, c10::string_view reduction,
                                int64_t chunk_size) {
  return std::get<0>(fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                     student_bias, teacher_bias, reverse ? "srkl" : "skl", alpha,
                                     /*beta=*/0.5, temperature, /*kd_ratio=*/1.0, ignore_index, reduction,
                                     chunk_size));
}

TORCH_LIBRARY_IMPL(distillm, Autograd, m) {
  m.impl("fused_linear_kd", &fused_linear_kd_autograd);
  m.impl("fused_linear_kd_topk", &fused_linear_kd_topk_autograd);
}
TORCH_LIBRARY_IMPL(distillm, CompositeExplicitAutograd, m) {
  m.impl("fused_linear_kd", &fused_linear_kd_no_grad);
  m.impl("fused_linear_kd_topk", &fused_linear_kd_topk_no_grad);
}
TORCH_LIBRARY_IMPL(distillm, CompositeImplicitAutograd, m) {
  m.impl("fused_linear_skew_kl", &fused_linear_skew_kl);
}

}  // namespace distillm
