// CPU schedules of the replay ops (replay_cpu.cpp).
#pragma once

#include "replay_math.h"

namespace distillm::replay_impl {

void push_cpu(const PushParams& p);
// Writes the keys of all slots to `keys` (capacity,) and the k slots with the largest keys,
// largest first, to `indices`.
void sample_cpu(const float* priorities, const int64_t* cursor, const float* noise, float beta,
                int64_t capacity, int64_t k, float* keys, int64_t* indices);
void gather_cpu(const GatherParams& p);

}  // namespace distillm::replay_impl
