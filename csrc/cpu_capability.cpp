#include "cpu_capability.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace distillm {
namespace {

constexpr CpuCapability kBestFirst[] = {CpuCapability::kAvx512, CpuCapability::kAvx2,
                                        CpuCapability::kDefault};

bool cpu_can_run(CpuCapability capability) {
#if DISTILLM_CPU_LEVELS
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's own constructor
#endif
  switch (capability) {
    case CpuCapability::kDefault: return true;
#if DISTILLM_CPU_LEVELS
    // libgcc's checks include the OS saving the wide registers (XGETBV), not only CPUID.
    case CpuCapability::kAvx2: return __builtin_cpu_supports("x86-64-v3");
    case CpuCapability::kAvx512: return __builtin_cpu_supports("x86-64-v4");
#else
    case CpuCapability::kAvx2:
    case CpuCapability::kAvx512: return false;
#endif
  }
  TORCH_CHECK(false, "unknown CPU capability code ", static_cast<int>(capability));
}

std::string supported_list() {
  std::string names;
  for (const std::string& name : supported_cpu_capabilities()) names += (names.empty() ? "" : ", ") + name;
  return names;
}

CpuCapability best() {
  for (CpuCapability capability : kBestFirst) {
    if (cpu_can_run(capability)) return capability;
  }
  return CpuCapability::kDefault;
}

CpuCapability choose() {
  const char* requested = std::getenv("DISTILLM_CPU_CAPABILITY");
  if (requested == nullptr || *requested == '\0') return best();
  for (CpuCapability capability : kBestFirst) {
    if (std::strcmp(requested, cpu_capability_name(capability)) != 0) continue;
    TORCH_CHECK(cpu_can_run(capability), "DISTILLM_CPU_CAPABILITY=", requested,
                ", but this CPU or build cannot run it; it can run: ", supported_list());
    return capability;
  }
  TORCH_CHECK(false, "DISTILLM_CPU_CAPABILITY=", requested,
              " is not a CPU capability; use one of avx512, avx2, default (this CPU: ",
              supported_list(), ")");
}

}  // namespace

CpuCapability cpu_capability() {
  static const CpuCapability active = choose();
  return active;
}

const char* cpu_capability_name(CpuCapability capability) {
  switch (capability) {
    case CpuCapability::kDefault: return "default";
    case CpuCapability::kAvx2: return "avx2";
    case CpuCapability::kAvx512: return "avx512";
  }
  TORCH_CHECK(false, "unknown CPU capability code ", static_cast<int>(capability));
}

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> names;
  for (CpuCapability capability : kBestFirst) {
    if (cpu_can_run(capability)) names.emplace_back(cpu_capability_name(capability));
  }
  return names;
}

}  // namespace distillm
