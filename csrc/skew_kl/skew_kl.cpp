// Torch glue of distillm::_skew_kl_forward: input checks, allocation, the raw-pointer view the
// schedules take, and the CPU / CUDA / Meta registrations; and the backward's scaling of the
// gradient it returns (gradient_scale.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_gradient_cache.h"
#include "gradient_scale.h"
#include "no_kernel.h"
#include "reduction.h"
#include "row_layout.h"
#include "skew_kl_cpu.h"
#include "skew_kl_cuda_emulation.h"

#ifdef DISTILLM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "skew_kl_cuda.h"
#endif

namespace distillm::skew_kl_impl {
namespace {

void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& labels, double alpha, double temperature) {
  for (const auto* arg : {&student, &teacher}) {
    const char* name = arg == &student ? "student_logits" : "teacher_logits";
    const auto dtype = arg->scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "skew_kl: ",
                name, " must be float32, float16 or bfloat16, got ", dtype);
    TORCH_CHECK(arg->dim() >= 1, "skew_kl: ", name,
                " must have at least one dimension (the vocabulary), got a scalar");
  }
  TORCH_CHECK(student.sym_size(-1) == teacher.sym_size(-1),
              "skew_kl: vocabulary size (last dimension) of teacher_logits must match "
              "student_logits, got ", teacher.sym_size(-1), " and ", student.sym_size(-1));
  TORCH_CHECK(student.sym_sizes() == teacher.sym_sizes(),
              "skew_kl: teacher_logits must have the same shape as student_logits, got ",
              teacher.sym_sizes(), " and ", student.sym_sizes());
  TORCH_CHECK(student.sym_size(-1) != 0,
              "skew_kl: the vocabulary (last) dimension of the logits is empty; need at least one "
              "entry, got shape ", student.sym_sizes());
  TORCH_CHECK(student.device() == teacher.device(),
              "skew_kl: student_logits and teacher_logits must be on the same device, got ",
              student.device(), " and ", teacher.device());
  for (const auto* arg : {&student, &teacher}) {
    TORCH_CHECK(arg->sym_size(-1) == 1 || arg->sym_stride(-1) == 1, "skew_kl: ",
                arg == &student ? "student_logits" : "teacher_logits",
                " must be contiguous in its last (vocabulary) dimension, got stride ",
                arg->sym_stride(-1), "; call .contiguous() first");
  }
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false),
                "skew_kl: labels must be an integer tensor, got ", l.scalar_type());
    const auto leading = student.sym_sizes().slice(0, student.dim() - 1);
    TORCH_CHECK(l.sym_sizes() == leading, "skew_kl: labels must have the leading shape of the "
                "logits ", leading, " (logits ", student.sym_sizes(), "), got ", l.sym_sizes());
    TORCH_CHECK(l.device() == student.device(), "skew_kl: labels must be on the device of the "
                "logits (", student.device(), "), got ", l.device());
  }
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha < 1.0, "skew_kl: alpha must be in [0, 1), got ", alpha);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "skew_kl: temperature must be a positive finite number, got ", temperature);
}

Constants make_constants(double alpha, double temperature) {
  Constants c;
  c.alpha = static_cast<float>(alpha);
  c.odds = static_cast<float>((1.0 - alpha) / alpha);  // inf at alpha == 0, where it is unused
  c.neg_log_alpha = static_cast<float>(-std::log(alpha));
  c.inv_temperature = static_cast<float>(1.0 / temperature);
  c.max_y = 1e30f;
  return c;
}

DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "skew_kl: unsupported dtype ", t);
  }
}

void check_divisor(const at::Tensor& student, const std::optional<at::Tensor>& divisor) {
  if (!divisor) return;
  TORCH_CHECK(divisor->scalar_type() == at::kFloat && divisor->sym_numel() == 1,
              "skew_kl: grad_divisor must be one float32 element, got ", divisor->scalar_type(),
              " of shape ", divisor->sym_sizes());
  TORCH_CHECK(divisor->device() == student.device(), "skew_kl: grad_divisor must be on the device "
              "of the logits (", student.device(), "), got ", divisor->device());
}

std::vector<c10::SymInt> leading_shape(const at::Tensor& t) {
  const auto sizes = t.sym_sizes();
  return {sizes.begin(), sizes.end() - 1};
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& student, bool compute_grad) {
  at::Tensor row_loss = at::empty_symint(leading_shape(student), student.options().dtype(at::kFloat));
  at::Tensor grad = !compute_grad             ? at::empty({0}, student.options())
                    : student.device().is_cpu() ? empty_cpu_gradient(student.sizes(), student.scalar_type())
                                                : at::empty_symint(student.sym_sizes(), student.options());
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& labels, double alpha,
                                                bool reverse, double temperature, int64_t ignore_index,
                                                bool compute_grad, double grad_scale,
                                                const std::optional<at::Tensor>& grad_divisor) {
  check_inputs(student, teacher, labels, alpha, temperature);
  check_divisor(student, grad_divisor);
  auto [row_loss, grad] = allocate_outputs(student, compute_grad);
  const int64_t vocab = student.size(-1);
  const int64_t num_rows = student.numel() / vocab;
  if (num_rows == 0) return {row_loss, grad};
  const bool cuda_formulas = student.is_cuda() || cuda_emulation_requested();  // the kernel, or its emulation
  TORCH_CHECK(!cuda_formulas || vocab <= kMaxCudaVocab,
              "skew_kl: the CUDA kernel takes at most 2^30 vocabulary entries, got ", vocab);

  ForwardParams prm{};
  const at::Tensor student_rows = with_row_layout(student, prm.student_rows);
  const at::Tensor teacher_rows = with_row_layout(teacher, prm.teacher_rows);
  at::Tensor flat_labels;
  if (labels.has_value()) flat_labels = labels->reshape({-1}).to(at::kLong).contiguous();
  prm.student = student_rows.data_ptr();
  prm.teacher = teacher_rows.data_ptr();
  prm.student_dtype = dtype_code(student.scalar_type());
  prm.teacher_dtype = dtype_code(teacher.scalar_type());
  prm.num_rows = num_rows;
  prm.vocab = vocab;
  prm.labels = flat_labels.defined() ? flat_labels.data_ptr<int64_t>() : nullptr;
  prm.ignore_index = ignore_index;
  prm.row_loss = row_loss.data_ptr<float>();
  prm.grad = compute_grad ? grad.data_ptr() : nullptr;
  prm.constants = make_constants(alpha, temperature);
  prm.grad_scale = static_cast<float>(grad_scale / temperature);  // d/dz carries 1/tau
  prm.grad_divisor = compute_grad && grad_divisor ? grad_divisor->data_ptr<float>() : nullptr;
  prm.reverse = reverse;

  if (student.is_cpu()) {
    skew_kl_forward_cpu(prm);
    return {row_loss, grad};
  }
#ifdef DISTILLM_WITH_CUDA
  if (student.is_cuda()) {
    const c10::cuda::CUDAGuard device_guard(student.device());
    skew_kl_forward_cuda(prm, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row_loss, grad};
  }
#endif
  no_kernel("skew_kl", student.device());
}

std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& labels, double alpha,
                                                bool /*reverse*/, double temperature,
                                                int64_t /*ignore_index*/, bool compute_grad,
                                                double /*grad_scale*/,
                                                const std::optional<at::Tensor>& grad_divisor) {
  check_inputs(student, teacher, labels, alpha, temperature);
  check_divisor(student, grad_divisor);
  return allocate_outputs(student, compute_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillm, CPU, m) { m.impl("_skew_kl_forward", &forward_impl); }
TORCH_LIBRARY_IMPL(distillm, Meta, m) { m.impl("_skew_kl_forward", &forward_meta); }
#ifdef DISTILLM_WITH_CUDA
TORCH_LIBRARY_IMPL(distillm, CUDA, m) { m.impl("_skew_kl_forward", &forward_impl); }
#endif

}  // namespace distillm::skew_kl_impl

namespace distillm {

void scale_unless_one_(at::Tensor& grad, const at::Tensor& factor) {
  if (is_exactly_one_on_cpu(factor)) return;
#ifdef DISTILLM_WITH_CUDA
  if (grad.is_cuda() && factor.is_cuda() && factor.numel() == 1 && grad.is_contiguous() &&
      !at::isTensorSubclassLike(grad) && !at::isTensorSubclassLike(factor)) {
    const c10::cuda::CUDAGuard device_guard(grad.device());
    // A temporary is safe: the caching allocator reuses its memory only after this stream's
    // kernel has read it.
    const at::Tensor f = factor.to(at::kFloat).contiguous();
    skew_kl_impl::scale_unless_one_cuda(grad.data_ptr(), skew_kl_impl::dtype_code(grad.scalar_type()),
                                        grad.numel(), f.data_ptr<float>(),
                                        c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  grad.mul_(factor);
}

}  // namespace distillm
