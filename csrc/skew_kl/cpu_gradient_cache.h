// Reuses the memory of freed CPU gradients of skew_kl.
//
// Every training step allocates a gradient the size of the logits (250 MB at 2048 x 32000 in
// float) and frees it after the backward pass. PyTorch's CPU allocator returns blocks that size
// to the OS at once, so the next step's first write faults in every 4 kB page again: on the
// 2-core VM of benchmarks/RESULTS.md that was about half of a forward + backward. PyTorch's CUDA
// caching allocator keeps such blocks; this cache does the same for this one tensor, keeping at
// most two freed blocks (a loss kept alive while the next one is computed) until
// release_cached_gradients().
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace distillm::skew_kl_impl {

// An uninitialized contiguous CPU tensor, backed by a cached block when one fits.
at::Tensor empty_cpu_gradient(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees the cached blocks; returns how many bytes that gave back.
int64_t release_cached_gradients();

}  // namespace distillm::skew_kl_impl
