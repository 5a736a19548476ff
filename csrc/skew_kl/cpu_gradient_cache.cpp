#include "cpu_gradient_cache.h"

#include <c10/core/impl/alloc_cpu.h>

#include <mutex>
#include <vector>

namespace distillm::skew_kl_impl {
namespace {

// Below this, malloc keeps and reuses freed blocks by itself.
constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kMaxCachedBlocks = 2;

struct Block {
  void* data;
  size_t bytes;
};

class BlockCache {
 public:
  // A cached block of at least `bytes` and at most twice that (a bigger one would hold memory
  // the tensor cannot use), or a new block.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes / 2 <= bytes && (best == free_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        const Block block = *best;
        free_.erase(best);
        return block;
      }
    }
    return {c10::alloc_cpu(bytes), bytes};
  }

  // Keeps a freed block, evicting the oldest one beyond kMaxCachedBlocks.
  void give_back(Block block) {
    Block evicted{nullptr, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      if (free_.size() > kMaxCachedBlocks) {
        evicted = free_.front();
        free_.erase(free_.begin());
      }
    }
    if (evicted.data != nullptr) c10::free_cpu(evicted.data);
  }

  int64_t release() {
    std::vector<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
    }
    int64_t bytes = 0;
    for (const Block& block : blocks) {
      c10::free_cpu(block.data);
      bytes += static_cast<int64_t>(block.bytes);
    }
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Block> free_;
};

// Never destroyed: tensors still alive at exit hand their blocks back after static destructors.
BlockCache& cache() {
  static auto* instance = new BlockCache();
  return *instance;
}

}  // namespace

at::Tensor empty_cpu_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * at::elementSize(dtype);
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  const Block block = cache().take(bytes);
  return at::from_blob(block.data, sizes, [block](void*) { cache().give_back(block); }, options);
}

int64_t release_cached_gradients() { return cache().release(); }

}  // namespace distillm::skew_kl_impl
