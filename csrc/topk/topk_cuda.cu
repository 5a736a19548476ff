// CUDA schedule of the sparse-teacher losses: one block per row, one launch for loss and
// gradient (the math: topk_math.h).
//
// Pass 1 keeps, per thread, an online (max, sum of exps) over the row's tail entries and the
// max over its kept ids; each thread steps through its entries in order, so it finds them
// with one pointer into the row's ascending ids (O(V / threads + K) per thread). The class
// phase (O(K), double) runs spread over the threads. Pass 2 (gradient only) writes every
// entry's tail formula, and after a barrier the kept entries are written over.
// Torch-free, so nvcc compiles it in seconds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_dtypes.cuh"

#include "topk/topk_cuda.h"

namespace distillm::topk_impl {
namespace {

using skew_kl_impl::exp_nonpositive;
using skew_kl_impl::row_offset;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace cuda_dtypes;

// An online sum of exps: sum_j exp((z_j - max) / T) over the entries seen.
struct ExpSum {
  float max;
  double sum;
};

__device__ __forceinline__ ExpSum merge(ExpSum a, ExpSum b, float inv_t) {
  if (a.max < b.max) {
    const ExpSum t = a;
    a = b;
    b = t;
  }
  if (b.max == -__builtin_huge_valf()) return a;  // b is empty
  return {a.max, a.sum + b.sum * exp(static_cast<double>((b.max - a.max) * inv_t))};
}

// The block's pair of sums (every thread gets them). `shared` holds one pair per warp.
__device__ __forceinline__ void block_sum2(double& a, double& b, double (*shared)[2]) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, offset);
    b += __shfl_xor_sync(0xffffffffu, b, offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the last reader of `shared` is done with it
  if (lane == 0) {
    shared[warp][0] = a;
    shared[warp][1] = b;
  }
  __syncthreads();
  a = 0.0;
  b = 0.0;
  for (int w = 0; w < kWarps; ++w) {
    a += shared[w][0];
    b += shared[w][1];
  }
}

// The block's merged tail ExpSum and its max over kept ids (every thread gets them).
__device__ __forceinline__ void block_merge(ExpSum& tail, float& kept_max, float inv_t, ExpSum* shared,
                                            float* shared_max) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const ExpSum other{__shfl_xor_sync(0xffffffffu, tail.max, offset),
                       __shfl_xor_sync(0xffffffffu, tail.sum, offset)};
    tail = merge(tail, other, inv_t);
    kept_max = fmaxf(kept_max, __shfl_xor_sync(0xffffffffu, kept_max, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    shared[warp] = tail;
    shared_max[warp] = kept_max;
  }
  __syncthreads();
  tail = shared[0];
  kept_max = shared_max[0];
  for (int w = 1; w < kWarps; ++w) {
    tail = merge(tail, shared[w], inv_t);
    kept_max = fmaxf(kept_max, shared_max[w]);
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads) topk_kernel(TopkParams prm) {
  __shared__ ExpSum shared_tail[kWarps];
  __shared__ float shared_max[kWarps];
  __shared__ double shared_sums[kWarps][2];
  const int64_t vocab = prm.vocab, k = prm.k;
  const float inv_t = prm.inv_temperature;
  constexpr float kNegInfFloat = -__builtin_huge_valf();
  for (int64_t row = blockIdx.x; row < prm.num_rows; row += gridDim.x) {
    S* grad = prm.grad ? static_cast<S*>(prm.grad) + row * vocab : nullptr;
    if (prm.labels != nullptr && prm.labels[row] == prm.ignore_index) {
      if (threadIdx.x == 0) prm.row_loss[row] = 0.0f;
      if (grad) {
        for (int64_t v = threadIdx.x; v < vocab; v += kThreads) grad[v] = from_float<S>(0.0f);
      }
      continue;
    }
    const S* z = static_cast<const S*>(prm.student) + row_offset(prm.student_rows, row);
    const int64_t* ids = prm.ids + row * k;
    const float* log_p = prm.log_probs + row * k;

    // Pass 1: the tail's online sum, the kept ids' max.
    ExpSum tail{kNegInfFloat, 0.0};
    float kept_max = kNegInfFloat;
    int64_t next = 0;  // this thread's place in the ascending ids
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      while (next < k && ids[next] < v) ++next;
      const float x = to_float(z[v]);
      if (next < k && ids[next] == v) {
        kept_max = fmaxf(kept_max, x);
      } else if (x > tail.max) {
        tail.sum = (tail.max == kNegInfFloat ? 0.0 : tail.sum * exp_nonpositive((tail.max - x) * inv_t)) + 1.0;
        tail.max = x;
      } else if (x != kNegInfFloat) {  // a masked entry adds nothing (and -inf - -inf is NaN)
        tail.sum += exp_nonpositive((x - tail.max) * inv_t);
      }
    }
    block_merge(tail, kept_max, inv_t, shared_tail, shared_max);
    const float max = fmaxf(tail.max, kept_max);
    if (max == kNegInfFloat) {  // every entry masked: dropped, as skew_kl drops it
      if (threadIdx.x == 0) prm.row_loss[row] = 0.0f;
      if (grad) {
        for (int64_t v = threadIdx.x; v < vocab; v += kThreads) grad[v] = from_float<S>(0.0f);
      }
      continue;
    }
    const double tail_sum =
        tail.max == kNegInfFloat ? 0.0 : tail.sum * exp(static_cast<double>((tail.max - max) * inv_t));

    // The class phase.
    double kept_sum = 0.0, kept_mass = 0.0;
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      kept_sum += exp(static_cast<double>((to_float(z[ids[i]]) - max) * inv_t));
      kept_mass += exp(static_cast<double>(log_p[i]));
    }
    block_sum2(kept_sum, kept_mass, shared_sums);
    const double log_total = log(tail_sum + kept_sum);
    const double tail_log_q = tail_sum > 0.0 ? log(tail_sum) - log_total : neg_inf_double();
    const ClassTerms tail_terms = class_terms(prm.loss, teacher_tail_log_prob(kept_mass), tail_log_q);
    const auto kept_log_q = [&](int64_t i) {
      return static_cast<double>((to_float(z[ids[i]]) - max) * inv_t) - log_total;
    };
    double loss = threadIdx.x == 0 ? tail_terms.loss : 0.0, kept_sum_h = 0.0;
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      const ClassTerms t = class_terms(prm.loss, log_p[i], kept_log_q(i));
      loss += t.loss;
      kept_sum_h += t.h;
    }
    block_sum2(loss, kept_sum_h, shared_sums);
    if (threadIdx.x == 0) prm.row_loss[row] = static_cast<float>(loss);
    if (!grad) continue;

    // Pass 2: the gradient.
    const float scale = prm.grad_divisor ? prm.grad_scale / *prm.grad_divisor : prm.grad_scale;
    const RowGradient rg = row_gradient(tail_terms.h, kept_sum_h, tail_sum, kept_sum);
    const float tail_factor = static_cast<float>(rg.tail_factor * scale);
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      grad[v] = from_float<S>(exp_nonpositive((to_float(z[v]) - max) * inv_t) * tail_factor);
    }
    __syncthreads();  // the kept entries' own values are written over their tail formula
    for (int64_t i = threadIdx.x; i < k; i += kThreads) {
      const double log_q = kept_log_q(i);
      const double h = class_terms(prm.loss, log_p[i], log_q).h;
      grad[ids[i]] = from_float<S>(static_cast<float>((h - exp(log_q) * rg.sum_h) * scale));
    }
  }
}

template <typename S>
void launch(const TopkParams& prm, cudaStream_t stream) {
  constexpr int64_t kMaxBlocks = 1 << 20;
  const unsigned blocks = static_cast<unsigned>(prm.num_rows < kMaxBlocks ? prm.num_rows : kMaxBlocks);
  if (blocks == 0) return;
  topk_kernel<S><<<blocks, kThreads, 0, stream>>>(prm);
}

}  // namespace

void topk_forward_cuda(const TopkParams& prm, cudaStream_t stream) {
  switch (prm.student_dtype) {
    case DType::kFloat32: return launch<float>(prm, stream);
    case DType::kFloat16: return launch<__half>(prm, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(prm, stream);
  }
}

}  // namespace distillm::topk_impl
