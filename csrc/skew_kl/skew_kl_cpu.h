// CPU schedule entry point (skew_kl_cpu.cpp).
#pragma once

#include "skew_kl_math.h"

namespace distillm::skew_kl_impl {

// Writes prm.row_loss and, when prm.grad is set, the unscaled gradient of each row's loss.
void skew_kl_forward_cpu(const ForwardParams& prm);

}  // namespace distillm::skew_kl_impl
