// A libtorch program that calls distillm::skew_kl, backpropagates through it, and checks value
// and gradient against the same loss written with plain ATen ops in double precision.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

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

int failures = 0;

void check(bool ok, const char* what, double got, double want) {
  std::printf("%s %s: got %.9g, want %.9g\n", ok ? "PASS" : "FAIL", what, got, want);
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

}  // namespace

int main() {
  run_case(false);
  run_case(true);
  // The op is reachable through the dispatcher by name, as other libraries would call it.
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("distillm::skew_kl", "");
  check(op.hasKernelForDispatchKey(c10::DispatchKey::Autograd) ||
            op.hasKernelForDispatchKey(c10::DispatchKey::AutogradCPU),
        "autograd kernel registered", 1, 1);
  std::printf("%d passed, %d failed\n", 5 - failures, failures);
  return failures == 0 ? 0 : 1;
}
