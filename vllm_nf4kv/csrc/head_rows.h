// Head vectors in and out of the ops as vLLM hands them: [tokens, heads, head_dim] views in the
// model's dtype (fp32, bf16, fp16; fp64 from tests), any token and head strides, each head
// vector contiguous; and the layer's calibration applied on the way (kv_transform.py).
//
// Why here and not in Python: per layer and step the conversions, the calibration's
// elementwise ops, the fp32 output tensor and its copy into vLLM's output cost more than the
// attention of a short decode. The arithmetic is the one KVTransform does (fp32, one rounding
// an operation, nothing fused: -ffp-contract=off), so the bytes stored and the outputs are
// those of the PyTorch transform followed by the fp32 op, bit for bit (tested).

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common.h"

namespace nf4kv {
namespace {

inline bool is_head_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

// A [tokens, heads, head_dim] tensor's head vectors, read as fp32 (exact from bf16 and fp16;
// round to nearest even from fp64, as Tensor.float() does).
class HeadRows {
 public:
  HeadRows() = default;
  HeadRows(const at::Tensor& rows, const char* name) {
    TORCH_CHECK(rows.dim() == 3 && is_head_dtype(rows.scalar_type()) && rows.stride(2) == 1, name,
                " must be [num_tokens, num_heads, head_dim] fp32, bf16, fp16 or fp64 with contiguous head "
                "vectors, got ", rows.scalar_type(), " ", rows.sizes(), " strides ", rows.strides());
    data_ = static_cast<char*>(rows.data_ptr());
    dtype_ = rows.scalar_type();
    element_bytes_ = rows.element_size();
    token_stride_ = rows.stride(0);
    head_stride_ = rows.stride(1);
  }

  void read(int64_t token, int64_t head, int64_t head_dim, float* out) const {
    const char* row = address(token, head);
    switch (dtype_) {
      case at::kFloat: convert(reinterpret_cast<const float*>(row), head_dim, out); break;
      case at::kBFloat16: convert(reinterpret_cast<const c10::BFloat16*>(row), head_dim, out); break;
      case at::kHalf: convert(reinterpret_cast<const c10::Half*>(row), head_dim, out); break;
      default: convert(reinterpret_cast<const double*>(row), head_dim, out); break;
    }
  }

  // Writes fp32 values in this tensor's dtype (round to nearest even, as Tensor.copy_ does).
  void write(int64_t token, int64_t head, int64_t head_dim, const float* values) const {
    char* row = address(token, head);
    switch (dtype_) {
      case at::kFloat: convert(values, head_dim, reinterpret_cast<float*>(row)); break;
      case at::kBFloat16: convert(values, head_dim, reinterpret_cast<c10::BFloat16*>(row)); break;
      case at::kHalf: convert(values, head_dim, reinterpret_cast<c10::Half*>(row)); break;
      default: convert(values, head_dim, reinterpret_cast<double*>(row)); break;
    }
  }

 private:
  char* address(int64_t token, int64_t head) const {
    return data_ + (token * token_stride_ + head * head_stride_) * element_bytes_;
  }

  template <class From, class To>
  static void convert(const From* from, int64_t n, To* to) {
    for (int64_t i = 0; i < n; ++i) to[i] = static_cast<To>(static_cast<float>(from[i]));
  }

  char* data_ = nullptr;
  at::ScalarType dtype_ = at::kFloat;
  int64_t element_bytes_ = 4, token_stride_ = 0, head_stride_ = 0;
};

// A per-head calibration table [heads, head_dim] (kv_transform.KVTransform), or none.
class HeadTable {
 public:
  HeadTable() = default;
  HeadTable(const std::optional<at::Tensor>& table, int64_t heads, int64_t head_dim, const char* name) {
    if (!table.has_value()) return;
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) == heads && table->size(1) == head_dim,
                name, " must be a contiguous fp32 [", heads, ", ", head_dim, "], got ", table->scalar_type(), " ",
                table->sizes());
    data_ = table->data_ptr<float>();
    head_dim_ = head_dim;
  }

  explicit operator bool() const { return data_ != nullptr; }
  const float* row(int64_t head) const { return data_ + head * head_dim_; }

 private:
  const float* data_ = nullptr;
  int64_t head_dim_ = 0;
};

// x = (x - offset) * scale, each step skipped without its table: KVTransform.keys / values /
// queries (a query's scale is 1 / d, no offset).
inline void shift_and_scale(float* x, int64_t head_dim, const HeadTable& offset, const HeadTable& scale,
                            int64_t head) {
  if (offset) {
    const float* c = offset.row(head);
    for (int64_t i = 0; i < head_dim; ++i) x[i] = x[i] - c[i];
  }
  if (scale) {
    const float* d = scale.row(head);
    for (int64_t i = 0; i < head_dim; ++i) x[i] = x[i] * d[i];
  }
}

// x = x + offset: KVTransform.outputs (attention over v - mu, back to v).
inline void add_offset(float* x, int64_t head_dim, const HeadTable& offset, int64_t head) {
  if (!offset) return;
  const float* mu = offset.row(head);
  for (int64_t i = 0; i < head_dim; ++i) x[i] = x[i] + mu[i];
}

}  // namespace
}  // namespace nf4kv
