// DISTILLM_HD marks the torch-free element math that the CPU and CUDA schedules share: a
// device function under nvcc, a plain inline function in the C++ build.
#pragma once

#if defined(__CUDACC__)
#define DISTILLM_HD __host__ __device__ __forceinline__
#else
#define DISTILLM_HD inline
#endif
