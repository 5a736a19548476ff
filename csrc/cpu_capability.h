// Which CPU code path the vectorized kernels run: one copy of each kernel is compiled per x86-64
// micro-architecture level, and one is chosen once per process.
//
//   avx512   x86-64-v4: AVX-512 F/BW/CD/DQ/VL (Intel Skylake-X and later, AMD Zen 4 and later)
//   avx2     x86-64-v3: AVX2, FMA, F16C (Intel Haswell and later, AMD Zen and later)
//   default  the build's baseline (SSE2 on x86-64; the only path on other CPUs and compilers)
//
// The best level the CPU supports is chosen, unless DISTILLM_CPU_CAPABILITY names another
// (tests force each level in turn; a bug report can say which ran).
#pragma once

#include <string>
#include <vector>

// GCC 12+ on x86-64: the kernels get one copy per level (`#pragma GCC target` regions;
// __builtin_cpu_supports knows the level names from GCC 12 on).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define DISTILLM_CPU_LEVELS 1
#else
#define DISTILLM_CPU_LEVELS 0
#endif

namespace distillm {

enum class CpuCapability { kDefault, kAvx2, kAvx512 };

// The level the kernels run, chosen on first use. Throws if DISTILLM_CPU_CAPABILITY names an
// unknown level or one this CPU (or build) cannot run.
CpuCapability cpu_capability();

const char* cpu_capability_name(CpuCapability capability);

// Every level this build has and this CPU can run, best first.
std::vector<std::string> supported_cpu_capabilities();

}  // namespace distillm
