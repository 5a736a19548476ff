// The row layout of a (..., V) tensor for the row kernels: its leading dimensions folded into
// as few (size, stride) pairs as its strides allow, so that sliced logits are read in place.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "skew_kl/skew_kl_math.h"

namespace distillm {

using skew_kl_impl::kMaxLeadingDims;
using skew_kl_impl::RowLayout;

// Folds the leading dimensions into as few (size, stride) pairs as the strides allow, so a
// contiguous tensor is one dimension and `logits[:, :-1]` is two. Empty when more remain.
inline std::optional<RowLayout> leading_layout(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == size * stride) {
      dims.back() = {dims.back().first * size, stride};
    } else {
      dims.emplace_back(size, stride);
    }
  }
  if (dims.empty()) dims.emplace_back(1, 0);
  if (dims.size() > static_cast<size_t>(kMaxLeadingDims)) return std::nullopt;
  RowLayout layout{};
  layout.num_dims = static_cast<int>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    layout.sizes[i] = dims[i].first;
    layout.strides[i] = dims[i].second;
  }
  return layout;
}

inline at::Tensor with_row_layout(const at::Tensor& t, RowLayout& layout) {
  if (auto found = leading_layout(t)) {
    layout = *found;
    return t;
  }
  at::Tensor copy = t.contiguous();  // more than kMaxLeadingDims strided dims: rare
  layout = *leading_layout(copy);
  return copy;
}

}  // namespace distillm
