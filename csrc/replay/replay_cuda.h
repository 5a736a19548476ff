// CUDA schedules of the replay ops (replay_cuda.cu). Torch-free: the glue passes the stream.
// Everything is enqueued on `stream`; nothing reads device memory back to the host.
#pragma once

#include <cuda_runtime_api.h>

#include "replay_math.h"

namespace distillm::replay_impl {

void push_cuda(const PushParams& p, cudaStream_t stream);
// Writes the keys of all slots to `keys` (capacity,); the glue takes their top k.
void sample_keys_cuda(const float* priorities, const int64_t* cursor, const float* noise, float beta,
                      int64_t capacity, float* keys, cudaStream_t stream);
void gather_cuda(const GatherParams& p, cudaStream_t stream);

}  // namespace distillm::replay_impl
