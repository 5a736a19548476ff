// The CUDA kernel's formulas (skew_kl_cuda.cu), shared with its host emulation
// (skew_kl_cuda_emulation.cpp), through which the CPU test suite checks them.
//
// The CPU formulas (skew_kl_math.h) spend their instructions on accuracy a vector unit gives
// cheaply; a GPU row is bound by instruction issue long before memory. Here:
// - Logits are scaled to base 2 once: a = k x - k max, k = log2(e) / tau, one FFMA; every
//   exponential is then one ex2.approx (MUFU), every log one lg2.approx.
// - y = odds s / f comes from the logits' difference, 2^(log2(odds) + log2(s / f)): one ex2, no
//   division, and no clamp of f needed, since s / f never forms.
// - 1 / (1 + y) is one rcp.approx; log1p(y) is lg2(1 + y), or y - y^2 / 2 where y < 1/128
//   (lg2's absolute error would swamp log1p(y) ~ y there). SRKL's g = y / (1 + y) - log1p(y)
//   ~ -y^2 / 2 keeps lg2's absolute error above that; passes 2 and 3 form g with the same
//   instructions, so where one entry holds most of q, g - G cancels it.
// - Masked entries (either logit -inf) need no test of their own where IEEE arithmetic already
//   gives 0; the tests left are the ones it does not.
//
// - log(f / m) = -log(alpha (1 + y)) is one lg2, except near f = s, where it is small and any
//   log's absolute error would swamp it: there a degree-5 polynomial in log2(s / f).
// - Pass-1 sums are compensated and merged in double; the row's log2(sum_u / sum_z) is taken
//   in double. Either rounding enters a small loss whole.
//
// Error: each MUFU result is within 2^-22 (relative; lg2: absolute on [0.5, 2]) of the exact
// value, against ~2^-24 for the rounding of the float formulas around it. An error common to
// every entry of a row (a bias) cancels where the row is normalized: the sums of exps, and G,
// which carries the same bias as each g. The CPU suite runs these formulas with every MUFU
// result moved by the full bound, with hashed signs and with one sign throughout
// (approx_math.h), against the float64 reference at its usual tolerances
// (test_cuda_emulation.py).
#pragma once

#include "approx_math.h"
#include "skew_kl_math.h"

#include <cmath>
#include <cstdint>

namespace distillm::skew_kl_impl::gpu {

using approx::fast_exp2;
using approx::fast_log2;
using approx::fast_rcp;

constexpr double kLog2eDouble = 1.4426950408889634;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kMaxLog2Y = 99.0f;  // y <= 2^99: 1 + y and 1 / (1 + y) stay finite and normal
constexpr float kSeriesBelow = 1.0f / 128.0f;  // y below which log1p(y) is a series

constexpr float kNearOptimum = 1.0f / 16.0f;  // |log2(s / f)| below which log(f / m) is a polynomial
constexpr int kNearTerms = 5;
constexpr int kChunk = 8;  // entries per vector step: 16 bytes of bf16/fp16, 32 of float
// An entry's index within a row. Rows have at most 2^30 entries (checked on the host), and
// 32-bit indices spare the per-entry loops 64-bit address arithmetic.
using RowIndex = int32_t;
static_assert(kMaxCudaVocab <= (int64_t{1} << 30), "a RowIndex must hold every index a loop steps to");

// What every row of a call shares, rounded once on the host.
struct CallConstants {
  float k;              // log2(e) / tau
  float alpha;
  float log2_odds;      // log2((1 - alpha) / alpha)
  float odds;           // (1 - alpha) / alpha
  float neg_log_alpha;  // -log(alpha)
  // log(f / m) = -log(alpha + beta 2^l) = sum_n near[n - 1] l^n, beta = 1 - alpha, l = log2(s / f):
  // minus the cumulants of a Bernoulli(beta), kappa_n (ln 2)^n / n!. The series converges for
  // |l ln 2| < pi; at |l| < 1/16 its terms past l^5 add < 2e-9 relative.
  float near[kNearTerms];
};

inline CallConstants call_constants(const Constants& c) {
  CallConstants out{};
  out.k = static_cast<float>(kLog2eDouble * static_cast<double>(c.inv_temperature));
  out.alpha = c.alpha;
  out.odds = c.odds;
  out.neg_log_alpha = c.neg_log_alpha;
  if (c.alpha > 0.0f) {
    const double a = c.alpha, b = 1.0 - a, ab = a * b, ln2 = 0.6931471805599453;
    out.log2_odds = static_cast<float>(std::log2(b / a));
    const double kappa[kNearTerms] = {b, ab, ab * (a - b), ab * (1.0 - 6.0 * ab), ab * (a - b) * (1.0 - 12.0 * ab)};
    double power = 1.0;  // (ln 2)^n / n!
    for (int n = 1; n <= kNearTerms; ++n) {
      power *= ln2 / n;
      out.near[n - 1] = static_cast<float>(-kappa[n - 1] * power);
    }
  }
  return out;
}

// Pass 1: one thread's running max and sum_v 2^(k x_v - shift), shift = k max (0 while the
// max is -inf, so that -inf entries give 2^-inf = 0, not NaN). The sum is compensated (Kahan,
// once per chunk, whose own exps are summed as a tree): between nearly equal distributions the
// loss is ~1e-6 and any relative error of a row's sum enters it whole; plain float sums of a
// 1001-entry row erred by 5e-7 there.
struct ExpSum {
  float max = kNegInf;
  float shift = 0.0f;
  float sum = 0.0f;
  float compensation = 0.0f;  // what the rounding of `sum` lost, negated
};

DISTILLM_HD float shift_of(float max, float k) { return max == kNegInf ? 0.0f : k * max; }

template <int N>
DISTILLM_HD float tree_sum(float (&x)[N]) {
#pragma unroll
  for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
    for (int j = 0; j < width; ++j) x[j] += x[j + width];
  }
  return x[0];
}

// Adds N entries (N a power of 2): one max over them, a rescale of the sum only if it grows,
// one ex2 each (left in `exps`). fmaxf ignores NaN (as FMNMX does); a NaN entry reaches the sum
// through its ex2. Returns the factor the earlier sum was rescaled by (1 if none).
template <int N>
DISTILLM_HD float add_entries(ExpSum& s, const float (&x)[N], float k, float (&exps)[N]) {
  float chunk_max = x[0];
#pragma unroll
  for (int j = 1; j < N; ++j) chunk_max = fmaxf(chunk_max, x[j]);
  float factor = 1.0f;
  if (chunk_max > s.max) {  // rare: the max grows about log(entries) times
    const float shift = k * chunk_max;  // chunk_max > -inf here
    // The first max rescales a sum of 0 from shift 0: the clamp keeps 2^(0 - shift) finite.
    factor = fast_exp2(fminf(s.shift - shift, 0.0f));
    s.sum *= factor;
    s.compensation *= factor;
    s.max = chunk_max;
    s.shift = shift;
  }
  float tree[N];
#pragma unroll
  for (int j = 0; j < N; ++j) tree[j] = exps[j] = fast_exp2(fmaf(x[j], k, -s.shift));
  const float added = tree_sum(tree) - s.compensation;
  const float total = s.sum + added;
  s.compensation = (total - s.sum) - added;
  s.sum = total;
  return factor;
}

// A value summed at a thread's shift, moved to the row's maximum (in double, for the merge). A
// thread whose maximum stayed -inf saw only -inf (sum 0) or NaN (sum NaN) entries: its value
// is taken as is, so a NaN reaches the row.
DISTILLM_HD double at_row_max(double value, const ExpSum& s, float row_max, float k) {
  return s.max == kNegInf ? value : value * fast_exp2(s.shift - shift_of(row_max, k));
}

DISTILLM_HD double sum_at(const ExpSum& s, float row_max, float k) {
  return at_row_max(static_cast<double>(s.sum) - static_cast<double>(s.compensation), s, row_max, k);
}

// Pass 1 over both inputs. FKL (alpha = 0, forward: kDroppedMass) also sums the teacher's exps
// where the student's logit is -inf. Those entries are dropped from the loss, so G = -(the
// teacher's kept mass) = -(1 - dropped_mass / sum_u) is known after pass 1, and the loss and
// the gradient can share the second pass: two reads of the logits instead of three.
template <bool kDroppedMass>
struct PairSums {
  ExpSum student, teacher;
  float dropped_mass = 0.0f;  // at the teacher's shift
};

// FKL's G (already divided by the f's sum) from pass 1: minus the teacher's kept mass.
DISTILLM_HD float fkl_sum_qg(double sum_u, double dropped_mass) {
  return static_cast<float>(-(sum_u - dropped_mass) / sum_u);
}

template <bool kDroppedMass, int N>
DISTILLM_HD void add_pair(PairSums<kDroppedMass>& s, const float (&zs)[N], const float (&us)[N], float k) {
  float student_exps[N], teacher_exps[N];
  add_entries(s.student, zs, k, student_exps);
  const float factor = add_entries(s.teacher, us, k, teacher_exps);
  if constexpr (kDroppedMass) {
    s.dropped_mass *= factor;
#pragma unroll
    for (int j = 0; j < N; ++j) s.dropped_mass += zs[j] == kNegInf ? teacher_exps[j] : 0.0f;
  }
}

// Passes 2 and 3: what one row's entries share, once its maxima and sums are known.
struct RowConstants {
  float k, shift_z, shift_u;
  float log2_sum_ratio;  // log2(sum_u / sum_z): log2(q / p) = (a_z - a_u) + this
  // The gradient's scale folded into the normalizations, one multiply per entry fewer.
  float grad_inv_sum_z, grad_inv_sum_u;
  // log2(y) = log2(odds) + log2(s / f) = this -+ (a_z - a_u) for SKL (+) and SRKL (-): one add
  // per entry where log2(s / f) itself is not needed.
  float log2_y_offset[2];
};

// From the merged sums, still in double: log2(sum_u / sum_z) enters every log(q / p), so a
// float rounding of either sum (2^-24) would move a small loss by ~1e-7.
DISTILLM_HD RowConstants row_constants(float max_z, float max_u, double sum_z, double sum_u,
                                       const CallConstants& c, float grad_scale) {
  RowConstants r{};
  r.k = c.k;
  r.shift_z = shift_of(max_z, c.k);
  r.shift_u = shift_of(max_u, c.k);
  r.log2_sum_ratio = static_cast<float>(log2(sum_u / sum_z));
  r.grad_inv_sum_z = static_cast<float>(grad_scale / sum_z);
  r.grad_inv_sum_u = static_cast<float>(grad_scale / sum_u);
  r.log2_y_offset[0] = c.log2_odds + r.log2_sum_ratio;
  r.log2_y_offset[1] = c.log2_odds - r.log2_sum_ratio;
  return r;
}

// A row whose loss and every gradient entry are one `value`: an ignored row (0), one whose
// entries are all dropped or that has one entry (q = p = 1: 0), or one with a NaN anywhere
// (NaN, as on CPU: a NaN entry makes a sum NaN).
DISTILLM_HD bool uniform_row(bool skip, int64_t vocab, float max_z, float max_u, double sum_z, double sum_u,
                             float& value) {
  const float poison = static_cast<float>(sum_z + sum_u) * 0.0f;  // 0, or NaN
  value = skip ? 0.0f : poison;
  return skip || vocab == 1 || max_z == kNegInf || max_u == kNegInf || poison != 0.0f;
}

// log(1 + y) for finite y >= 0 and its rounded 1 + y. Below 1/128, where lg2's absolute error
// would swamp log1p(y) ~ y: y - y^2 / 2, within y^3 / 3 <= 1.6e-7, about lg2's own error where it
// hands over. Above: ln2 lg2(1 + y), within 2^-22 ln2 = 1.7e-7 (1 + y < 2) or 2 ulp (beyond),
// plus 2^-24 from rounding 1 + y. A degree-4 series up to 1/32 kept SRKL's gradient error up to
// 4x smaller, both well inside the tests' bound (benchmarks/gradient_error_margin.py), for 3 more
// instructions in each of SRKL's two log1p passes.
DISTILLM_HD float log1p_of(float y, float one_plus_y) {
  return y < kSeriesBelow ? fmaf(-0.5f * y, y, y) : kLn2 * fast_log2(one_plus_y);
}

// What pass 2 sums for one entry (all 0 on dropped entries, as in skew_kl_math.h), with f
// unnormalized (2^a_f): the row divides the sums by the sum of these f anyway.
struct Pass2Terms {
  float term;       // f log(f / m)
  float q_times_g;  // q g, less SRKL's constant (see entry_terms in skew_kl_math.h)
  float f;          // the f whose sum normalizes the row
};

DISTILLM_HD float base2(float x, float k, float shift) { return fmaf(x, k, -shift); }

// log2(s / f) from d = a_z - a_u, the logits' difference: keeps its digits where s ~ f.
template <bool kReverse>
DISTILLM_HD float log2_s_over_f(float d, const RowConstants& r) {
  const float log2_q_over_p = d + r.log2_sum_ratio;
  return kReverse ? -log2_q_over_p : log2_q_over_p;
}

// y = odds s / f = 2^(log2(odds) + log2(s / f)), clamped at 2^99. Where f's logit is -inf, the
// argument is +inf or NaN, both of which the clamp (fminf ignores NaN) turns into 2^99: f = 0
// then zeroes the entry.
template <bool kReverse>
DISTILLM_HD float skew_ratio(float d, const RowConstants& r) {
  return fast_exp2(fminf(kReverse ? r.log2_y_offset[1] - d : r.log2_y_offset[0] + d, kMaxLog2Y));
}

// log(f / m) = -log(alpha (1 + y)). Near f = s, where the loss is smallest and any log's
// absolute error (lg2's, or the rounding of -log(alpha) - log1p(y)) would swamp it, the
// polynomial in l = log2(s / f); beyond, `far`: -ln2 lg2(alpha (1 + y)) (SKL), or
// -log(alpha) - log1p(y) where log1p(y) is needed anyway (SRKL), within 2^-22 ln2 absolute or
// 2 ulp of |log(f / m)| >= 0.03 alpha (1 - alpha) there.
DISTILLM_HD float log_f_over_m(float log2_s_f, float far, const CallConstants& c) {
  float poly = c.near[kNearTerms - 1];
#pragma unroll
  for (int n = kNearTerms - 2; n >= 0; --n) poly = fmaf(poly, log2_s_f, c.near[n]);
  return fabsf(log2_s_f) < kNearOptimum ? log2_s_f * poly : far;
}

// alpha > 0. Only an s logit of -inf needs a test: y = 0 there, and the term would be
// f (-log alpha), where the loss drops the entry.
template <bool kReverse>
DISTILLM_HD Pass2Terms mixed_terms(float z, float u, const RowConstants& r, const CallConstants& c) {
  const float a_z = base2(z, r.k, r.shift_z), a_u = base2(u, r.k, r.shift_u);
  const float d = a_z - a_u;
  const float log2_s_f = log2_s_over_f<kReverse>(d, r);
  const float y = skew_ratio<kReverse>(d, r);
  const float f = fast_exp2(kReverse ? a_z : a_u);
  const float one_plus_y = 1.0f + y;
  const float ys = y * fast_rcp(one_plus_y);  // (1 - alpha) s / m
  const bool dropped = (kReverse ? u : z) == kNegInf;
  // log(f / m) is finite there (-log(alpha)): selecting f rather than the term keeps the
  // compiler from branching around its computation, which costs more than it saves.
  const float kept_f = dropped ? 0.0f : f;
  if (kReverse) {
    const float log1p_y = log1p_of(y, one_plus_y);
    const float term = kept_f * log_f_over_m(log2_s_f, c.neg_log_alpha - log1p_y, c);
    return {term, f * (dropped ? -c.neg_log_alpha : ys - log1p_y), f};
  }
  const float term = kept_f * log_f_over_m(log2_s_f, -kLn2 * fast_log2(fmaf(c.alpha, y, c.alpha)), c);
  return {term, -f * ys, f};  // SKL: q g = -f (1 - alpha) s / m
}

// alpha = 0: m = s, log(f / s) = +-ln2 (log2(q / p)). Either logit -inf drops the entry.
template <bool kReverse>
DISTILLM_HD Pass2Terms plain_terms(float z, float u, const RowConstants& r) {
  const float a_z = base2(z, r.k, r.shift_z), a_u = base2(u, r.k, r.shift_u);
  const float log_q_over_p = kLn2 * ((a_z - a_u) + r.log2_sum_ratio);
  const bool dropped = fminf(z, u) == kNegInf;
  if (kReverse) {
    const float q = fast_exp2(a_z);
    const float g = dropped ? -1.0f : log_q_over_p;
    return {dropped ? 0.0f : q * log_q_over_p, q * g, q};
  }
  const float p = fast_exp2(a_u);
  return {dropped ? 0.0f : -p * log_q_over_p, dropped ? 0.0f : -p, p};
}

template <bool kReverse, bool kMixed>
DISTILLM_HD Pass2Terms pass2_terms(float z, float u, const RowConstants& r, const CallConstants& c) {
  if (kMixed) return mixed_terms<kReverse>(z, u, r, c);
  return plain_terms<kReverse>(z, u, r);
}

// Pass 3: the gradient, times the scale folded into grad_inv_sum_*: tau dloss/dz = q (g - G),
// G = sum_qg (already divided by the f's sum).
template <bool kReverse, bool kMixed>
DISTILLM_HD float pass3_grad(float z, float u, const RowConstants& r, const CallConstants& c, float sum_qg) {
  const float a_z = base2(z, r.k, r.shift_z), a_u = base2(u, r.k, r.shift_u);
  const float q = fast_exp2(a_z) * r.grad_inv_sum_z;
  if (!kMixed) {
    const bool dropped = fminf(z, u) == kNegInf;
    if (kReverse) return q * ((dropped ? -1.0f : kLn2 * ((a_z - a_u) + r.log2_sum_ratio)) - sum_qg);
    return (dropped ? 0.0f : -fast_exp2(a_u) * r.grad_inv_sum_u) - q * sum_qg;  // FKL: q g = -p
  }
  const float y = skew_ratio<kReverse>(a_z - a_u, r);
  const float one_plus_y = 1.0f + y;
  const float inv_one_plus_y = fast_rcp(one_plus_y);
  if (kReverse) {
    // g first, then G: g ~ -y^2 / 2 keeps its digits, and g - G rounds once (subtracting G
    // from y / (1 + y) first cost the two-entry rows a second rounding at G's scale, 1.1x the
    // float64 bound).
    const float g = y * inv_one_plus_y - log1p_of(y, one_plus_y);
    return q * ((u == kNegInf ? -c.neg_log_alpha : g) - sum_qg);
  }
  // SKL: q g = -f y / (1 + y) = -odds q / (1 + y), so q (g - G) = -q (odds / (1 + y) + G).
  return -q * fmaf(c.odds, inv_one_plus_y, sum_qg);
}

// How a block splits a row among its threads, shared with the emulation. Vector steps read
// kChunk entries per thread (16-byte loads) from where every pointer of the row is 16-byte
// aligned; the `head` entries before that are read one per thread, so rows that start off a
// boundary (V = 50257 in bf16: every other row) still use vector loads. Rows whose pointers
// never align together (mixed dtypes, odd strides) take the same steps with scalar loads.
struct RowSpan {
  RowIndex head;  // entries read one per thread before the vector steps
  bool vector;   // whether the steps may use 16-byte loads and stores
};

template <typename P>
DISTILLM_HD RowIndex entries_to_alignment(const P* p) {
  return static_cast<RowIndex>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(P));
}

// `out` may be null (passes 1 and 2 write nothing per entry).
template <typename S, typename T, typename O>
DISTILLM_HD RowSpan row_span(const S* z, const T* u, const O* out, RowIndex vocab) {
  const RowIndex head = entries_to_alignment(z);
  const bool together = head == entries_to_alignment(u) && (out == nullptr || head == entries_to_alignment(out));
  if (!together || head >= vocab) return {0, false};
  return {head, true};
}

// Calls chunk(v) for the vector steps [v, v + kChunk) and entry(v) for single entries that
// thread `thread` of `threads` owns.
template <typename ChunkFn, typename EntryFn>
DISTILLM_HD void for_thread_entries(int thread, int threads, RowIndex vocab, RowSpan span, ChunkFn&& chunk,
                                    EntryFn&& entry) {
  for (RowIndex v = thread; v < span.head; v += threads) entry(v);
  const RowIndex body_end = span.head + (vocab - span.head) / kChunk * kChunk;
  for (RowIndex v = span.head + thread * kChunk; v < body_end; v += threads * kChunk) chunk(v);
  for (RowIndex v = body_end + thread; v < vocab; v += threads) entry(v);
}

}  // namespace distillm::skew_kl_impl::gpu
