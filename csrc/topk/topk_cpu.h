// CPU schedule entry point of the sparse-teacher losses (topk_cpu.cpp).
#pragma once

#include "topk/topk_math.h"

namespace distillm::topk_impl {

// Writes every row's loss and, if prm.grad is set, its gradient. Parallel over rows.
void topk_forward_cpu(const TopkParams& prm);

}  // namespace distillm::topk_impl
