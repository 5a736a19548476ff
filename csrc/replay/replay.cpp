// Torch glue of the replay buffer ops (distillm::replay_push, replay_sample, replay_gather):
// input checks, allocation, random draws from the caller's torch.Generator, the raw-pointer
// views the schedules take, and the CPU / CUDA / Meta registrations. Values that live on the
// device (lengths, indices, the fill count) are checked only on CPU: on CUDA a check would wait
// for the device, and these ops never do.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "no_kernel.h"
#include "replay_cpu.h"

#ifdef DISTILLM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "replay_cuda.h"
#endif

namespace distillm::replay_impl {
namespace {

void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                  c10::IntArrayRef shape, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sym_sizes() == c10::fromIntArrayRefSlow(shape), op, ": ", name, " must have shape ",
              shape, ", got ", t.sym_sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the buffer's device (",
              like.device(), "), got ", t.device());
}

// tokens (capacity, max_length) int64 is the reference for the other storage tensors.
void check_tokens(const at::Tensor& tokens, const char* op) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) > 0 && tokens.size(1) > 0, op,
              ": tokens must be a non-empty (capacity, max_length) tensor, got shape ", tokens.sizes());
  check_tensor(tokens, op, "tokens", at::kLong, tokens.sizes(), tokens);
}

void check_meta(const at::Tensor& meta, const at::Tensor& tokens, const char* op) {
  check_tensor(meta, op, "meta", at::kLong, {tokens.size(0), kMetaFields}, tokens);
}

void check_cursor(const at::Tensor& cursor, const at::Tensor& like, const char* op) {
  check_tensor(cursor, op, "cursor", at::kLong, {2}, like);
}

void check_priorities(const at::Tensor& priorities, int64_t capacity, const at::Tensor& like, const char* op) {
  check_tensor(priorities, op, "priorities", at::kFloat, {capacity}, like);
}

// An integer tensor of `dim` dimensions on `like`'s device, as contiguous int64.
at::Tensor as_index_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                           const at::Tensor& like) {
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), op, ": ", name,
              " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimension(s), got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the buffer's device (",
              like.device(), "), got ", t.device());
  return t.to(at::kLong).contiguous();
}

#ifdef DISTILLM_WITH_CUDA
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
#endif

// -- push -------------------------------------------------------------------------------------

void push_impl(at::Tensor& tokens, at::Tensor& meta, at::Tensor& priorities, at::Tensor& cursor,
               const at::Tensor& input_ids, const at::Tensor& prompt_lengths, const at::Tensor& lengths,
               int64_t step, int64_t pad_token_id, bool run) {
  constexpr const char* op = "replay_push";
  check_tokens(tokens, op);
  const int64_t capacity = tokens.size(0), max_length = tokens.size(1);
  check_meta(meta, tokens, op);
  check_priorities(priorities, capacity, tokens, op);
  check_cursor(cursor, tokens, op);
  at::Tensor ids = as_index_tensor(input_ids, op, "input_ids", 2, tokens);
  at::Tensor prompts = as_index_tensor(prompt_lengths, op, "prompt_lengths", 1, tokens);
  at::Tensor lens = as_index_tensor(lengths, op, "lengths", 1, tokens);
  const int64_t batch = ids.size(0), width = ids.size(1);
  TORCH_CHECK(width <= max_length, op, ": input_ids has ", width, " columns but the buffer holds at most ",
              max_length, " tokens per sequence; truncate or raise max_length");
  TORCH_CHECK(prompts.size(0) == batch && lens.size(0) == batch, op,
              ": prompt_lengths and lengths must have one entry per row of input_ids (", batch,
              "), got ", prompts.size(0), " and ", lens.size(0));
  if (!run || batch == 0) return;
  if (ids.is_cpu()) {
    const int64_t* p = prompts.data_ptr<int64_t>();
    const int64_t* l = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(0 <= p[b] && p[b] <= l[b] && l[b] <= width, op, ": row ", b,
                  " needs 0 <= prompt_length <= length <= ", width, " (input_ids columns), got prompt_length ",
                  p[b], " and length ", l[b]);
    }
  }
  PushParams prm{};
  prm.skipped = batch > capacity ? batch - capacity : 0;  // evicted by later rows of this batch
  prm.batch = batch - prm.skipped;
  prm.storage = {tokens.data_ptr<int64_t>(), meta.data_ptr<int64_t>(), priorities.data_ptr<float>(),
                 cursor.data_ptr<int64_t>(), capacity, max_length};
  prm.input_ids = ids.data_ptr<int64_t>() + prm.skipped * width;
  prm.prompt_lengths = prompts.data_ptr<int64_t>() + prm.skipped;
  prm.lengths = lens.data_ptr<int64_t>() + prm.skipped;
  prm.width = width;
  prm.step = step;
  prm.pad_token_id = pad_token_id;
  if (tokens.is_cpu()) return push_cpu(prm);
#ifdef DISTILLM_WITH_CUDA
  if (tokens.is_cuda()) {
    const c10::cuda::CUDAGuard guard(tokens.device());
    push_cuda(prm, stream_of(tokens));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  no_kernel(op, tokens.device());
}

void push_kernel(at::Tensor& tokens, at::Tensor& meta, at::Tensor& priorities, at::Tensor& cursor,
                 const at::Tensor& input_ids, const at::Tensor& prompt_lengths, const at::Tensor& lengths,
                 int64_t step, int64_t pad_token_id) {
  push_impl(tokens, meta, priorities, cursor, input_ids, prompt_lengths, lengths, step, pad_token_id, true);
}

void push_meta(at::Tensor& tokens, at::Tensor& meta, at::Tensor& priorities, at::Tensor& cursor,
               const at::Tensor& input_ids, const at::Tensor& prompt_lengths, const at::Tensor& lengths,
               int64_t step, int64_t pad_token_id) {
  push_impl(tokens, meta, priorities, cursor, input_ids, prompt_lengths, lengths, step, pad_token_id, false);
}

// -- gather -----------------------------------------------------------------------------------

using Batch = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // input_ids, attention_mask, labels

Batch gather_impl(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& slots, int64_t pad_token_id,
                  int64_t ignore_index, bool run) {
  const int64_t capacity = tokens.size(0), max_length = tokens.size(1), rows = slots.size(0);
  at::Tensor input_ids = at::empty({rows, max_length}, tokens.options());
  at::Tensor attention_mask = at::empty({rows, max_length}, tokens.options());
  at::Tensor labels = at::empty({rows, max_length}, tokens.options());
  if (!run || rows == 0) return {input_ids, attention_mask, labels};
  GatherParams prm{};
  prm.tokens = tokens.data_ptr<int64_t>();
  prm.meta = meta.data_ptr<int64_t>();
  prm.indices = slots.data_ptr<int64_t>();
  prm.rows = rows;
  prm.input_ids = input_ids.data_ptr<int64_t>();
  prm.attention_mask = attention_mask.data_ptr<int64_t>();
  prm.labels = labels.data_ptr<int64_t>();
  prm.capacity = capacity;
  prm.max_length = max_length;
  prm.pad_token_id = pad_token_id;
  prm.ignore_index = ignore_index;
  if (tokens.is_cpu()) {
    for (int64_t i = 0; i < rows; ++i) {
      TORCH_CHECK(0 <= prm.indices[i] && prm.indices[i] < capacity, "replay_gather: indices must be slots in [0, ",
                  capacity, "), got ", prm.indices[i], " at position ", i);
    }
    gather_cpu(prm);
    return {input_ids, attention_mask, labels};
  }
#ifdef DISTILLM_WITH_CUDA
  if (tokens.is_cuda()) {
    const c10::cuda::CUDAGuard guard(tokens.device());
    gather_cuda(prm, stream_of(tokens));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {input_ids, attention_mask, labels};
  }
#endif
  no_kernel("replay_gather", tokens.device());
}

Batch gather_op(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& indices, int64_t pad_token_id,
                int64_t ignore_index, bool run) {
  constexpr const char* op = "replay_gather";
  check_tokens(tokens, op);
  check_meta(meta, tokens, op);
  const at::Tensor slots = as_index_tensor(indices, op, "indices", 1, tokens);
  return gather_impl(tokens, meta, slots, pad_token_id, ignore_index, run);
}

Batch gather_kernel(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& indices, int64_t pad_token_id,
                    int64_t ignore_index) {
  return gather_op(tokens, meta, indices, pad_token_id, ignore_index, true);
}

Batch gather_meta(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& indices, int64_t pad_token_id,
                  int64_t ignore_index) {
  return gather_op(tokens, meta, indices, pad_token_id, ignore_index, false);
}

// -- sample -----------------------------------------------------------------------------------

using Sample = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // indices, then a Batch

void check_sample(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& priorities,
                  const at::Tensor& cursor, int64_t k, double beta) {
  constexpr const char* op = "replay_sample";
  check_tokens(tokens, op);
  const int64_t capacity = tokens.size(0);
  check_meta(meta, tokens, op);
  check_priorities(priorities, capacity, tokens, op);
  check_cursor(cursor, tokens, op);
  TORCH_CHECK(0 <= k && k <= capacity, op, ": k must be in [0, capacity=", capacity, "], got ", k);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0, op, ": beta must be a finite number >= 0, got ", beta);
}

// The slots to draw. CPU: Floyd's k draws when all weights are equal (the common, uniform
// case), else Efraimidis-Spirakis keys over the filled slots. CUDA: the keys over all slots,
// empty ones at -inf, and a device top-k, so the fill count is never read on the host.
at::Tensor draw_slots(const at::Tensor& priorities, const at::Tensor& cursor, int64_t k, double beta,
                      const std::optional<at::Generator>& generator) {
  const int64_t capacity = priorities.size(0);
  if (priorities.is_cpu()) {
    const int64_t filled = cursor.data_ptr<int64_t>()[kFilled];
    TORCH_CHECK(k <= filled, "replay_sample: cannot sample ", k, " entries without replacement from a buffer "
                "holding ", filled);
    at::Tensor slots = at::empty({k}, cursor.options());
    const float* w = priorities.data_ptr<float>();
    if (beta == 0.0 || std::all_of(w, w + filled, [w](float x) { return x == w[0]; })) {
      auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
      const std::lock_guard<std::mutex> lock(gen->mutex_);
      sample_uniform_cpu(filled, k, [gen] { return gen->random64(); }, slots.data_ptr<int64_t>());
    } else {
      const at::Tensor noise = at::rand({filled}, generator, priorities.options());
      sample_weighted_cpu(w, filled, noise.data_ptr<float>(), static_cast<float>(beta), k, slots.data_ptr<int64_t>());
    }
    return slots;
  }
#ifdef DISTILLM_WITH_CUDA
  if (priorities.is_cuda()) {
    const c10::cuda::CUDAGuard guard(priorities.device());
    const at::Tensor noise = at::rand({capacity}, generator, priorities.options());
    at::Tensor keys = at::empty({capacity}, priorities.options());
    sample_keys_cuda(priorities.data_ptr<float>(), cursor.data_ptr<int64_t>(), noise.data_ptr<float>(),
                     static_cast<float>(beta), capacity, keys.data_ptr<float>(), stream_of(priorities));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return std::get<1>(at::topk(keys, k, /*dim=*/0, /*largest=*/true, /*sorted=*/true));
  }
#endif
  no_kernel("replay_sample", priorities.device());
}

Sample sample_kernel(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& priorities,
                     const at::Tensor& cursor, int64_t k, double beta, std::optional<at::Generator> generator,
                     int64_t pad_token_id, int64_t ignore_index) {
  check_sample(tokens, meta, priorities, cursor, k, beta);
  const at::Tensor slots = draw_slots(priorities, cursor, k, beta, generator);
  auto [input_ids, attention_mask, labels] = gather_impl(tokens, meta, slots, pad_token_id, ignore_index, true);
  return {slots, input_ids, attention_mask, labels};
}

Sample sample_meta(const at::Tensor& tokens, const at::Tensor& meta, const at::Tensor& priorities,
                   const at::Tensor& cursor, int64_t k, double beta, std::optional<at::Generator> /*generator*/,
                   int64_t pad_token_id, int64_t ignore_index) {
  check_sample(tokens, meta, priorities, cursor, k, beta);
  const at::Tensor slots = at::empty({k}, cursor.options());
  auto [input_ids, attention_mask, labels] = gather_impl(tokens, meta, slots, pad_token_id, ignore_index, false);
  return {slots, input_ids, attention_mask, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillm, CPU, m) {
  m.impl("replay_push", &push_kernel);
  m.impl("replay_sample", &sample_kernel);
  m.impl("replay_gather", &gather_kernel);
}
TORCH_LIBRARY_IMPL(distillm, Meta, m) {
  m.impl("replay_push", &push_meta);
  m.impl("replay_sample", &sample_meta);
  m.impl("replay_gather", &gather_meta);
}
#ifdef DISTILLM_WITH_CUDA
TORCH_LIBRARY_IMPL(distillm, CUDA, m) {
  m.impl("replay_push", &push_kernel);
  m.impl("replay_sample", &sample_kernel);
  m.impl("replay_gather", &gather_kernel);
}
#endif

}  // namespace distillm::replay_impl
