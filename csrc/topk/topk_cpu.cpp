// CPU schedule of the sparse-teacher losses: the rows of topk_cpu_rows.inc, compiled once per
// CPU capability (cpu_capability.h), and the switch that picks the copy this process runs.
// As in skew_kl_cpu.cpp, the torch and math headers are included outside the target regions.
#include "topk/topk_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_capability.h"

#if DISTILLM_CPU_LEVELS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace distillm::topk_impl::avx512 {
#include "topk_cpu_rows.inc"
}  // namespace distillm::topk_impl::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace distillm::topk_impl::avx2 {
#include "topk_cpu_rows.inc"
}  // namespace distillm::topk_impl::avx2
#pragma GCC pop_options
#endif

namespace distillm::topk_impl::baseline {
#include "topk_cpu_rows.inc"
}  // namespace distillm::topk_impl::baseline

namespace distillm::topk_impl {

void topk_forward_cpu(const TopkParams& params) {
  TopkParams prm = params;
  if (prm.grad_divisor) prm.grad_scale /= *prm.grad_divisor;  // host memory: fold it once
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
  TORCH_CHECK(false, "skew_kl_topk: no CPU kernel for capability ", cpu_capability_name(cpu_capability()));
}

}  // namespace distillm::topk_impl
