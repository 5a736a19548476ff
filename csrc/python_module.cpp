// The Python extension module distillm_ext._C. Importing it registers the operators (static
// initializers of the linked kernels); it also reports how it was built and releases the
// CPU gradient cache.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <torch/version.h>

#include "cpu_capability.h"
#include "skew_kl/cpu_gradient_cache.h"

#ifndef DISTILLM_CUDA_ARCHS
#define DISTILLM_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, module) {
  module.doc() = "distillm_ext compiled operators (torch.ops.distillm.*)";
  module.def("build_info", [] {
    py::dict info;
#ifdef DISTILLM_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = DISTILLM_CUDA_VERSION;
#else
    info["cuda"] = false;
    info["cuda_version"] = py::none();
#endif
    info["cuda_archs"] = DISTILLM_CUDA_ARCHS;
    info["torch_version"] = TORCH_VERSION;
    info["cpu_capability"] = distillm::cpu_capability_name(distillm::cpu_capability());
    info["cpu_capabilities"] = distillm::supported_cpu_capabilities();
    info["debug"] =
#ifdef DISTILLM_DEBUG
        true;
#else
        false;
#endif
    return info;
  });
  module.def("release_cached_gradients", &distillm::skew_kl_impl::release_cached_gradients);
}
