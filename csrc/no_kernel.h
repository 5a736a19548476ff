// The error of an op called on a device this build has no kernel for (e.g. CUDA tensors with a
// CPU-only build), shared by the ops' torch glue.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace distillm {

[[noreturn]] inline void no_kernel(const char* op, const c10::Device& device) {
  TORCH_CHECK(false, op, ": no kernel for device ", device,
              " in this build (distillm_ext.build_info() tells what was built)");
}

}  // namespace distillm
