// CPU schedules of the replay ops: plain loops over a few thousand elements, no threads (a
// buffer batch is far too small to pay for a parallel region).
#include "replay_cpu.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace distillm::replay_impl {

void push_cpu(const PushParams& p) {
  const int64_t next = p.storage.cursor[kNext];
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t t = 0; t < p.storage.max_length; ++t) push_element(p, next, b, t);
  }
  advance_cursor(p.storage.cursor, p.skipped + p.batch, p.storage.capacity);
}

void sample_cpu(const float* priorities, const int64_t* cursor, const float* noise, float beta,
                int64_t capacity, int64_t k, float* keys, int64_t* indices) {
  const int64_t filled = cursor[kFilled];
  for (int64_t slot = 0; slot < capacity; ++slot) {
    keys[slot] = sample_key(noise[slot], priorities[slot], beta, slot < filled);
  }
  std::vector<int64_t> order(capacity);
  std::iota(order.begin(), order.end(), 0);
  // Ties (equal keys) go to the lower slot, as in a stable sort.
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [keys](int64_t a, int64_t b) {
    return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
  });
  std::copy(order.begin(), order.begin() + k, indices);
}

void gather_cpu(const GatherParams& p) {
  for (int64_t i = 0; i < p.rows; ++i) {
    for (int64_t t = 0; t < p.max_length; ++t) gather_element(p, i, t);
  }
}

}  // namespace distillm::replay_impl
