// What every file of the NF4 CPU kernels shares: the ISA switch, the format's numbers, the
// geometry of a cache row and cell, and the checks of the tables the ops are handed.
//
// The format's numbers (NUM_LEVELS, SCALE_MAX, CPU_MAX_HEAD_DIM, ...) come from nf4kv_format.h,
// which vllm_nf4kv/cpu_kernels.py renders from vllm_nf4kv/format.py and kernel_limits.py into
// the build directory: nothing in csrc/ retypes them.
//
// Everything in these headers has internal linkage (an anonymous namespace). Two builds are
// loaded into one process (native and portable in the tests, this revision and another in
// the benchmark); a shared inline symbol could make one build call into the other's ISA.

#pragma once

#include <ATen/ATen.h>

// The vector path needs AVX-512 F, BW and VL (every AVX-512 CPU since Skylake-SP).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NF4KV_AVX512 1
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>

#include "nf4kv_format.h"

namespace nf4kv {
namespace {

constexpr int kLanes = 16;                          // one AVX-512 register of fp32
constexpr int kNumScaleCodes = SCALE_CODE_MAX + 1;  // entries of the scale_values table

#if defined(NF4KV_AVX512)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

static_assert(NUM_MIDPOINTS == NUM_LEVELS - 1, "one decision threshold between each two neighbouring levels");
static_assert(CODE_BITS == 4 && CODE_MASK == (1 << CODE_BITS) - 1,
              "two codes a byte: the codecs split bytes into a high and a low nibble");
static_assert(SCALE_CODE_MAX == 0xFF, "a scale code is one byte, read and written as uint8");
static_assert(SCALE_DROPPED_BITS == FP32_MANTISSA_BITS - SCALE_MANTISSA_BITS,
              "a scale code keeps the top SCALE_MANTISSA_BITS of the fp32 mantissa");
static_assert(CPU_MAX_HEAD_DIM % kLanes == 0, "head vectors are whole registers");

// The fp32 tables the ops are handed (reference.nf4_levels, nf4_midpoints, decode_scale).
struct Tables {
  const float* levels;        // [NUM_LEVELS]
  const float* midpoints;     // [NUM_MIDPOINTS]; the store needs them, attention does not (nullptr)
  const float* scale_values;  // [kNumScaleCodes], code 0 -> 0.0
};

// Where the bytes of one K or V row are (format.RowFormat): the codes start the row, the
// scale codes follow them, one a group. Computed once per op by row_geometry().
struct RowGeometry {
  int64_t head_dim, group, num_groups;
  int64_t code_bytes;    // RowFormat.code_bytes
  int64_t scale_offset;  // RowFormat.scale_offset
  int64_t row_bytes;     // RowFormat.row_bytes
};

inline RowGeometry row_geometry(int64_t head_dim, int64_t group) {
  TORCH_CHECK(head_dim > 0 && head_dim <= CPU_MAX_HEAD_DIM && head_dim * CODE_BITS % 8 == 0,
              "head_dim must be a whole number of code bytes in [1, ", CPU_MAX_HEAD_DIM, "], got ", head_dim);
  TORCH_CHECK(group >= 2 && group % 2 == 0 && head_dim % group == 0,
              "scale group size must be even and divide head_dim ", head_dim, ", got ", group);
  const int64_t code_bytes = head_dim * CODE_BITS / 8;
  const int64_t num_groups = head_dim / group;
  return {head_dim, group, num_groups, code_bytes, code_bytes, code_bytes + num_groups};
}

// One (token, KV head) cell: the K row, then the V row (format.CellLayout).
struct CellGeometry {
  RowGeometry key, value;
  int64_t value_offset, cell_bytes;
};

inline CellGeometry cell_geometry(int64_t head_dim, int64_t key_group, int64_t value_group) {
  const RowGeometry key = row_geometry(head_dim, key_group), value = row_geometry(head_dim, value_group);
  return {key, value, key.row_bytes, key.row_bytes + value.row_bytes};
}

// reference.sanitize: NaN -> 0, +-inf -> +-SCALE_MAX.
inline float sanitize(float x) {
  if (std::isnan(x)) return 0.0f;
  if (std::isinf(x)) return x > 0 ? SCALE_MAX : -SCALE_MAX;
  return x;
}

#if defined(NF4KV_AVX512)
inline __m256 sanitize(__m256 x) {
  const __m256 magnitude = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const __mmask8 infinite = _mm256_cmp_ps_mask(magnitude, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  const __m256 clamped = _mm256_or_ps(_mm256_xor_ps(x, magnitude), _mm256_set1_ps(SCALE_MAX));
  x = _mm256_mask_mov_ps(x, infinite, clamped);
  return _mm256_mask_mov_ps(x, _mm256_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm256_setzero_ps());
}
#endif

// ---- the tensors the ops are handed

inline const double* signs_of(const at::Tensor& signs, int64_t head_dim) {
  TORCH_CHECK(signs.dtype() == at::kDouble && signs.is_contiguous() && signs.numel() == head_dim,
              "signs must be fp64 [", head_dim, "]");
  return signs.data_ptr<double>();
}

inline const float* table_of(const at::Tensor& table, int64_t size, const char* name) {
  TORCH_CHECK(table.dtype() == at::kFloat && table.numel() == size && table.is_contiguous(), name,
              " must be a contiguous fp32 table of ", size);
  return table.data_ptr<float>();
}

// midpoints: the store needs them, attention does not (nullptr there).
inline Tables tables_of(const at::Tensor& levels, const at::Tensor* midpoints, const at::Tensor& scale_values) {
  return {table_of(levels, NUM_LEVELS, "levels"),
          midpoints != nullptr ? table_of(*midpoints, NUM_MIDPOINTS, "midpoints") : nullptr,
          table_of(scale_values, kNumScaleCodes, "scale_values")};
}

inline void check_cache(const at::Tensor& cache, int64_t cell_bytes) {
  TORCH_CHECK(cache.dtype() == at::kByte && cache.dim() == 4 && cache.size(3) == cell_bytes &&
                  cache.is_contiguous(),
              "nf4 cache must be contiguous uint8 [num_blocks, num_kv_heads, block_size, ", cell_bytes, "]");
}

}  // namespace
}  // namespace nf4kv
