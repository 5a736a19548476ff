// The backward's scaling of a fused gradient by the incoming gradient (defined in skew_kl.cpp,
// beside the kernels' glue).
#pragma once

#include <ATen/core/Tensor.h>

namespace distillm {

// grad *= factor (one element), skipped when the factor is exactly 1: on CPU the host reads it;
// on CUDA a kernel does and returns at once, so `loss.backward()` of a mean costs no pass over
// the gradient and no host sync. Fake tensors (torch.compile) take the plain multiply.
void scale_unless_one_(at::Tensor& grad, const at::Tensor& factor);

}  // namespace distillm
