// Torch glue of distillm::_kd_topk_forward: input checks, the ids sorted per row (the kernels
// walk them in order), allocation, and the CPU / CUDA / Meta registrations.
#include "topk/topk.h"

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/library.h>

#include <cmath>

#include "fused_linear/chunk_math.h"
#include "no_kernel.h"
#include "row_layout.h"
#include "skew_kl/cpu_gradient_cache.h"
#include "topk/topk_cpu.h"

#ifdef DISTILLM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "topk/topk_cuda.h"
#endif

namespace distillm {

void check_sparse_teacher(const char* op, c10::SymIntArrayRef leading, const c10::SymInt& vocab,
                          const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs, at::Device device) {
  TORCH_CHECK(at::isIntegralType(teacher_ids.scalar_type(), /*includeBool=*/false), op,
              ": teacher_ids must be an integer tensor (int32 or int64), got ", teacher_ids.scalar_type());
  const auto lp_dtype = teacher_logprobs.scalar_type();
  TORCH_CHECK(lp_dtype == at::kFloat || lp_dtype == at::kHalf || lp_dtype == at::kBFloat16, op,
              ": teacher_logprobs must be float32, float16 or bfloat16, got ", lp_dtype);
  TORCH_CHECK(teacher_ids.dim() >= 1 && teacher_ids.sym_sizes().slice(0, teacher_ids.dim() - 1) == leading, op,
              ": teacher_ids must have shape (..., K) with the positions' leading shape ", leading, ", got ",
              teacher_ids.sym_sizes());
  TORCH_CHECK(teacher_logprobs.sym_sizes() == teacher_ids.sym_sizes(), op,
              ": teacher_logprobs must have the shape of teacher_ids ", teacher_ids.sym_sizes(), ", got ",
              teacher_logprobs.sym_sizes());
  TORCH_CHECK(teacher_ids.sym_size(-1) <= vocab, op, ": teacher_ids has K = ", teacher_ids.sym_size(-1),
              " ids per position, more than the vocabulary's ", vocab, " entries");
  for (const at::Tensor* t : {&teacher_ids, &teacher_logprobs}) {
    TORCH_CHECK(t->device() == device, op, ": ", t == &teacher_ids ? "teacher_ids" : "teacher_logprobs",
                " must be on the device of the student (", device, "), got ", t->device());
  }
}

void check_sparse_teacher_ids(const char* op, const at::Tensor& teacher_ids, int64_t vocab) {
  if (at::isTensorSubclassLike(teacher_ids) || teacher_ids.numel() == 0) return;
  check_sorted_ids(op, std::get<0>(teacher_ids.reshape({-1, teacher_ids.size(-1)}).sort(-1)), vocab);
}

void check_sorted_ids(const char* op, const at::Tensor& sorted, int64_t vocab) {
  if (at::isTensorSubclassLike(sorted) || sorted.numel() == 0) return;
  const at::Tensor repeats = sorted.narrow(1, 1, sorted.size(1) - 1).eq(sorted.narrow(1, 0, sorted.size(1) - 1));
  // One read of three numbers: the lowest id, the highest, and whether a row repeats one.
  const at::Tensor facts = at::stack({sorted.min().to(at::kLong), sorted.max().to(at::kLong),
                                      repeats.any().to(at::kLong)}).cpu();
  const int64_t* f = facts.data_ptr<int64_t>();
  TORCH_CHECK_INDEX(f[0] >= 0 && f[1] < vocab, op, ": teacher_ids must be in [0, ", vocab,
                    "), the vocabulary; got ids from ", f[0], " to ", f[1]);
  TORCH_CHECK_VALUE(f[2] == 0, op, ": teacher_ids must be distinct within each position; a position repeats an id");
}

namespace topk_impl {
namespace {

constexpr const char* kOp = "skew_kl_topk";

void check_inputs(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& log_probs,
                  const std::optional<at::Tensor>& labels, double temperature) {
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": student_logits must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(student.dim() >= 1, kOp, ": student_logits must have at least one dimension (the vocabulary)");
  TORCH_CHECK(student.sym_size(-1) != 0, kOp, ": the vocabulary (last) dimension of student_logits is empty");
  TORCH_CHECK(student.sym_size(-1) == 1 || student.sym_stride(-1) == 1, kOp,
              ": student_logits must be contiguous in its last (vocabulary) dimension, got stride ",
              student.sym_stride(-1), "; call .contiguous() first");
  const auto leading = student.sym_sizes().slice(0, student.dim() - 1);
  check_sparse_teacher(kOp, leading, student.sym_size(-1), ids, log_probs, student.device());
  if (labels.has_value()) {
    TORCH_CHECK(at::isIntegralType(labels->scalar_type(), /*includeBool=*/false), kOp,
                ": labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK(labels->sym_sizes() == leading, kOp, ": labels must have the leading shape of the logits ",
                leading, ", got ", labels->sym_sizes());
    TORCH_CHECK(labels->device() == student.device(), kOp, ": labels must be on the device of the logits (",
                student.device(), "), got ", labels->device());
  }
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), kOp,
                    ": temperature must be a positive finite number, got ", temperature);
}

LossSpec loss_spec(c10::string_view name, double alpha, double beta, double temperature) {
  const fused_linear_impl::LossSpec parsed = fused_linear_impl::parse_loss(name, alpha, beta, temperature, kOp);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, kOp, ": alpha must be in [0, 1), got ", alpha);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, kOp, ": beta must be in (0, 1), got ", beta);
  switch (parsed.divergence) {
    case fused_linear_impl::Divergence::kSkew: return {Divergence::kSkew, parsed.alpha, parsed.reverse, beta};
    case fused_linear_impl::Divergence::kJSD: return {Divergence::kJSD, 0.0, false, beta};
    case fused_linear_impl::Divergence::kTVD: return {Divergence::kTVD, 0.0, false, beta};
  }
  TORCH_CHECK(false, kOp, ": unknown divergence");
}

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, kOp, ": unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& student, bool compute_grad) {
  const auto sizes = student.sym_sizes();
  at::Tensor row_loss = at::empty_symint(sizes.slice(0, student.dim() - 1), student.options().dtype(at::kFloat));
  at::Tensor grad = !compute_grad               ? at::empty({0}, student.options())
                    : student.device().is_cpu() ? skew_kl_impl::empty_cpu_gradient(student.sizes(), student.scalar_type())
                                                : at::empty_symint(sizes, student.options());
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& student, const at::Tensor& ids,
                                                const at::Tensor& log_probs, const std::optional<at::Tensor>& labels,
                                                c10::string_view loss, double alpha, double beta, double temperature,
                                                int64_t ignore_index, bool compute_grad, double grad_scale,
                                                const std::optional<at::Tensor>& grad_divisor) {
  check_inputs(student, ids, log_probs, labels, temperature);
  const LossSpec spec = loss_spec(loss, alpha, beta, temperature);
  const int64_t vocab = student.size(-1), k = ids.size(-1);
  auto [row_loss, grad] = allocate_outputs(student, compute_grad);
  const int64_t num_rows = student.numel() / vocab;
  if (num_rows == 0) return {row_loss, grad};

  TopkParams prm{};
  const at::Tensor student_rows = with_row_layout(student, prm.student_rows);
  // The kernels find the kept ids in order: sorted per row, their log-probabilities alike. The
  // checks read the same sorted rows: one sort.
  auto [sorted_ids, order] = ids.reshape({num_rows, k}).to(at::kLong).sort(-1);
  check_sorted_ids(kOp, sorted_ids, vocab);
  const at::Tensor sorted_log_probs = log_probs.reshape({num_rows, k}).gather(1, order).to(at::kFloat).contiguous();
  sorted_ids = sorted_ids.contiguous();
  at::Tensor flat_labels;
  if (labels.has_value()) flat_labels = labels->reshape({-1}).to(at::kLong).contiguous();
  prm.student = student_rows.data_ptr();
  prm.student_dtype = dtype_code(student.scalar_type());
  prm.num_rows = num_rows;
  prm.vocab = vocab;
  prm.k = k;
  prm.ids = sorted_ids.data_ptr<int64_t>();
  prm.log_probs = sorted_log_probs.data_ptr<float>();
  prm.labels = flat_labels.defined() ? flat_labels.data_ptr<int64_t>() : nullptr;
  prm.ignore_index = ignore_index;
  prm.row_loss = row_loss.data_ptr<float>();
  prm.grad = compute_grad ? grad.data_ptr() : nullptr;
  prm.grad_scale = static_cast<float>(grad_scale / temperature);  // d/dz carries 1/T
  prm.grad_divisor = compute_grad && grad_divisor ? grad_divisor->data_ptr<float>() : nullptr;
  prm.inv_temperature = static_cast<float>(1.0 / temperature);
  prm.loss = spec;

  if (student.is_cpu()) {
    topk_forward_cpu(prm);
    return {row_loss, grad};
  }
#ifdef DISTILLM_WITH_CUDA
  if (student.is_cuda()) {
    const c10::cuda::CUDAGuard device_guard(student.device());
    topk_forward_cuda(prm, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row_loss, grad};
  }
#endif
  no_kernel(kOp, student.device());
}

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& student, const at::Tensor& ids,
                                                const at::Tensor& log_probs, const std::optional<at::Tensor>& labels,
                                                c10::string_view loss, double alpha, double beta, double temperature,
                                                int64_t /*ignore_index*/, bool compute_grad, double /*grad_scale*/,
                                                const std::optional<at::Tensor>& /*grad_divisor*/) {
  check_inputs(student, ids, log_probs, labels, temperature);
  loss_spec(loss, alpha, beta, temperature);
  return allocate_outputs(student, compute_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillm, CPU, m) { m.impl("_kd_topk_forward", &forward_impl); }
TORCH_LIBRARY_IMPL(distillm, Meta, m) { m.impl("_kd_topk_forward", &forward_meta); }
#ifdef DISTILLM_WITH_CUDA
TORCH_LIBRARY_IMPL(distillm, CUDA, m) { m.impl("_kd_topk_forward", &forward_impl); }
#endif

}  // namespace topk_impl
}  // namespace distillm
