// Every operator schema of the distillm library, in one place. Implementations register per
// backend next to their kernels (csrc/<family>/*.cpp); schemas are defined unconditionally so
// that imports, fake tensors and torch.compile work in every build.
#include <torch/library.h>

TORCH_LIBRARY(distillm, m) {
  // Fused skew KL divergence between softmax(student/T) and softmax(teacher/T) per position.
  // reverse=False: KL(p || a p + (1-a) q); reverse=True: KL(q || a q + (1-a) p).
  m.def(
      "skew_kl(Tensor student_logits, Tensor teacher_logits, Tensor? labels=None, *, "
      "float alpha=0.1, bool reverse=False, float temperature=1.0, int ignore_index=-100, "
      "str reduction=\"mean\") -> Tensor");
  // Per-position loss (float32, leading shape) and, if compute_grad, d(loss_row)/d(student) in
  // the student's dtype and shape (an empty tensor otherwise). The building block of skew_kl.
  m.def(
      "_skew_kl_forward(Tensor student_logits, Tensor teacher_logits, Tensor? labels, "
      "float alpha, bool reverse, float temperature, int ignore_index, bool compute_grad) "
      "-> (Tensor row_loss, Tensor grad)");
}
