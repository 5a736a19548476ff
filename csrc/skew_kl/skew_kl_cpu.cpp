// CPU schedule of the skew KL forward: the rows of skew_kl_cpu_rows.inc, compiled once per CPU
// capability (cpu_capability.h), and the switch that picks the copy this process runs.
//
// AVX-512 is worth its copy even where it runs at 256-bit width (AMD Zen 4): the masks replace
// the blends of the selects, and 32 registers end the spills of the loss-terms loop
// (benchmarks/RESULTS.md has the numbers). Copies in `#pragma GCC target` regions, rather than
// `target_clones`, let DISTILLM_CPU_CAPABILITY choose one, so every copy is tested on one
// machine. Only code written inside a region gets its instructions: the torch and math
// headers are included outside, so no inline function they define is ever emitted with
// AVX-512 instructions for the linker to pick on a CPU without them.
#include "skew_kl_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_capability.h"
#include "skew_kl_cuda_emulation.h"

#if DISTILLM_CPU_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace distillm::skew_kl_impl::avx512 {
#include "skew_kl_cpu_rows.inc"
}  // namespace distillm::skew_kl_impl::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace distillm::skew_kl_impl::avx2 {
#include "skew_kl_cpu_rows.inc"
}  // namespace distillm::skew_kl_impl::avx2
#pragma GCC pop_options
#endif

namespace distillm::skew_kl_impl::baseline {
#include "skew_kl_cpu_rows.inc"
}  // namespace distillm::skew_kl_impl::baseline

namespace distillm::skew_kl_impl {

void skew_kl_forward_cpu(const ForwardParams& params) {
  if (cuda_emulation_requested()) return skew_kl_forward_cuda_emulation(params);
  ForwardParams prm = params;
  prm.grad_scale = gradient_factor(prm);  // host memory here: fold the divisor once, not per row
  prm.grad_divisor = nullptr;
  switch (cpu_capability()) {
#if DISTILLM_CPU_LEVELS
    case CpuCapability::kAvx512: return avx512::forward(prm);
    case CpuCapability::kAvx2: return avx2::forward(prm);
#else
    case CpuCapability::kAvx512:
    case CpuCapability::kAvx2: break;  // cpu_capability() never chooses them in such a build
#endif
    case CpuCapability::kDefault: return baseline::forward(prm);
  }
  TORCH_CHECK(false, "skew_kl: no CPU kernel for capability ", cpu_capability_name(cpu_capability()));
}

}  // namespace distillm::skew_kl_impl
