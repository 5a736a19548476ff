// CUDA schedule entry point of the sparse-teacher losses (topk_cuda.cu). Torch-free: the glue
// passes the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include "topk/topk_math.h"

namespace distillm::topk_impl {

// Enqueues the forward on `stream`; same contract as topk_forward_cpu. Never synchronizes.
void topk_forward_cuda(const TopkParams& prm, cudaStream_t stream);

}  // namespace distillm::topk_impl
