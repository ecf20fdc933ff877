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
constexpr int kCodesPerDword = 32 / CODE_BITS;

// Where code e of a little-endian dword of a row's code bytes sits: byte e / 2, the even
// element in the high nibble (the decoders read codes this way, the store packs them).
constexpr int nibble_shift(int e) { return 8 * (e / 2) + (e % 2 == 0 ? CODE_BITS : 0); }

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
// scale bytes follow them. Scale scheme (format.ScaleScheme): relative_bits == 0 is one ue5m3
// code a group; relative_bits == B is TWO_LEVEL, one ue5m3 row code and then a B-bit code per
// group, packed LSB first, whose scale is row scale * ladder[code]. Computed once per op.
struct RowGeometry {
  int64_t head_dim, group, num_groups;
  int64_t code_bytes;     // RowFormat.code_bytes
  int64_t scale_offset;   // RowFormat.scale_offset
  int64_t scale_bytes;    // RowFormat.scale_bytes
  int64_t row_bytes;      // RowFormat.row_bytes
  int64_t relative_bits;  // RowFormat.relative_bits (0: UE5M3_PER_GROUP)
  const float* ladder;    // TWO_LEVEL: [1 << relative_bits] format.relative_ladder; else nullptr
};

// The geometry of a row (ladder may be nullptr where only the byte counts are wanted).
inline RowGeometry row_geometry(int64_t head_dim, int64_t group, int64_t relative_bits, const float* ladder) {
  TORCH_CHECK(head_dim > 0 && head_dim <= CPU_MAX_HEAD_DIM && head_dim * CODE_BITS % 8 == 0,
              "head_dim must be a whole number of code bytes in [1, ", CPU_MAX_HEAD_DIM, "], got ", head_dim);
  TORCH_CHECK(group >= 2 && group % 2 == 0 && head_dim % group == 0,
              "scale group size must be even and divide head_dim ", head_dim, ", got ", group);
  TORCH_CHECK(relative_bits >= 0 && relative_bits <= MAX_RELATIVE_BITS, "relative_bits must be in [0, ",
              MAX_RELATIVE_BITS, "], got ", relative_bits);
  const int64_t code_bytes = head_dim * CODE_BITS / 8;
  const int64_t num_groups = head_dim / group;
  TORCH_CHECK(num_groups <= CPU_MAX_SCALE_GROUPS, "at most ", CPU_MAX_SCALE_GROUPS,
              " scale groups per head vector, got ", num_groups);
  const int64_t scale_bytes = relative_bits == 0 ? num_groups : 1 + (num_groups * relative_bits + 7) / 8;
  return {head_dim, group, num_groups, code_bytes, code_bytes, scale_bytes, code_bytes + scale_bytes,
          relative_bits, ladder};
}

// One (token, KV head) cell: the K row, then the V row (format.CellLayout).
struct CellGeometry {
  RowGeometry key, value;
  int64_t value_offset, cell_bytes;
};

inline CellGeometry cell_geometry(const RowGeometry& key, const RowGeometry& value) {
  TORCH_CHECK(key.head_dim == value.head_dim, "K and V rows differ in head_dim: ", key.head_dim, " vs ",
              value.head_dim);
  return {key, value, key.row_bytes, key.row_bytes + value.row_bytes};
}

// Relative code j of a TWO_LEVEL row (packed: bits B*j .. B*j + B - 1, LSB first, of the
// bytes after the row code). Reads the second byte only when the code reaches into it.
inline int32_t relative_code(const uint8_t* packed, int64_t j, int64_t bits) {
  const int64_t bit = bits * j, byte = bit >> 3, shift = bit & 7;
  int32_t v = packed[byte] >> shift;
  if (shift + bits > 8) v |= static_cast<int32_t>(packed[byte + 1]) << (8 - shift);
  return v & ((1 << bits) - 1);
}

// fp32 scale of every group of a stored row (reference.group_scales).
inline void group_scales(const uint8_t* row_bytes, const RowGeometry& row, const float* scale_values, float* out) {
  const uint8_t* scale = row_bytes + row.scale_offset;
  if (row.relative_bits == 0) {
    for (int64_t g = 0; g < row.num_groups; ++g) out[g] = scale_values[scale[g]];
    return;
  }
  const float row_scale = scale_values[scale[0]];
  for (int64_t g = 0; g < row.num_groups; ++g) out[g] = row_scale * row.ladder[relative_code(scale + 1, g, row.relative_bits)];
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

// The ladder of a row with relative_bits B (nullptr for B == 0, whatever is passed).
inline const float* ladder_of(const at::Tensor& ladder, int64_t relative_bits) {
  if (relative_bits == 0) return nullptr;
  TORCH_CHECK(relative_bits > 0 && relative_bits <= MAX_RELATIVE_BITS, "relative_bits must be in [0, ",
              MAX_RELATIVE_BITS, "], got ", relative_bits);
  return table_of(ladder, int64_t{1} << relative_bits, "ladder");
}

// A row as the ops are handed it: (group, relative_bits, ladder tensor), checked.
inline RowGeometry row_geometry(int64_t head_dim, int64_t group, int64_t relative_bits, const at::Tensor& ladder) {
  return row_geometry(head_dim, group, relative_bits, ladder_of(ladder, relative_bits));
}

inline void check_cache(const at::Tensor& cache, int64_t cell_bytes) {
  TORCH_CHECK(cache.dtype() == at::kByte && cache.dim() == 4 && cache.size(3) == cell_bytes &&
                  cache.is_contiguous(),
              "nf4 cache must be contiguous uint8 [num_blocks, num_kv_heads, block_size, ", cell_bytes, "]");
}

}  // namespace
}  // namespace nf4kv
