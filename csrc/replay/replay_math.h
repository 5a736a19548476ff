// Torch-free per-element math of the replay buffer ops, shared by the CPU and CUDA schedules.
//
// Storage (all on the training device, row `slot` of each):
//   tokens     (capacity, max_length) int64, right-padded with the pad id
//   meta       (capacity, 3) int64: prompt length, total length, step at insertion
//   priorities (capacity,) float32, 1 on insertion
//   cursor     (2,) int64: next slot to write (the oldest entry once full), number filled
// Slots fill 0, 1, 2, ... and then wrap around (FIFO), so slot i holds an entry iff i < filled.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace distillm::replay_impl {

enum MetaField : int64_t { kPromptLength = 0, kLength = 1, kStep = 2, kMetaFields = 3 };
enum CursorField : int64_t { kNext = 0, kFilled = 1 };

struct Storage {
  int64_t* tokens;
  int64_t* meta;
  float* priorities;
  int64_t* cursor;
  int64_t capacity;
  int64_t max_length;
};

struct PushParams {
  Storage storage;
  const int64_t* input_ids;       // (batch, width), right-padded
  const int64_t* prompt_lengths;  // (batch,)
  const int64_t* lengths;         // (batch,)
  int64_t batch;                  // rows to write, <= capacity
  int64_t skipped;                // older rows of the pushed batch, evicted before being stored
  int64_t width;                  // <= max_length
  int64_t step;
  int64_t pad_token_id;
};

struct GatherParams {
  const int64_t* tokens;
  const int64_t* meta;
  const int64_t* indices;  // (rows,) slots
  int64_t rows;
  int64_t* input_ids;      // (rows, max_length) outputs
  int64_t* attention_mask;
  int64_t* labels;
  int64_t capacity;
  int64_t max_length;
  int64_t pad_token_id;
  int64_t ignore_index;
};

DISTILLM_HD int64_t clamp_to(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}

DISTILLM_HD int64_t push_slot(const PushParams& p, int64_t next, int64_t b) {
  return (next + p.skipped + b) % p.storage.capacity;
}

// Lengths are clamped into [0, width] and prompt lengths into [0, length] (the CPU glue
// rejects such values instead; on CUDA a check would need a host sync).
DISTILLM_HD int64_t push_length(const PushParams& p, int64_t b) { return clamp_to(p.lengths[b], 0, p.width); }

// Row b's metadata and priority, written once per row.
DISTILLM_HD void push_row_meta(const PushParams& p, int64_t slot, int64_t b) {
  const int64_t length = push_length(p, b);
  int64_t* meta = p.storage.meta + slot * kMetaFields;
  meta[kPromptLength] = clamp_to(p.prompt_lengths[b], 0, length);
  meta[kLength] = length;
  meta[kStep] = p.step;
  p.storage.priorities[slot] = 1.0f;
}

// Token t of row b as stored: the input up to the row's length, padding after it.
DISTILLM_HD int64_t pushed_token(const PushParams& p, int64_t b, int64_t t) {
  return t < push_length(p, b) ? p.input_ids[b * p.width + t] : p.pad_token_id;
}

DISTILLM_HD void advance_cursor(int64_t* cursor, int64_t batch, int64_t capacity) {
  cursor[kNext] = (cursor[kNext] + batch) % capacity;
  cursor[kFilled] = cursor[kFilled] + batch < capacity ? cursor[kFilled] + batch : capacity;
}

// Efraimidis–Spirakis key: the k largest keys log(1 - u) / w^beta, u ~ U[0, 1), are a sample
// without replacement with probabilities proportional to w^beta (beta = 0: uniform). 1 - u is
// in (0, 1], so the key is finite; empty slots get -inf and are never taken first.
DISTILLM_HD float sample_key(float noise, float priority, float beta, bool filled) {
  if (!filled) return -INFINITY;
  const float weight = beta == 1.0f ? priority : (beta == 0.0f ? 1.0f : powf(priority, beta));
  return log1pf(-noise) / weight;
}

// Row i of the gathered batch is slot indices[i] in the Hugging Face convention of dataset
// batches: input_ids right-padded, attention_mask 1 on the sequence, labels = input_ids on the
// response (EOS included) and ignore_index on prompt and padding. Not shifted: the model shifts.
// An index outside [0, capacity) gives an all-padding row (the CPU glue rejects it first).
struct GatherRow {
  int64_t slot, prompt_length, length;
};

DISTILLM_HD GatherRow gather_row(const GatherParams& p, int64_t i) {
  const int64_t slot = p.indices[i];
  if (slot < 0 || slot >= p.capacity) return {0, 0, 0};
  const int64_t* meta = p.meta + slot * kMetaFields;
  return {slot, meta[kPromptLength], meta[kLength]};
}

DISTILLM_HD void gather_element(const GatherParams& p, const GatherRow& row, int64_t i, int64_t t) {
  const bool in_sequence = t < row.length;
  const int64_t token = in_sequence ? p.tokens[row.slot * p.max_length + t] : p.pad_token_id;
  const int64_t out = i * p.max_length + t;
  p.input_ids[out] = token;
  p.attention_mask[out] = in_sequence ? 1 : 0;
  p.labels[out] = in_sequence && t >= row.prompt_length ? token : p.ignore_index;
}

}  // namespace distillm::replay_impl
