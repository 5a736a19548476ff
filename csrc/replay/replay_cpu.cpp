// CPU schedules of the replay ops: plain loops over a few thousand elements, no threads (a
// buffer batch is far too small to pay for a parallel region).
#include "replay_cpu.h"

#include <algorithm>
#include <functional>
#include <numeric>
#include <vector>

namespace distillm::replay_impl {

void push_cpu(const PushParams& p) {
  const int64_t next = p.storage.cursor[kNext];
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t slot = push_slot(p, next, b);
    push_row_meta(p, slot, b);
    // Row-wise copy and fill: the same tokens as pushed_token(p, b, t) for every t.
    const int64_t length = push_length(p, b);
    int64_t* row = p.storage.tokens + slot * p.storage.max_length;
    std::copy_n(p.input_ids + b * p.width, length, row);
    std::fill(row + length, row + p.storage.max_length, p.pad_token_id);
  }
  advance_cursor(p.storage.cursor, p.skipped + p.batch, p.storage.capacity);
}

void sample_uniform_cpu(int64_t filled, int64_t k, const std::function<uint64_t()>& random64,
                        int64_t* indices) {
  // Floyd's algorithm: k distinct slots from [0, filled) with k draws, each k-subset equally
  // likely; then a Fisher-Yates shuffle so that the order is uniform too.
  std::vector<char> taken(filled, 0);
  int64_t count = 0;
  for (int64_t j = filled - k; j < filled; ++j) {
    const int64_t t = static_cast<int64_t>(random64() % static_cast<uint64_t>(j + 1));
    const int64_t slot = taken[t] ? j : t;
    taken[slot] = 1;
    indices[count++] = slot;
  }
  for (int64_t i = k - 1; i > 0; --i) {
    std::swap(indices[i], indices[static_cast<int64_t>(random64() % static_cast<uint64_t>(i + 1))]);
  }
}

void sample_weighted_cpu(const float* priorities, int64_t filled, const float* noise, float beta, int64_t k,
                         int64_t* indices) {
  std::vector<float> keys(filled);
  for (int64_t slot = 0; slot < filled; ++slot) keys[slot] = sample_key(noise[slot], priorities[slot], beta, true);
  std::vector<int64_t> order(filled);
  std::iota(order.begin(), order.end(), 0);
  // Ties go to the lower slot, as in a stable sort.
  std::partial_sort(order.begin(), order.begin() + k, order.end(), [&keys](int64_t a, int64_t b) {
    return keys[a] > keys[b] || (keys[a] == keys[b] && a < b);
  });
  std::copy(order.begin(), order.begin() + k, indices);
}

void gather_cpu(const GatherParams& p) {
  for (int64_t i = 0; i < p.rows; ++i) {
    const GatherRow row = gather_row(p, i);
    // Row-wise copies and fills: the same values as gather_element(p, row, i, t) for every t.
    const int64_t out = i * p.max_length, end = out + p.max_length;
    const int64_t* tokens = p.tokens + row.slot * p.max_length;
    std::copy_n(tokens, row.length, p.input_ids + out);
    std::fill(p.input_ids + out + row.length, p.input_ids + end, p.pad_token_id);
    std::fill(p.attention_mask + out, p.attention_mask + out + row.length, 1);
    std::fill(p.attention_mask + out + row.length, p.attention_mask + end, 0);
    std::fill(p.labels + out, p.labels + out + row.prompt_length, p.ignore_index);
    std::copy(tokens + row.prompt_length, tokens + row.length, p.labels + out + row.prompt_length);
    std::fill(p.labels + out + row.length, p.labels + end, p.ignore_index);
  }
}

}  // namespace distillm::replay_impl
