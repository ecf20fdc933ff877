// The store op: rotate each token's K and V head vectors and quantize them into their cells,
// byte for byte what reference.write_paged writes (the codec is codec.h, the rotation
// rotation.h). Tokens with a negative slot (vLLM's padding) are skipped. K and V arrive as the
// model made them, the layer's calibration applied here (head_rows.h).

#include <ATen/Parallel.h>

#include "codec.h"
#include "common.h"
#include "head_rows.h"
#include "ops.h"
#include "rotation.h"

namespace nf4kv {
namespace NF4KV_OPS {

void store(const at::Tensor& key, const at::Tensor& value, const at::Tensor& cache, const at::Tensor& slot_mapping,
           const at::Tensor& signs, const at::Tensor& levels, const at::Tensor& midpoints,
           const at::Tensor& scale_values, int64_t key_group, int64_t key_relative_bits, const at::Tensor& key_ladder,
           int64_t value_group, int64_t value_relative_bits, const at::Tensor& value_ladder, int64_t key_search_steps,
           int64_t value_search_steps, const std::optional<at::Tensor>& key_offset,
           const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& value_offset) {
  const HeadRows keys(key, "key"), values(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes(), "key ", key.sizes(), " and value ", value.sizes(), " differ in shape");
  TORCH_CHECK(slot_mapping.dtype() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.dim() == 1,
              "slot_mapping must be a contiguous int64 [num_tokens], got ", slot_mapping.dtype(), " ",
              slot_mapping.sizes());
  TORCH_CHECK(key_search_steps >= 1 && value_search_steps >= 1, "search steps must be >= 1, got K ",
              key_search_steps, " and V ", value_search_steps);
  const int64_t num_tokens = std::min(key.size(0), slot_mapping.size(0));
  const int64_t num_heads = key.size(1), head_dim = key.size(2);
  const CellGeometry cell =
      cell_geometry(row_geometry(head_dim, key_group, key_relative_bits, key_ladder),
                    row_geometry(head_dim, value_group, value_relative_bits, value_ladder));
  check_cache(cache, cell.cell_bytes);
  TORCH_CHECK(cache.size(1) == num_heads, "cache has ", cache.size(1), " KV heads, key has ", num_heads);
  const int64_t num_blocks = cache.size(0), block_size = cache.size(2);
  const Tables t = tables_of(levels, &midpoints, scale_values);
  const Rotation rotation(signs_of(signs, head_dim), head_dim);
  const HeadTable k_offset(key_offset, num_heads, head_dim, "key_offset");
  const HeadTable k_scale(key_scale, num_heads, head_dim, "key_scale");
  const HeadTable v_offset(value_offset, num_heads, head_dim, "value_offset");
  const HeadTable none;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  uint8_t* base = cache.data_ptr<uint8_t>();
  for (int64_t i = 0; i < num_tokens; ++i)
    TORCH_CHECK(slots[i] < num_blocks * block_size, "slot ", slots[i], " is outside the cache");
  const int key_steps = static_cast<int>(key_search_steps), value_steps = static_cast<int>(value_search_steps);
  at::parallel_for(0, num_tokens * num_heads, 16, [&](int64_t begin, int64_t end) {
    const SearchConstants constants(t);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_heads, head = item % num_heads;
      const int64_t slot = slots[token];
      if (slot < 0) continue;  // padding tokens
      uint8_t* out = base + (((slot / block_size) * num_heads + head) * block_size + slot % block_size) * cell.cell_bytes;
      float row[CPU_MAX_HEAD_DIM], rotated[CPU_MAX_HEAD_DIM];
      keys.read(token, head, head_dim, row);
      shift_and_scale(row, head_dim, k_offset, k_scale, head);
      rotation.forward(row, rotated);
      quantize_row(rotated, cell.key, key_steps, t, constants, out);
      values.read(token, head, head_dim, row);
      shift_and_scale(row, head_dim, v_offset, none, head);
      rotation.forward(row, rotated);
      quantize_row(rotated, cell.value, value_steps, t, constants, out + cell.value_offset);
    }
  });
}

}  // namespace NF4KV_OPS
}  // namespace nf4kv
