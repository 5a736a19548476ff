// CUDA schedule of the skew KL forward: one block per row, one launch for loss and gradient.
//
// Pass 1 keeps an online (max, sum of exps) per thread for student and teacher; pass 2 sums
// the loss terms and G = sum q g; pass 3 (gradient only) writes q (g - G) / tau. FKL needs no
// pass 3: its G comes from pass 1, and pass 2 writes the gradient (PairSums). Each pass reads
// the rows again (from DRAM at large vocabularies: docs/row_caching.md), 16 bytes per load
// from the first aligned entry on. The per-entry formulas: skew_kl_gpu_math.h.
// Torch-free, so nvcc compiles it in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_dtypes.cuh"

#include <type_traits>

#include "skew_kl_cuda.h"
#include "skew_kl_gpu_math.h"

namespace distillm::skew_kl_impl {
namespace {

using namespace gpu;

constexpr int kThreads = 512;  // every launch; the loops step by it as a constant, not blockDim.x

using namespace cuda_dtypes;

// The two floats of a pair of packed bf16: one shift or one mask each (the compiler's own
// conversion of the high half takes two instructions).
__device__ __forceinline__ void unpack_bf16x2(uint32_t pair, float& low, float& high) {
  low = __uint_as_float(pair << 16);
  high = __uint_as_float(pair & 0xffff0000u);
}

// Reads entries [v, v + kChunk) of a row as floats: 16-byte loads (kVector, the chunk aligned)
// or one load per entry.
template <bool kVector, typename T>
__device__ __forceinline__ void load_chunk(const T* row, RowIndex v, float (&out)[kChunk]) {
  if constexpr (kVector) {
    constexpr int kLoads = kChunk * sizeof(T) / 16;
    uint4 raw[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) raw[i] = reinterpret_cast<const uint4*>(row + v)[i];
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const uint32_t* pairs = reinterpret_cast<const uint32_t*>(raw);
#pragma unroll
      for (int j = 0; j < kChunk / 2; ++j) unpack_bf16x2(pairs[j], out[2 * j], out[2 * j + 1]);
    } else {
      const T* values = reinterpret_cast<const T*>(raw);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[j] = to_float(values[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = to_float(row[v + j]);
  }
}

// A row's address, opaque to the compiler: otherwise it re-derives every entry's address from
// the tensor's base and the 64-bit sum of row offset and entry index (five integer instructions
// per load), instead of one multiply-add of the 32-bit index onto the row's address. The
// assumption keeps its loads and stores global (LDG/STG), not generic.
template <typename P>
__device__ __forceinline__ P* opaque(P* p) {
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));
  return p;
}

template <bool kVector, typename S, typename T, typename Fn>
__device__ __forceinline__ void for_each_entry_as(const S* z, const T* u, RowIndex vocab, RowSpan span, Fn&& fn) {
  for_thread_entries(
      threadIdx.x, kThreads, vocab, span,
      [&](RowIndex v) {
        float zs[kChunk], us[kChunk];
        load_chunk<kVector>(z, v, zs);
        load_chunk<kVector>(u, v, us);
        fn(v, zs, us);
      },
      [&](RowIndex v) {
        const float zs[1] = {to_float(z[v])}, us[1] = {to_float(u[v])};
        fn(v, zs, us);
      });
}

// Calls fn(v, zs, us) on this thread's entries of the row, from entry v: arrays of kChunk floats
// for the vector steps, of 1 for single entries. The choice of loads is made once per row,
// outside the loop: a predicate inside it would issue both kinds.
template <typename S, typename T, typename Fn>
__device__ __forceinline__ void for_each_entry(const S* z, const T* u, RowIndex vocab, Fn&& fn) {
  const RowSpan span = row_span(z, u, static_cast<const S*>(nullptr), vocab);
  if (span.vector) {
    for_each_entry_as<true>(z, u, vocab, span, fn);
  } else {
    for_each_entry_as<false>(z, u, vocab, span, fn);
  }
}

// Stores values to out[v..]: 16-byte stores for a vector step.
template <bool kVector, typename S, int N>
__device__ __forceinline__ void store_entries(S* out, RowIndex v, const float (&values)[N]) {
  if constexpr (kVector && N == kChunk) {
    constexpr int kStores = kChunk * sizeof(S) / 16;
    uint4 raw[kStores];
    S* packed = reinterpret_cast<S*>(raw);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) packed[j] = from_float<S>(values[j]);
#pragma unroll
    for (int i = 0; i < kStores; ++i) reinterpret_cast<uint4*>(out + v)[i] = raw[i];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[v + j] = from_float<S>(values[j]);
  }
}

template <bool kVector, typename S, typename T, typename Fn>
__device__ __forceinline__ void write_each_entry_as(const S* z, const T* u, S* out, RowIndex vocab, RowSpan span,
                                                    Fn&& fn) {
  for_each_entry_as<kVector>(z, u, vocab, span, [&](RowIndex v, const auto& zs, const auto& us) {
    constexpr int n = std::extent_v<std::remove_reference_t<decltype(zs)>>;
    float values[n];
#pragma unroll
    for (int j = 0; j < n; ++j) values[j] = fn(zs[j], us[j]);
    store_entries<kVector>(out, v, values);
  });
}

// Writes fn(z_v, u_v) to out[v] for this thread's entries of the row; vector steps only where
// `out` is aligned with the inputs too.
template <typename S, typename T, typename Fn>
__device__ __forceinline__ void write_each_entry(const S* z, const T* u, S* out, RowIndex vocab, Fn&& fn) {
  out = opaque(out);
  const RowSpan span = row_span(z, u, out, vocab);
  if (span.vector) {
    write_each_entry_as<true>(z, u, out, vocab, span, fn);
  } else {
    write_each_entry_as<false>(z, u, out, vocab, span, fn);
  }
}

template <typename F, typename Op>
__device__ __forceinline__ F warp_reduce(F x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Block-wide reduction of two floats; every thread gets the result.
template <typename F, typename Op>
__device__ __forceinline__ void block_reduce2(F& a, F& b, Op op, F (*shared)[2]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kThreads / 32;
  a = warp_reduce(a, op);
  b = warp_reduce(b, op);
  if (lane == 0) {
    shared[warp][0] = a;
    shared[warp][1] = b;
  }
  __syncthreads();
  a = shared[0][0];
  b = shared[0][1];
  for (int w = 1; w < warps; ++w) {
    a = op(a, shared[w][0]);
    b = op(b, shared[w][1]);
  }
  __syncthreads();  // the shared slots are reused by the next reduction
}

struct Add {
  template <typename F>
  __device__ __forceinline__ F operator()(F a, F b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return max_of(a, b); }
};

template <int N>
constexpr int length_of(const float (&)[N]) { return N; }  // chunk or single entry

template <typename S, typename T, bool kReverse, bool kMixed>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams prm, CallConstants c) {
  constexpr bool kTwoPasses = !kReverse && !kMixed;  // FKL: see PairSums
  __shared__ float shared[kThreads / 32][2];
  __shared__ double shared_sums[kThreads / 32][2];
  const RowIndex vocab = static_cast<RowIndex>(prm.vocab);
  for (int64_t row = blockIdx.x; row < prm.num_rows; row += gridDim.x) {
    S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
    const S* z = opaque(static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row));
    const T* u = opaque(static_cast<const T*>(prm.teacher) + row_offset(prm.teacher_rows, row));
    const bool skip = prm.labels != nullptr && prm.labels[row] == prm.ignore_index;

    PairSums<kTwoPasses> pass1;
    if (!skip) {
      for_each_entry(z, u, vocab, [&](RowIndex, const auto& zs, const auto& us) { add_pair(pass1, zs, us, c.k); });
    }
    float max_z = pass1.student.max, max_u = pass1.teacher.max;
    block_reduce2(max_z, max_u, Max(), shared);
    double sums_z = sum_at(pass1.student, max_z, c.k), sums_u = sum_at(pass1.teacher, max_u, c.k);
    block_reduce2(sums_z, sums_u, Add(), shared_sums);
    double dropped_mass = 0.0, unused_mass = 0.0;
    if constexpr (kTwoPasses) {
      dropped_mass = at_row_max(pass1.dropped_mass, pass1.teacher, max_u, c.k);
      block_reduce2(dropped_mass, unused_mass, Add(), shared_sums);
    }

    float value;
    if (uniform_row(skip, vocab, max_z, max_u, sums_z, sums_u, value)) {  // block-uniform
      if (threadIdx.x == 0) prm.row_loss[row] = value;
      if (grad) {
        for (RowIndex v = threadIdx.x; v < vocab; v += kThreads) grad[v] = from_float<S>(value);
      }
      continue;
    }

    const RowConstants r = row_constants(max_z, max_u, sums_z, sums_u, c, gradient_factor(prm));
    float loss = 0.0f, sum_qg = 0.0f, sum_f = 0.0f, unused = 0.0f;
    if constexpr (kTwoPasses) {
      if (grad) {  // FKL: G from pass 1; loss and gradient in one pass
        sum_qg = fkl_sum_qg(sums_u, dropped_mass);
        write_each_entry(z, u, grad, vocab, [&](float zv, float uv) {
          const Pass2Terms e = plain_terms<false>(zv, uv, r);
          loss += e.term;
          sum_f += e.f;
          return pass3_grad<false, false>(zv, uv, r, c, sum_qg);
        });
        block_reduce2(loss, sum_f, Add(), shared);
        if (threadIdx.x == 0) prm.row_loss[row] = loss / sum_f;
        continue;
      }
    }
    for_each_entry(z, u, vocab, [&](RowIndex, const auto& zs, const auto& us) {
#pragma unroll
      for (int j = 0; j < length_of(zs); ++j) {
        const Pass2Terms e = pass2_terms<kReverse, kMixed>(zs[j], us[j], r, c);
        loss += e.term;
        sum_qg += e.q_times_g;
        sum_f += e.f;
      }
    });
    block_reduce2(loss, sum_qg, Add(), shared);
    block_reduce2(sum_f, unused, Add(), shared);
    // Dividing by the f's own sum removes the rounding of 1 / sum(exp) they all share (as on CPU).
    loss /= sum_f;
    sum_qg /= sum_f;
    if (threadIdx.x == 0) prm.row_loss[row] = loss;

    if (grad) {
      write_each_entry(z, u, grad, vocab, [&](float zv, float uv) {
        return pass3_grad<kReverse, kMixed>(zv, uv, r, c, sum_qg);
      });
    }
  }
}

template <typename S, typename T>
void launch_typed(const ForwardParams& prm, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 1 << 20;
  const unsigned blocks = static_cast<unsigned>(prm.num_rows < kMaxBlocks ? prm.num_rows : kMaxBlocks);
  if (blocks == 0) return;
  const bool mixed = prm.constants.alpha != 0.0f;
  const CallConstants c = call_constants(prm.constants);
  if (prm.reverse) {
    if (mixed) forward_kernel<S, T, true, true><<<blocks, kThreads, 0, stream>>>(prm, c);
    else forward_kernel<S, T, true, false><<<blocks, kThreads, 0, stream>>>(prm, c);
  } else {
    if (mixed) forward_kernel<S, T, false, true><<<blocks, kThreads, 0, stream>>>(prm, c);
    else forward_kernel<S, T, false, false><<<blocks, kThreads, 0, stream>>>(prm, c);
  }
}

template <typename S>
void launch_with_student(const ForwardParams& prm, cudaStream_t stream) {
  switch (prm.teacher_dtype) {
    case DType::kFloat32: return launch_typed<S, float>(prm, stream);
    case DType::kFloat16: return launch_typed<S, __half>(prm, stream);
    case DType::kBFloat16: return launch_typed<S, __nv_bfloat16>(prm, stream);
  }
}

template <typename T>
__global__ void scale_unless_one_kernel(T* data, int64_t n, const float* factor) {
  const float f = *factor;
  if (f == 1.0f) return;  // loss.backward() of a mean: nothing to read or write
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    data[i] = from_float<T>(to_float(data[i]) * f);
  }
}

}  // namespace

void scale_unless_one_cuda(void* data, DType dtype, int64_t n, const float* factor, cudaStream_t stream) {
  if (n == 0) return;
  constexpr int64_t kScaleThreads = 256, kMaxScaleBlocks = 1 << 16;
  const int64_t wanted = (n + kScaleThreads - 1) / kScaleThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < kMaxScaleBlocks ? wanted : kMaxScaleBlocks);
  switch (dtype) {
    case DType::kFloat32:
      return scale_unless_one_kernel<<<blocks, kScaleThreads, 0, stream>>>(static_cast<float*>(data), n, factor);
    case DType::kFloat16:
      return scale_unless_one_kernel<<<blocks, kScaleThreads, 0, stream>>>(static_cast<__half*>(data), n, factor);
    case DType::kBFloat16:
      return scale_unless_one_kernel<<<blocks, kScaleThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(data), n,
                                                                            factor);
  }
}

void skew_kl_forward_cuda(const ForwardParams& prm, cudaStream_t stream) {
  switch (prm.student_dtype) {
    case DType::kFloat32: return launch_with_student<float>(prm, stream);
    case DType::kFloat16: return launch_with_student<__half>(prm, stream);
    case DType::kBFloat16: return launch_with_student<__nv_bfloat16>(prm, stream);
  }
}

}  // namespace distillm::skew_kl_impl
