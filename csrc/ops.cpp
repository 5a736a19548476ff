// Every operator schema of the distillm library, in one place. Implementations register per
// backend next to their kernels (csrc/<family>/*.cpp); schemas are defined unconditionally so
// that imports, fake tensors and torch.compile work in every build.
#include <torch/library.h>

TORCH_LIBRARY(distillm, m) {
  // Fused skew KL divergence between softmax(student/T) and softmax(teacher/T) per position.
  // reverse=False: KL(p || a p + (1-a) q); reverse=True: KL(q || a q + (1-a) p).
  // num_items: the denominator of "mean" instead of the valid positions (e.g. the valid
  // positions of every micro-batch and rank, so that accumulation averages as one batch).
  m.def(
      "skew_kl(Tensor student_logits, Tensor teacher_logits, Tensor? labels=None, *, "
      "float alpha=0.1, bool reverse=False, float temperature=1.0, int ignore_index=-100, "
      "str reduction=\"mean\", Tensor? num_items=None) -> Tensor");
  // Per-position loss (float32, leading shape) and, if compute_grad, grad_scale times
  // d(loss_row)/d(student) in the student's dtype and shape (an empty tensor otherwise),
  // divided by grad_divisor if given (one float32 element on the logits' device, which the
  // kernel reads: a mean's count costs no host sync). The building block of skew_kl.
  m.def(
      "_skew_kl_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "float alpha, bool reverse, float temperature, int ignore_index, bool compute_grad, "
      "float grad_scale=1.0, Tensor? grad_divisor=None) -> (Tensor row_loss, Tensor grad)");

  // skew_kl with the teacher known only at K distinct ids per position (an offline top-k cache),
  // as log-probabilities at temperature T: the loss on the K ids plus one tail class holding the
  // rest of each distribution's mass (csrc/topk/topk_math.h), exact for K = V.
  m.def(
      "skew_kl_topk(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logprobs, "
      "Tensor? labels=None, *, float alpha=0.1, bool reverse=False, float temperature=1.0, "
      "int ignore_index=-100, str reduction=\"mean\", Tensor? num_items=None) -> Tensor");
  // Its building block, for any loss type (fkl, rkl, skl, sfkl, srkl, jsd, tvd), as
  // _skew_kl_forward is skew_kl's.
  m.def(
      "_kd_topk_forward(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logprobs, "
      "Tensor? labels, str loss, float alpha, float beta, float temperature, int ignore_index, "
      "bool compute_grad, float grad_scale=1.0, Tensor? grad_divisor=None) "
      "-> (Tensor row_loss, Tensor grad)");

  // The same losses from the final hidden states and the output embeddings (vocabulary rows
  // 0..min(Vs, Vt)-1), a chunk of positions at a time, never building [positions, V] logits.
  // Positions labelled ignore_index are skipped before any GEMM. Differentiable with respect to
  // student_hidden, student_weight and student_bias. chunk_size 0 = automatic.
  m.def(
      "fused_linear_skew_kl(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor? labels=None, Tensor? student_bias=None, "
      "Tensor? teacher_bias=None, *, float alpha=0.1, bool reverse=False, float temperature=1.0, "
      "int ignore_index=-100, str reduction=\"mean\", int chunk_size=0) -> Tensor");
  // Any loss type (fkl, rkl, skl, sfkl, srkl, jsd, tvd) and cross-entropy on the labels, from
  // the same chunk logits: (kd_ratio * KD + (1 - kd_ratio) * CE, KD, CE). Only the first output
  // is differentiable; CE is 0 when kd_ratio == 1 (not computed).
  m.def(
      "fused_linear_kd(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor? labels=None, Tensor? student_bias=None, "
      "Tensor? teacher_bias=None, *, str loss=\"skl\", float alpha=0.1, float beta=0.5, "
      "float temperature=1.0, float kd_ratio=1.0, int ignore_index=-100, str reduction=\"mean\", "
      "int chunk_size=0) -> (Tensor loss, Tensor kd, Tensor ce)");
  // Per-position KD and CE (float32, leading shape) and, for the inputs grad_mask names
  // (hidden, weight, bias), the gradients of sum over positions of
  // grad_scale * row_scale * (kd_ratio * KD + (1 - kd_ratio) * CE); empty tensors otherwise.
  m.def(
      "_fused_linear_kd_forward(Tensor student_hidden, Tensor student_weight, "
      "Tensor teacher_hidden, Tensor teacher_weight, Tensor? labels, Tensor? student_bias, "
      "Tensor? teacher_bias, str loss, float alpha, float beta, float temperature, float kd_ratio, "
      "int ignore_index, int chunk_size, bool[3] grad_mask, float grad_scale, Tensor? row_scale) "
      "-> (Tensor kd_rows, Tensor ce_rows, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // fused_linear_kd with a sparse teacher (skew_kl_topk's): the student's hidden states and output
  // embedding against the teacher's top-k ids and log-probabilities at each position.
  m.def(
      "fused_linear_kd_topk(Tensor student_hidden, Tensor student_weight, Tensor teacher_ids, "
      "Tensor teacher_logprobs, Tensor? labels=None, Tensor? student_bias=None, *, str loss=\"skl\", "
      "float alpha=0.1, float beta=0.5, float temperature=1.0, float kd_ratio=1.0, "
      "int ignore_index=-100, str reduction=\"mean\", int chunk_size=0) "
      "-> (Tensor loss, Tensor kd, Tensor ce)");
  m.def(
      "_fused_linear_kd_topk_forward(Tensor student_hidden, Tensor student_weight, "
      "Tensor teacher_ids, Tensor teacher_logprobs, Tensor? labels, Tensor? student_bias, str loss, "
      "float alpha, float beta, float temperature, float kd_ratio, int ignore_index, int chunk_size, "
      "bool[3] grad_mask, float grad_scale, Tensor? row_scale) "
      "-> (Tensor kd_rows, Tensor ce_rows, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  // Replay buffer of student-generated sequences (csrc/replay/replay_math.h has the layout).
  // No keyword-only arguments: they cost microseconds per call to parse, the ops' whole budget.
  // Writes a batch of right-padded sequences into the FIFO ring, evicting the oldest entries.
  m.def(
      "replay_push(Tensor(a!) tokens, Tensor(b!) meta, Tensor(c!) priorities, Tensor(d!) cursor, "
      "Tensor input_ids, Tensor prompt_lengths, Tensor lengths, int step=0, int pad_token_id=0) -> ()");
  // k distinct filled slots drawn with probability proportional to priority**beta (random
  // numbers from `generator`), and those entries as a training batch like replay_gather's.
  m.def(
      "replay_sample(Tensor tokens, Tensor meta, Tensor priorities, Tensor cursor, int k, "
      "float beta=1.0, Generator? generator=None, int pad_token_id=0, int ignore_index=-100) "
      "-> (Tensor indices, Tensor input_ids, Tensor attention_mask, Tensor labels)");
  // The entries in slots `indices` as a training batch: input_ids, attention_mask, labels
  // (k, max_length), labels -100 on prompt and padding (Hugging Face convention).
  m.def(
      "replay_gather(Tensor tokens, Tensor meta, Tensor indices, int pad_token_id=0, "
      "int ignore_index=-100) -> (Tensor input_ids, Tensor attention_mask, Tensor labels)");
}
