// Torch-free math of the sparse-teacher (top-k) losses, shared by the CPU and CUDA schedules.
//
// The teacher is known at K distinct ids i_1..i_K of a row, as log-probabilities at
// temperature T. Both distributions are coarsened to K + 1 classes, the kept ids and the tail:
//   p̄ = (p_i1, ..., p_iK, max(0, 1 - sum_k p_ik)),   q̄ = (q_i1, ..., q_iK, q_tail),
// q = softmax(z / T) over the V vocabulary rows, q_tail the mass of the ids outside the top-k.
// The loss is the usual divergence on (p̄, q̄) (reference.py's topk_kd_reference defines it).
//
// Per class c, with h_c = dL/d log q̄_c, the gradient with respect to s = z / T is
//   kept id i_k:  h_k - q_ik H,
//   tail id j:    h_tail exp(s_j - lse_tail) - q_j H = e_j (h_tail / S_tail - H / S_all),
//                 computed as e_j (h_tail S_kept / S_tail - H_kept) / S_all (row_gradient),
// H = sum_c h_c, e_j = exp(s_j - max s), S_tail and S_all the sums of e over the tail and the
// row. So a row costs three light passes over V (max, tail sum, gradient), and the class math,
// O(K), is done in double. S_tail is summed over the tail ids themselves, never as a
// difference S_all - S_kept: tail masses near 0 occur (a confident student), and there the
// difference would keep none of its digits.
//
// A class whose teacher or student log-probability is -inf is dropped (it adds 0 and gets no
// gradient), as skew_kl drops an entry with a -inf logit: the tail when K = V (it is empty), or
// when the teacher's top-k carry all of its mass.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "skew_kl/skew_kl_math.h"

namespace distillm::topk_impl {

using skew_kl_impl::DType;
using skew_kl_impl::RowLayout;

enum class Divergence : int { kSkew = 0, kJSD = 1, kTVD = 2 };

// One loss type, resolved (fkl = skew at alpha 0, rkl = reverse skew at alpha 0).
struct LossSpec {
  Divergence divergence;
  double alpha;  // kSkew
  bool reverse;  // kSkew
  double beta;   // kJSD: beta SKL_beta + (1 - beta) SRKL_(1 - beta)
};

// A class's share of the loss, and h = d(share) / d log q̄_c.
struct ClassTerms {
  double loss = 0.0;
  double h = 0.0;
};

DISTILLM_HD double neg_inf_double() { return -__builtin_huge_val(); }

DISTILLM_HD double log_add_exp(double a, double b) {
  const double hi = a > b ? a : b, lo = a > b ? b : a;
  return hi == neg_inf_double() ? hi : hi + log1p(exp(lo - hi));
}

// KL(f || alpha f + (1 - alpha) s) for one class: f = p, s = q (SKL), or f = q, s = p (SRKL).
DISTILLM_HD ClassTerms skew_class(double log_p, double log_q, double alpha, bool reverse) {
  const double log_f = reverse ? log_q : log_p, log_s = reverse ? log_p : log_q;
  const double log_mix = alpha == 0.0 ? log_s : log_add_exp(log_f + log(alpha), log_s + log1p(-alpha));
  const double f = exp(log_f);
  const double log_f_over_mix = log_f - log_mix;
  ClassTerms t;
  t.loss = f * log_f_over_mix;
  if (reverse) {  // d/du [q (u - log m)], u = log q, m = alpha q + (1 - alpha) p
    const double alpha_q_over_mix = alpha == 0.0 ? 0.0 : exp(log(alpha) + log_q - log_mix);
    t.h = f * (log_f_over_mix + 1.0 - alpha_q_over_mix);
  } else {  // -p (1 - alpha) q / m
    t.h = -(1.0 - alpha) * exp(log_p + log_q - log_mix);
  }
  return t;
}

DISTILLM_HD ClassTerms class_terms(const LossSpec& spec, double log_p, double log_q) {
  if (log_p == neg_inf_double() || log_q == neg_inf_double()) return {};
  switch (spec.divergence) {
    case Divergence::kSkew: return skew_class(log_p, log_q, spec.alpha, spec.reverse);
    case Divergence::kJSD: {
      const ClassTerms a = skew_class(log_p, log_q, spec.beta, false);
      const ClassTerms b = skew_class(log_p, log_q, 1.0 - spec.beta, true);
      return {spec.beta * a.loss + (1.0 - spec.beta) * b.loss, spec.beta * a.h + (1.0 - spec.beta) * b.h};
    }
    case Divergence::kTVD: {
      const double p = exp(log_p), q = exp(log_q);
      const double half_sign = q > p ? 0.5 : (q < p ? -0.5 : 0.0);
      return {0.5 * (p > q ? p - q : q - p), q * half_sign};
    }
  }
  return {};
}

// The teacher's tail: log(1 - sum_k p_ik), -inf where the top-k carry all the mass.
DISTILLM_HD double teacher_tail_log_prob(double kept_mass) {
  return kept_mass < 1.0 ? log1p(-kept_mass) : neg_inf_double();
}

// Raw-pointer view of one call: what a schedule needs, nothing torch.
struct TopkParams {
  const void* student;  // (rows, vocab) as student_rows describes, last dim contiguous
  DType student_dtype;
  RowLayout student_rows;
  int64_t num_rows;
  int64_t vocab;
  int64_t k;
  const int64_t* ids;       // (rows, k) contiguous, ascending in each row
  const float* log_probs;   // (rows, k) contiguous, in the order of ids
  const int64_t* labels;    // (rows,) or nullptr
  int64_t ignore_index;
  float* row_loss;          // (rows,) out
  void* grad;               // (rows, vocab) contiguous, student dtype; nullptr: loss only
  float grad_scale;         // the caller's scale over T
  const float* grad_divisor;  // nullptr, or one float (read on the device by the CUDA kernel)
  float inv_temperature;
  LossSpec loss;
};

// What the class phase of a row yields for its gradient pass.
struct RowGradient {
  double tail_factor;  // a tail entry's gradient is e_j times it
  double sum_h;        // H
};

// h_tail / S_tail - H / S_all, written as (h_tail S_kept / S_tail - H_kept) / S_all: where the
// tail holds nearly all the mass the two terms of the first form agree to more digits than a
// double has, and their difference, the whole gradient there, would be lost.
DISTILLM_HD RowGradient row_gradient(double h_tail, double kept_sum_h, double tail_sum, double kept_sum) {
  const double total_sum = tail_sum + kept_sum;
  const double tail_share = tail_sum > 0.0 ? h_tail * (kept_sum / tail_sum) : 0.0;
  return {(tail_share - kept_sum_h) / total_sum, h_tail + kept_sum_h};
}

}  // namespace distillm::topk_impl
