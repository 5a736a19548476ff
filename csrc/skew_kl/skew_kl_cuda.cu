// CUDA schedule of the skew KL forward: one block per row, one launch for loss and gradient.
//
// Pass 1 keeps an online (max, sum of exps) per thread for student and teacher; pass 2 sums
// the loss terms and G = sum q g; pass 3 (gradient only) writes q (g - G) / tau. Rows are
// re-read (mostly from L2) in passes 2 and 3. Loads and stores are 16 bytes wide where the
// rows are aligned.
// Torch-free, so nvcc compiles it in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "skew_kl_cuda.h"

namespace distillm::skew_kl_impl {
namespace {

constexpr int kThreads = 512;
constexpr int kChunk = 8;  // entries per thread per step: 16 bytes of bf16/fp16, 32 of float

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Reads entries [v, v + kChunk) of a row as floats; `vector` when the chunk is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t v, bool vector, float (&out)[kChunk]) {
  if (vector) {
    constexpr int kLoads = kChunk * sizeof(T) / 16;
    uint4 raw[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) raw[i] = reinterpret_cast<const uint4*>(row + v)[i];
    const T* values = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = to_float(values[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = to_float(row[v + j]);
  }
}

template <typename T>
__device__ __forceinline__ bool is_aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Calls fn(v, z_v, u_v) for every entry of the row this thread owns.
template <typename S, typename T, typename Fn>
__device__ __forceinline__ void for_each_entry(const S* z, const T* u, int64_t vocab, Fn&& fn) {
  const bool vector = is_aligned16(z) && is_aligned16(u);
  const int64_t full = vocab / kChunk * kChunk;
  for (int64_t v = int64_t(threadIdx.x) * kChunk; v < full; v += int64_t(blockDim.x) * kChunk) {
    float zs[kChunk], us[kChunk];
    load_chunk(z, v, vector, zs);
    load_chunk(u, v, vector, us);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) fn(v + j, zs[j], us[j]);
  }
  for (int64_t v = full + threadIdx.x; v < vocab; v += blockDim.x) fn(v, to_float(z[v]), to_float(u[v]));
}

// Writes fn(z_v, u_v) to out[v] for every entry of the row this thread owns; 16-byte stores
// where the output row is aligned too.
template <typename S, typename T, typename Fn>
__device__ __forceinline__ void write_each_entry(const S* z, const T* u, S* out, int64_t vocab, Fn&& fn) {
  const bool vector = is_aligned16(z) && is_aligned16(u) && is_aligned16(out);
  const int64_t full = vocab / kChunk * kChunk;
  for (int64_t v = int64_t(threadIdx.x) * kChunk; v < full; v += int64_t(blockDim.x) * kChunk) {
    float zs[kChunk], us[kChunk];
    load_chunk(z, v, vector, zs);
    load_chunk(u, v, vector, us);
    constexpr int kStores = kChunk * sizeof(S) / 16;
    uint4 raw[kStores];
    S* values = reinterpret_cast<S*>(raw);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) values[j] = from_float<S>(fn(zs[j], us[j]));
    if (vector) {
#pragma unroll
      for (int i = 0; i < kStores; ++i) reinterpret_cast<uint4*>(out + v)[i] = raw[i];
    } else {
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[v + j] = values[j];
    }
  }
  for (int64_t v = full + threadIdx.x; v < vocab; v += blockDim.x) {
    out[v] = from_float<S>(fn(to_float(z[v]), to_float(u[v])));
  }
}

// Online softmax state over raw logits: sum_v exp((x_v - max) * inv_tau).
struct OnlineSum {
  float max = kNegInf;
  float sum = 0.0f;

  // One exp per entry: the running sum is rescaled only when the maximum grows.
  __device__ __forceinline__ void add(float x, float inv_tau) {
    if (x > max) {
      sum = (max == kNegInf ? 0.0f : sum * exp_nonpositive((max - x) * inv_tau)) + 1.0f;
      max = x;
    } else if (!(max == kNegInf && x == kNegInf)) {
      sum += exp_nonpositive((x - max) * inv_tau);  // a NaN entry makes the sum NaN
    }
  }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float x, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Block-wide reduction of two floats; every thread gets the result.
template <typename Op>
__device__ __forceinline__ void block_reduce2(float& a, float& b, Op op, float (*shared)[2]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
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
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return max_of(a, b); }
};

template <typename S, typename T, bool kReverse, bool kMixed>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams prm) {
  __shared__ float shared[kThreads / 32][2];
  const Constants c = prm.constants;
  const float inv_tau = c.inv_temperature;
  const int64_t vocab = prm.vocab;
  for (int64_t row = blockIdx.x; row < prm.num_rows; row += gridDim.x) {
    S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
    const S* z = static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row);
    const T* u = static_cast<const T*>(prm.teacher) + row_offset(prm.teacher_rows, row);
    bool skip = prm.labels != nullptr && prm.labels[row] == prm.ignore_index;

    OnlineSum student, teacher;
    if (!skip) {
      for_each_entry(z, u, vocab, [&](int64_t, float zv, float uv) {
        student.add(zv, inv_tau);
        teacher.add(uv, inv_tau);
      });
    }
    // Merge the per-thread states: first the maxima, then the sums rescaled to them.
    float max_z = student.max, max_u = teacher.max;
    block_reduce2(max_z, max_u, Max(), shared);
    // A thread whose maximum stayed -inf saw only -inf entries (sum 0) or a NaN (sum NaN, as
    // comparisons ignore NaN): its sum is taken as is, so a NaN anywhere reaches the row.
    float sum_z = student.max == kNegInf ? student.sum : student.sum * exp_nonpositive((student.max - max_z) * inv_tau);
    float sum_u = teacher.max == kNegInf ? teacher.sum : teacher.sum * exp_nonpositive((teacher.max - max_u) * inv_tau);
    block_reduce2(sum_z, sum_u, Add(), shared);

    if (skip || max_z == kNegInf || max_u == kNegInf) {  // block-uniform
      // Every entry dropped (0), or every entry NaN (NaN).
      const float value = skip ? 0.0f : (sum_z + sum_u) * 0.0f;
      if (threadIdx.x == 0) prm.row_loss[row] = value;
      if (grad) {
        for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) grad[v] = from_float<S>(value);
      }
      continue;
    }

    const float inv_sum_z = 1.0f / sum_z, inv_sum_u = 1.0f / sum_u;
    const float log_sum_u_over_sum_z = logf(sum_u / sum_z);
    auto terms = [&](float zv, float uv, float& q, float& p) {
      const float shifted_z = zv - max_z, shifted_u = uv - max_u;
      q = exp_nonpositive(shifted_z * inv_tau) * inv_sum_z;
      p = exp_nonpositive(shifted_u * inv_tau) * inv_sum_u;
      // log q - log p, formed so that it keeps its digits where q ~ p.
      const float log_q_over_p = (shifted_z - shifted_u) * inv_tau + log_sum_u_over_sum_z;
      return entry_terms<kReverse, kMixed>(log_q_over_p, q, p, zv == kNegInf || uv == kNegInf, c);
    };

    float loss = 0.0f, sum_qg = 0.0f, sum_f = 0.0f, unused = 0.0f;
    for_each_entry(z, u, vocab, [&](int64_t, float zv, float uv) {
      float q, p;
      const EntryTerms e = terms(zv, uv, q, p);
      loss += e.term;
      sum_qg += e.q_times_g;
      sum_f += kReverse ? q : p;
    });
    block_reduce2(loss, sum_qg, Add(), shared);
    block_reduce2(sum_f, unused, Add(), shared);
    // Dividing by the f's own sum removes the rounding of 1 / sum(exp) they all share (as on CPU).
    loss /= sum_f;
    sum_qg /= sum_f;
    if (threadIdx.x == 0) prm.row_loss[row] = loss;

    if (grad) {
      write_each_entry(z, u, grad, vocab, [&](float zv, float uv) {
        float q, p;
        const EntryTerms e = terms(zv, uv, q, p);
        return entry_grad<kReverse>(q, saved_for_grad<kReverse>(e), {sum_qg, 0.0f}) * prm.grad_scale;
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
  if (prm.reverse) {
    if (mixed) forward_kernel<S, T, true, true><<<blocks, kThreads, 0, stream>>>(prm);
    else forward_kernel<S, T, true, false><<<blocks, kThreads, 0, stream>>>(prm);
  } else {
    if (mixed) forward_kernel<S, T, false, true><<<blocks, kThreads, 0, stream>>>(prm);
    else forward_kernel<S, T, false, false><<<blocks, kThreads, 0, stream>>>(prm);
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

}  // namespace

void skew_kl_forward_cuda(const ForwardParams& prm, cudaStream_t stream) {
  switch (prm.student_dtype) {
    case DType::kFloat32: return launch_with_student<float>(prm, stream);
    case DType::kFloat16: return launch_with_student<__half>(prm, stream);
    case DType::kBFloat16: return launch_with_student<__nv_bfloat16>(prm, stream);
  }
}

}  // namespace distillm::skew_kl_impl
