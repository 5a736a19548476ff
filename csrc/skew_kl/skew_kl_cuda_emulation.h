// Host emulation of the CUDA skew KL kernel (skew_kl_cuda_emulation.cpp), for the CPU tests.
#pragma once

#include "skew_kl_math.h"

namespace distillm::skew_kl_impl {

// Whether DISTILLM_CUDA_EMULATION asks the CPU op to run the emulation: unset or empty, no;
// "hashed", "high" or "low", yes, with that model of the GPU's approximation errors
// (approx_math.h). Anything else is an error. Read once per process.
bool cuda_emulation_requested();

// The CUDA kernel's formulas and row split, run on the host; same contract as
// skew_kl_forward_cpu. Slow: one entry at a time, special functions in double.
void skew_kl_forward_cuda_emulation(const ForwardParams& prm);

}  // namespace distillm::skew_kl_impl
