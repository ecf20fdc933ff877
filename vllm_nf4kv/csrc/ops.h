// The ops' entry points, registered by ops.cpp under torch.ops.<NF4KV_OPS>.
//
// They live in a namespace named after the op namespace (a build parameter, -DNF4KV_OPS=...),
// so two builds loaded into one process share no symbol (see common.h).

#pragma once

#include <ATen/ATen.h>

#include <optional>

#ifndef NF4KV_OPS
#define NF4KV_OPS nf4kv_cpu
#endif

namespace nf4kv {
namespace NF4KV_OPS {

// store.cpp: rotate and quantize K/V into their cells (reference.write_paged's bytes). Each row
// is (group, relative_bits, ladder): format.RowFormat's scheme, the ladder ignored for bits 0.
// K and V in the model's dtype; the calibration ((k - c) * d, v - mu) optional, [KV heads, D].
void store(const at::Tensor& key, const at::Tensor& value, const at::Tensor& cache, const at::Tensor& slot_mapping,
           const at::Tensor& signs, const at::Tensor& levels, const at::Tensor& midpoints,
           const at::Tensor& scale_values, int64_t key_group, int64_t key_relative_bits, const at::Tensor& key_ladder,
           int64_t value_group, int64_t value_relative_bits, const at::Tensor& value_ladder, int64_t key_search_steps,
           int64_t value_search_steps, const std::optional<at::Tensor>& key_offset,
           const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& value_offset);

// attention.cpp: paged attention over NF4 pages, queries rotated in and outputs back, written
// into out in its dtype. The calibration (q * (1 / d) in, + mu out) optional, [query heads, D].
void attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
               const at::Tensor& signs, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
               const at::Tensor& levels, const at::Tensor& scale_values, double scale, bool causal,
               int64_t sliding_window, int64_t key_group, int64_t key_relative_bits, const at::Tensor& key_ladder,
               int64_t value_group, int64_t value_relative_bits, const at::Tensor& value_ladder,
               const at::Tensor& out, const std::optional<at::Tensor>& query_scale,
               const std::optional<at::Tensor>& output_offset);

}  // namespace NF4KV_OPS
}  // namespace nf4kv
