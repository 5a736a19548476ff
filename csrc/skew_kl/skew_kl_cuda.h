// CUDA schedule entry point (skew_kl_cuda.cu). Torch-free: the glue passes the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "skew_kl_math.h"

namespace distillm::skew_kl_impl {

// Enqueues the forward on `stream`; same contract as skew_kl_forward_cpu. Never synchronizes.
void skew_kl_forward_cuda(const ForwardParams& prm, cudaStream_t stream);

// data[0..n) *= *factor, unless *factor == 1 (read on the device, so no host sync): then every
// block returns at once and the backward costs no pass over the gradient.
void scale_unless_one_cuda(void* data, DType dtype, int64_t n, const float* factor, cudaStream_t stream);

}  // namespace distillm::skew_kl_impl
