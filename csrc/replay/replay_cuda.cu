// CUDA schedules of the replay ops: one thread per element. The write position and fill count
// are read on the device, so no launch waits for the host.
#include "replay_cuda.h"

namespace distillm::replay_impl {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__global__ void push_kernel(PushParams p) {
  const int64_t next = p.storage.cursor[kNext];
  const int64_t total = p.batch * p.storage.max_length;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = e / p.storage.max_length, t = e % p.storage.max_length;
    const int64_t slot = push_slot(p, next, b);
    p.storage.tokens[slot * p.storage.max_length + t] = pushed_token(p, b, t);
    if (t == 0) push_row_meta(p, slot, b);
  }
}

// A separate launch: every push_kernel thread must read the old cursor before it moves.
__global__ void advance_cursor_kernel(int64_t* cursor, int64_t batch, int64_t capacity) {
  advance_cursor(cursor, batch, capacity);
}

__global__ void keys_kernel(const float* priorities, const int64_t* cursor, const float* noise,
                            float beta, int64_t capacity, float* keys) {
  const int64_t filled = cursor[kFilled];
  for (int64_t slot = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; slot < capacity;
       slot += int64_t{gridDim.x} * blockDim.x) {
    keys[slot] = sample_key(noise[slot], priorities[slot], beta, slot < filled);
  }
}

__global__ void gather_kernel(GatherParams p) {
  const int64_t total = p.rows * p.max_length;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / p.max_length;
    gather_element(p, gather_row(p, i), i, e % p.max_length);
  }
}

}  // namespace

void push_cuda(const PushParams& p, cudaStream_t stream) {
  push_kernel<<<blocks_for(p.batch * p.storage.max_length), kThreads, 0, stream>>>(p);
  advance_cursor_kernel<<<1, 1, 0, stream>>>(p.storage.cursor, p.skipped + p.batch, p.storage.capacity);
}

void sample_keys_cuda(const float* priorities, const int64_t* cursor, const float* noise, float beta,
                      int64_t capacity, float* keys, cudaStream_t stream) {
  keys_kernel<<<blocks_for(capacity), kThreads, 0, stream>>>(priorities, cursor, noise, beta, capacity, keys);
}

void gather_cuda(const GatherParams& p, cudaStream_t stream) {
  gather_kernel<<<blocks_for(p.rows * p.max_length), kThreads, 0, stream>>>(p);
}

}  // namespace distillm::replay_impl
