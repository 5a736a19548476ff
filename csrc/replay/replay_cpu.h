// CPU schedules of the replay ops (replay_cpu.cpp).
#pragma once

#include <cstdint>
#include <functional>

#include "replay_math.h"

namespace distillm::replay_impl {

void push_cpu(const PushParams& p);
// k distinct slots of [0, filled), uniformly, from k + (k - 1) draws of `random64`.
void sample_uniform_cpu(int64_t filled, int64_t k, const std::function<uint64_t()>& random64, int64_t* indices);
// The k filled slots with the largest sample_key (noise: filled uniforms), largest first.
void sample_weighted_cpu(const float* priorities, int64_t filled, const float* noise, float beta, int64_t k,
                         int64_t* indices);
void gather_cpu(const GatherParams& p);

}  // namespace distillm::replay_impl
