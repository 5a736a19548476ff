// Reductions of a per-position loss, shared by the ops' autograd glue: parsing the `reduction`
// argument, and the host-side facts that let a kernel fold the mean's 1/count into its gradient.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>

#include <algorithm>
#include <string>

namespace distillm {

enum class Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

inline Reduction parse_reduction(const char* op, c10::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, op, ": reduction must be 'mean', 'sum' or 'none', got '",
                    std::string(reduction), "'");
}

// A plain CPU tensor, whose values can be read now: not CUDA (reading waits for the device),
// not a fake or functional tensor of torch.compile's tracing (it has no values).
inline bool holds_host_data(const at::Tensor& t) {
  return t.is_cpu() && !at::isTensorSubclassLike(t);
}

// The incoming gradient is exactly 1, read without waiting for a device.
inline bool is_exactly_one_on_cpu(const at::Tensor& grad_output) {
  return holds_host_data(grad_output) && grad_output.numel() == 1 && grad_output.item<double>() == 1.0;
}

// Number of positions that count for "mean": a 0-dim float tensor on the loss device, so that
// nothing waits for the device. Clamped to 1: no valid position gives a 0 loss, not NaN.
// `positions`: any tensor of the positions' shape (the per-position loss, say).
inline at::Tensor valid_count(const at::Tensor& positions, const std::optional<at::Tensor>& labels,
                              int64_t ignore_index) {
  at::Tensor valid = labels.has_value() ? labels->ne(ignore_index) : at::ones_like(positions);
  return valid.sum(at::kFloat).clamp_min(1.0);
}

// Positions of a (..., last) tensor: the product of its leading sizes.
inline int64_t leading_positions(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : t.numel() / std::max<int64_t>(t.size(-1), 1);
}

// The same count on the host, for kernels that fold 1/count into the gradient they write.
inline double host_valid_count(int64_t rows, const std::optional<at::Tensor>& labels, int64_t ignore_index) {
  const int64_t valid = labels.has_value() ? labels->ne(ignore_index).sum().item<int64_t>() : rows;
  return static_cast<double>(std::max<int64_t>(valid, 1));
}

inline at::Tensor reduce(const at::Tensor& row_loss, const at::Tensor& count, Reduction reduction) {
  switch (reduction) {
    case Reduction::kMean: return row_loss.sum() / count;
    case Reduction::kSum: return row_loss.sum();
    case Reduction::kNone: return row_loss;
  }
  TORCH_CHECK(false, "unknown reduction code ", static_cast<int64_t>(reduction));
}

// num_items as a 0-dim float32 tensor on the logits' device.
inline at::Tensor as_count(const at::Tensor& num_items, const at::Tensor& logits) {
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

inline MeanDenominator mean_denominator(const at::Tensor& student, const std::optional<at::Tensor>& labels,
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

inline void check_num_items(const char* op, const std::optional<at::Tensor>& num_items, Reduction reduction) {
  if (!num_items) return;
  TORCH_CHECK_VALUE(reduction == Reduction::kMean, op, ": num_items is the denominator of "
                    "reduction='mean'; it cannot be used with another reduction");
  TORCH_CHECK_VALUE(num_items->sym_numel() == 1 && num_items->scalar_type() != at::kBool &&
                        !at::isComplexType(num_items->scalar_type()),
                    op, ": num_items must be one real number, got ", num_items->scalar_type(),
                    " of shape ", num_items->sym_sizes());
}

}  // namespace distillm
