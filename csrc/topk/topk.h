// C++ entry points of the sparse-teacher (top-k) losses, for libtorch programs: the same
// operators as torch.ops.distillm.skew_kl_topk and its row building block.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace distillm {

// skew_kl with the teacher known only at K ids per position: the loss on the K kept ids plus
// one tail class (topk_math.h). student_logits (..., V) float32/float16/bfloat16; teacher_ids
// (..., K) int32/int64, distinct per row, in [0, V); teacher_logprobs (..., K) float32/16/bf16,
// the teacher's log-probabilities at temperature T. The rest as for skew_kl.
at::Tensor skew_kl_topk(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                        const at::Tensor& teacher_logprobs,
                        const std::optional<at::Tensor>& labels = std::nullopt, double alpha = 0.1,
                        bool reverse = false, double temperature = 1.0, int64_t ignore_index = -100,
                        c10::string_view reduction = "mean",
                        const std::optional<at::Tensor>& num_items = std::nullopt);

// The building block (torch.ops.distillm._kd_topk_forward), for any loss type (fkl, rkl, skl,
// sfkl, srkl, jsd, tvd): the float32 loss per position and, if compute_grad, grad_scale *
// d(loss_row)/d(student_logits) in the student's dtype and shape, divided by grad_divisor if
// given. Not differentiable itself.
std::tuple<at::Tensor, at::Tensor> kd_topk_rows(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                                                const at::Tensor& teacher_logprobs,
                                                const std::optional<at::Tensor>& labels, c10::string_view loss,
                                                double alpha, double beta, double temperature, int64_t ignore_index,
                                                bool compute_grad, double grad_scale,
                                                const std::optional<at::Tensor>& grad_divisor = std::nullopt);

// Checks a sparse teacher against the positions it covers (`leading`, the student's leading
// shape) and the vocabulary: dtypes, shapes, K <= V, device. One-line errors name the argument.
void check_sparse_teacher(const char* op, c10::SymIntArrayRef leading, const c10::SymInt& vocab,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs, at::Device device);

// Checks that the ids are in [0, vocab) and distinct in each row: reads them (waits for a CUDA
// device). Skipped for tensors without values (fake tensors of torch.compile).
void check_sparse_teacher_ids(const char* op, const at::Tensor& teacher_ids, int64_t vocab);

// The same, on (rows, K) ids already sorted within each row.
void check_sorted_ids(const char* op, const at::Tensor& sorted_ids, int64_t vocab);

}  // namespace distillm
