// A libtorch program that calls distillm::skew_kl and distillm::fused_linear_skew_kl,
// backpropagates through them, and checks values and gradients against the same loss written
// with plain ATen ops in double precision.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

#include "fused_linear/fused_linear.h"
#include "skew_kl/skew_kl.h"

namespace {

// KL(first || alpha first + (1 - alpha) second) per row, mean over rows, as plain ATen ops.
torch::Tensor reference(const torch::Tensor& student, const torch::Tensor& teacher, double alpha,
                        bool reverse) {
  const auto log_q = torch::log_softmax(student, -1);
  const auto log_p = torch::log_softmax(teacher, -1);
  const auto& log_first = reverse ? log_q : log_p;
  const auto& log_second = reverse ? log_p : log_q;
  const auto log_mix = torch::logaddexp(log_first + std::log(alpha), log_second + std::log1p(-alpha));
  return (log_first.exp() * (log_first - log_mix)).sum(-1).mean();
}

int checks = 0, failures = 0;

void check(bool ok, const char* what, double got, double want) {
  std::printf("%s %s: got %.9g, want %.9g\n", ok ? "PASS" : "FAIL", what, got, want);
  checks += 1;
  failures += ok ? 0 : 1;
}

void run_case(bool reverse) {
  torch::manual_seed(0);
  const auto student = (torch::randn({4, 6, 129}) * 2).requires_grad_();
  const auto teacher = torch::randn({4, 6, 129}) * 2;
  const auto loss = distillm::skew_kl(student, teacher, std::nullopt, 0.1, reverse);
  loss.backward();

  const auto student64 = student.detach().to(torch::kDouble).requires_grad_();
  const auto expected = reference(student64, teacher.to(torch::kDouble), 0.1, reverse);
  expected.backward();

  const double value_error = std::abs(loss.item<double>() - expected.item<double>());
  check(value_error <= 1e-5 * std::abs(expected.item<double>()), reverse ? "SRKL value" : "SKL value",
        loss.item<double>(), expected.item<double>());
  const double grad_error = (student.grad().to(torch::kDouble) - student64.grad()).abs().max().item<double>();
  const double grad_scale = student64.grad().abs().max().item<double>();
  check(grad_error <= 1e-5 * grad_scale, reverse ? "SRKL gradient (max error)" : "SKL gradient (max error)",
        grad_error, 1e-5 * grad_scale);
}

// The same loss from hidden states and output embeddings, padded to different vocabularies
// (40 and 37 rows: the first 37 are shared), in chunks of 4 positions.
void run_fused_linear_case() {
  torch::manual_seed(1);
  const auto student_hidden = torch::randn({5, 7, 16}).requires_grad_();
  const auto student_weight = (torch::randn({40, 16}) * 0.5).requires_grad_();
  const auto teacher_hidden = torch::randn({5, 7, 24});
  const auto teacher_weight = torch::randn({37, 24}) * 0.5;
  const auto loss = distillm::fused_linear_skew_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                   std::nullopt, std::nullopt, std::nullopt, 0.1, false, 1.0,
                                                   -100, "mean", /*chunk_size=*/4);
  loss.backward();

  const auto hidden64 = student_hidden.detach().to(torch::kDouble).requires_grad_();
  const auto weight64 = student_weight.detach().to(torch::kDouble).requires_grad_();
  const auto student_logits = torch::matmul(hidden64, weight64.narrow(0, 0, 37).t());
  const auto teacher_logits = torch::matmul(teacher_hidden.to(torch::kDouble), teacher_weight.to(torch::kDouble).t());
  const auto expected = reference(student_logits, teacher_logits, 0.1, false);
  expected.backward();

  check(std::abs(loss.item<double>() - expected.item<double>()) <= 1e-5 * std::abs(expected.item<double>()),
        "fused-linear SKL value", loss.item<double>(), expected.item<double>());
  for (const auto& [name, grad, grad64] :
       {std::tuple{"fused-linear hidden gradient (max error)", student_hidden.grad(), hidden64.grad()},
        std::tuple{"fused-linear weight gradient (max error)", student_weight.grad(), weight64.grad()}}) {
    const double error = (grad.to(torch::kDouble) - grad64).abs().max().item<double>();
    const double scale = grad64.abs().max().item<double>();
    check(error <= 1e-5 * scale, name, error, 1e-5 * scale);
  }
}

}  // namespace

int main() {
  run_case(false);
  run_case(true);
  run_fused_linear_case();
  // The op is reachable through the dispatcher by name, as other libraries would call it.
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("distillm::skew_kl", "");
  check(op.hasKernelForDispatchKey(c10::DispatchKey::Autograd) ||
            op.hasKernelForDispatchKey(c10::DispatchKey::AutogradCPU),
        "autograd kernel registered", 1, 1);
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
