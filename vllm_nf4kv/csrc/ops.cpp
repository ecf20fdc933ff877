// The op registrations: torch.ops.<NF4KV_OPS>.store / attention (vllm_nf4kv/cpu_kernels.py
// wraps them), and three ops that say what this build is: has_avx512, format_constants and
// row_geometry (the tests check the last two against vllm_nf4kv/format.py).
//
// The op namespace is a build parameter so that a second build (the portable path, in the
// tests; another revision, in the benchmark) can be loaded beside the first.

#include <torch/library.h>

#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

namespace nf4kv {
namespace {

// Every constant of the generated nf4kv_format.h by name, as this build compiled it.
c10::Dict<std::string, double> format_constants() {
  c10::Dict<std::string, double> constants;
#define NF4KV_CONSTANT(name) constants.insert(#name, static_cast<double>(name));
  NF4KV_FORMAT_CONSTANTS(NF4KV_CONSTANT)
#undef NF4KV_CONSTANT
  return constants;
}

// [code_bytes, scale_offset, scale_bytes, row_bytes] of a row, as the kernels compute them.
std::vector<int64_t> row_geometry_of(int64_t head_dim, int64_t group, int64_t relative_bits) {
  const RowGeometry row = row_geometry(head_dim, group, relative_bits, nullptr);
  return {row.code_bytes, row.scale_offset, row.scale_bytes, row.row_bytes};
}

}  // namespace
}  // namespace nf4kv

#define NF4KV_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define NF4KV_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

NF4KV_LIBRARY(NF4KV_OPS, m) {
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor signs, Tensor levels, "
      "Tensor midpoints, Tensor scale_values, int key_group, int key_relative_bits, Tensor key_ladder, "
      "int value_group, int value_relative_bits, Tensor value_ladder, int key_search_steps, "
      "int value_search_steps, Tensor? key_offset=None, Tensor? key_scale=None, Tensor? value_offset=None) -> ()");
  m.def(
      "attention(Tensor query, Tensor cache, Tensor block_table, Tensor signs, Tensor seq_lens, "
      "Tensor query_start_loc, "
      "Tensor levels, Tensor scale_values, float scale, bool causal, int sliding_window, int key_group, "
      "int key_relative_bits, Tensor key_ladder, int value_group, int value_relative_bits, Tensor value_ladder, "
      "Tensor(a!) out, Tensor? query_scale=None, Tensor? output_offset=None) -> ()");
  m.def("has_avx512() -> bool", +[]() { return nf4kv::kAvx512; });
  m.def("format_constants() -> Dict(str, float)", &nf4kv::format_constants);
  m.def("row_geometry(int head_dim, int group, int relative_bits) -> int[]", &nf4kv::row_geometry_of);
}

NF4KV_LIBRARY_IMPL(NF4KV_OPS, CPU, m) {
  m.impl("store", &nf4kv::NF4KV_OPS::store);
  m.impl("attention", &nf4kv::NF4KV_OPS::attention);
}
