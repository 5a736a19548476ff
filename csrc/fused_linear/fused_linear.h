// C++ entry points of the fused-linear distillation losses, for libtorch programs: the same
// operators as torch.ops.distillm.fused_linear_skew_kl / fused_linear_kd. They take the final
// hidden states and the output embeddings instead of logits, and never build a
// [positions, vocabulary] tensor. Differentiable with respect to the student's hidden states,
// output embedding and bias; the teacher's inputs are constants.
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace distillm {

// skew_kl(student_hidden @ student_weight[:V].T + student_bias[:V],
//         teacher_hidden @ teacher_weight[:V].T + teacher_bias[:V], labels, ...)
// with V = min(rows of the two weights). student_hidden (..., Hs), student_weight (Vs, Hs),
// teacher_hidden (..., Ht), teacher_weight (Vt, Ht); labels (...). chunk_size: positions per
// chunk, 0 = automatic.
at::Tensor fused_linear_skew_kl(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                                const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
                                const std::optional<at::Tensor>& labels = std::nullopt,
                                const std::optional<at::Tensor>& student_bias = std::nullopt,
                                const std::optional<at::Tensor>& teacher_bias = std::nullopt,
                                double alpha = 0.1, bool reverse = false, double temperature = 1.0,
                                int64_t ignore_index = -100, c10::string_view reduction = "mean",
                                int64_t chunk_size = 0);

// Any DistiLLM loss type (fkl, rkl, skl, srkl, jsd, tvd) mixed with cross-entropy on the labels:
// loss = kd_ratio * KD + (1 - kd_ratio) * CE, all from the same chunk logits. Returns
// (loss, kd, ce); only `loss` is differentiable, kd and ce are its parts for logging.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight,
    const std::optional<at::Tensor>& labels = std::nullopt,
    const std::optional<at::Tensor>& student_bias = std::nullopt,
    const std::optional<at::Tensor>& teacher_bias = std::nullopt, c10::string_view loss = "skl",
    double alpha = 0.1, double beta = 0.5, double temperature = 1.0, double kd_ratio = 1.0,
    int64_t ignore_index = -100, c10::string_view reduction = "mean", int64_t chunk_size = 0);

// fused_linear_kd with a sparse teacher: (..., K) top-k ids and log-probabilities at
// temperature T per position, as for skew_kl_topk, instead of the teacher's hidden states.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_kd_topk(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
    const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& labels = std::nullopt,
    const std::optional<at::Tensor>& student_bias = std::nullopt, c10::string_view loss = "skl",
    double alpha = 0.1, double beta = 0.5, double temperature = 1.0, double kd_ratio = 1.0,
    int64_t ignore_index = -100, c10::string_view reduction = "mean", int64_t chunk_size = 0);

}  // namespace distillm
