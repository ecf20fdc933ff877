// Reading a paged NF4 cache back to fp32: level * scale, exactly the values the reference
// decodes (reference.decode_rows_rotated). Keys are gathered by tiles of 16 tokens, values
// row by row, a chunk of tokens at a time into scratch that stays in L1.
//
// One decoder per ISA and job; KeyDecoder and ValueDecoder name the ones this build uses:
//   AVX-512   KeyTileDecoder (transposed tiles [tile][d][16 tokens]), RowDecoder
//   portable  PortableKeyDecoder (row-major [token][d]), PortableRowDecoder

#pragma once

#include <algorithm>

#include "common.h"

namespace nf4kv {
namespace {

// The paged cache an attention call reads (its cells as CellGeometry says).
struct CacheGeometry {
  CellGeometry cell;
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
};

// Walks the cells of one KV head in token order (no division per token).
class CellCursor {
 public:
  CellCursor(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t pos, const CacheGeometry& g)
      : cache_(cache), blocks_(blocks), kv_head_(kv_head), num_kv_heads_(g.num_kv_heads),
        block_size_(g.block_size), cell_bytes_(g.cell.cell_bytes), block_(pos / g.block_size),
        offset_(pos % g.block_size) {}

  const uint8_t* next() {
    if (offset_ == block_size_) {
      offset_ = 0;
      ++block_;
    }
    return cache_ + ((blocks_[block_] * num_kv_heads_ + kv_head_) * block_size_ + offset_++) * cell_bytes_;
  }

 private:
  const uint8_t* cache_;
  const int32_t* blocks_;
  int64_t kv_head_, num_kv_heads_, block_size_, cell_bytes_;  // copies: see RowDecoder::decode
  int64_t block_, offset_;
};

// Where the cell of position pos of one KV head is, and how many cells from it on are
// contiguous (the rest of its block).
struct CellRun {
  const uint8_t* first;
  int64_t length;
};

inline CellRun cell_run(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t pos,
                        const CacheGeometry& g) {
  const int64_t block = pos / g.block_size, offset = pos % g.block_size;
  return {cache + ((blocks[block] * g.num_kv_heads + kv_head) * g.block_size + offset) * g.cell.cell_bytes,
          g.block_size - offset};
}

// ---- portable: plain table lookups

// One row's codes -> level * scale, row-major.
struct PortableRowDecoder {
  const float* levels;
  const float* scale_values;
  RowGeometry row;

  PortableRowDecoder(const Tables& t, const RowGeometry& row_)
      : levels(t.levels), scale_values(t.scale_values), row(row_) {}

  void decode(const uint8_t* codes, float* out) const {
    float scales[CPU_MAX_SCALE_GROUPS];
    group_scales(codes, row, scale_values, scales);
    for (int64_t i = 0; i < row.code_bytes; ++i) {
      const float s = scales[(2 * i) / row.group];
      out[2 * i] = levels[codes[i] >> CODE_BITS] * s;
      out[2 * i + 1] = levels[codes[i] & CODE_MASK] * s;
    }
  }
};

// The keys of up to 16 tokens, row-major [token][d] (the portable scores read rows).
struct PortableKeyDecoder {
  PortableRowDecoder rows;

  PortableKeyDecoder(const Tables& t, const RowGeometry& row) : rows(t, row) {}

  void decode(const uint8_t* const* cells, int64_t n, float* out) const {
    for (int64_t k = 0; k < n; ++k) rows.decode(cells[k], out + k * rows.row.head_dim);
  }
};

#if defined(NF4KV_AVX512)
static_assert(NUM_LEVELS == kLanes, "a register holds the 16 levels: vpermps looks a code up by its low 4 bits");
static_assert(CPU_MAX_SCALE_GROUPS <= kLanes, "a register holds a row's scales");

constexpr int kBytesPerChunk = kLanes * CODE_BITS / 8;  // code bytes of 16 values

// ue5m3 codes (one per lane) -> fp32 scales from their bits, as reference.decode_scale builds
// them (code 0 -> 0.0). Computed in registers: a table lookup per code would stall on store
// forwarding.
inline __m512 decode_scales(__m512i code) {
  const __m512i exponent = _mm512_add_epi32(_mm512_srli_epi32(code, SCALE_MANTISSA_BITS),
                                            _mm512_set1_epi32(FP32_EXP_BIAS - SCALE_EXP_BIAS));
  const __m512i mantissa = _mm512_and_si512(code, _mm512_set1_epi32(SCALE_MANTISSA_MASK));
  const __m512i bits = _mm512_or_si512(_mm512_slli_epi32(exponent, FP32_MANTISSA_BITS),
                                       _mm512_slli_epi32(mantissa, SCALE_DROPPED_BITS));
  return _mm512_maskz_mov_ps(_mm512_test_epi32_mask(code, code), _mm512_castsi512_ps(bits));
}

// One head vector's codes -> level * scale, row-major (values; keys go through KeyTileDecoder).
// With groups of a multiple of 16 each group gets its own 16-entry table of level * scale (the
// same fp32 products), and 16 values cost one byte expansion, one shift and one lookup (vpermps
// reads only an index's low 4 bits); other group sizes look up levels and scales per element.
struct RowDecoder {
  __m512 levels;
  __m512i interleave;          // (high nibble i, low nibble i) pairs: 0, 16, 1, 17, ...
  __m512i group_of[CPU_MAX_HEAD_DIM / kLanes];
  RowGeometry row;
  const float* scale_values;  // TWO_LEVEL rows: their scales come from group_scales
  __mmask16 group_mask;

  RowDecoder(const Tables& t, const RowGeometry& row_)
      : row(row_), scale_values(t.scale_values), group_mask(static_cast<__mmask16>((1u << row_.num_groups) - 1)) {
    levels = _mm512_loadu_ps(t.levels);
    alignas(64) int32_t idx[kLanes];
    for (int l = 0; l < kLanes; ++l) idx[l] = (l / 2) + (l % 2) * kLanes;
    interleave = _mm512_load_si512(idx);
    for (int64_t c = 0; c < row.head_dim / kLanes; ++c) {
      for (int l = 0; l < kLanes; ++l) idx[l] = static_cast<int32_t>((c * kLanes + l) / row.group);
      group_of[c] = _mm512_load_si512(idx);
    }
  }

  // The fields are copied into locals first: _mm512_storeu_ps stores may alias anything, so
  // the compiler would otherwise reload every field after each store.
  void decode(const uint8_t* codes, float* out) const {
    const RowGeometry g = row;
    const __m512 level_table = levels;
    __m512 row_scales;
    if (g.relative_bits == 0) {
      row_scales = decode_scales(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(group_mask, codes + g.scale_offset)));
    } else {
      alignas(64) float scales[kLanes];
      group_scales(codes, g, scale_values, scales);
      row_scales = _mm512_maskz_loadu_ps(group_mask, scales);
    }
    if (g.group % kLanes == 0) {
      const int64_t chunks = g.group / kLanes;
      // the even lanes take the high nibbles (a constant: from memory, it cost a load per row)
      const __m512i high_nibble_shift = _mm512_maskz_set1_epi32(0x5555, CODE_BITS);
      for (int64_t gi = 0; gi < g.num_groups; ++gi) {
        const __m512 table =
            _mm512_mul_ps(level_table, _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(gi)), row_scales));
        for (int64_t c = gi * chunks; c < (gi + 1) * chunks; ++c) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + kBytesPerChunk * c));
          const __m512i index =
              _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), high_nibble_shift);
          _mm512_storeu_ps(out + c * kLanes, _mm512_permutexvar_ps(index, table));
        }
      }
      return;
    }
    const __m512i low_mask = _mm512_set1_epi32(CODE_MASK), pairs = interleave;
    for (int64_t c = 0; c < g.head_dim / kLanes; ++c) {
      const __m512i bytes =
          _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + kBytesPerChunk * c)));
      const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, CODE_BITS), level_table);
      const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), level_table);
      const __m512 values = _mm512_permutex2var_ps(high, pairs, low);
      _mm512_storeu_ps(out + c * kLanes, _mm512_mul_ps(values, _mm512_permutexvar_ps(group_of[c], row_scales)));
    }
  }
};

// In place: r[i] lane j <- r[j] lane i.
inline void transpose_16x16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane k: column 4k + j of rows 4i .. 4i + 3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int j = 0; j < 4; ++j) {  // a 4x4 transpose of 128-bit lanes
    const __m512 ab_lo = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), ab_hi = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 cd_hi = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
}

// dwords of the longest row: its codes, then its scale bytes (a TWO_LEVEL row: one more)
constexpr int kMaxKeyColumns = (CPU_MAX_HEAD_DIM * CODE_BITS / 8 + CPU_MAX_SCALE_GROUPS + 1 + 3) / 4;

// One key tile before its levels are looked up: the 16 cells' dwords transposed
// ([column][token]: dword w of a row holds the codes of dims 8w .. 8w + 7) and each group's
// 16 scales.
struct KeyTileCodes {
  alignas(64) int32_t words[kMaxKeyColumns * kLanes];
  __m512 scales[CPU_MAX_SCALE_GROUPS];
};

// The keys of 16 tokens straight into a transposed tile [d][16 tokens]. The cells' code and
// scale-code bytes are loaded as rows of dwords and transposed as dwords (a dword holds 8
// codes, so this moves 1/8 of what transposing decoded fp32 would); then each dimension of the
// 16 tokens is one shift, one level lookup (vpermps reads only the index's low 4 bits) and one
// multiply by its group's 16 scales: the same fp32 products as the reference. load() and key()
// are the two halves, for decode steps that score the keys as they are decoded
// (decode_step.h); decode() writes the whole tile.
struct KeyTileDecoder {
  __m512 levels;
  __m512 ladder_low, ladder_high;  // TWO_LEVEL with <= 5 relative bits: the ladder in two registers
  RowGeometry row;
  int64_t columns;  // dwords this row spans

  KeyTileDecoder(const Tables& t, const RowGeometry& row_)
      : levels(_mm512_loadu_ps(t.levels)), ladder_low(_mm512_setzero_ps()), ladder_high(_mm512_setzero_ps()),
        row(row_), columns((row_.row_bytes + 3) / 4) {
    if (row.relative_bits > 0 && row.relative_bits <= 5) {
      const int64_t entries = int64_t{1} << row.relative_bits;
      ladder_low = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << std::min<int64_t>(entries, kLanes)) - 1),
                                         row.ladder);
      if (entries > kLanes) ladder_high = _mm512_loadu_ps(row.ladder + kLanes);
    }
  }

  // cells[k] for k < n; tokens n..15 of the tile decode as zeros.
  void load(const uint8_t* const* cells, int64_t n, KeyTileCodes& tile) const {
    const RowGeometry row = this->row;  // locals: see RowDecoder::decode
    const int64_t columns = this->columns;
    int32_t* words = tile.words;
    for (int64_t c0 = 0; c0 < columns; c0 += kLanes) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, columns - c0)) - 1);
      __m512 r[kLanes];
      for (int64_t k = 0; k < kLanes; ++k)
        r[k] = k < n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, cells[k] + 4 * c0)) : _mm512_setzero_ps();
      transpose_16x16(r);
      for (int64_t j = 0; j < std::min<int64_t>(kLanes, columns - c0); ++j)
        _mm512_store_ps(reinterpret_cast<float*>(words + (c0 + j) * kLanes), r[j]);
    }
    // byte b of each token's row, one token a lane
    const auto byte_lanes = [words](int64_t b) {
      const __m512i word = _mm512_load_si512(words + b / 4 * kLanes);
      return _mm512_and_si512(_mm512_srli_epi32(word, 8 * (b % 4)), _mm512_set1_epi32(0xFF));
    };
    if (row.relative_bits == 0) {
      for (int64_t gi = 0; gi < row.num_groups; ++gi) tile.scales[gi] = decode_scales(byte_lanes(row.scale_offset + gi));
      return;
    }
    // TWO_LEVEL: row scale * ladder[relative code], as group_scales computes them
    const int64_t bits = row.relative_bits;
    const __m512 row_scale = decode_scales(byte_lanes(row.scale_offset));
    for (int64_t gi = 0; gi < row.num_groups; ++gi) {
      const int64_t bit = bits * gi, byte = row.scale_offset + 1 + (bit >> 3), shift = bit & 7;
      __m512i code = _mm512_srli_epi32(byte_lanes(byte), static_cast<unsigned>(shift));
      if (shift + bits > 8)
        code = _mm512_or_si512(code, _mm512_slli_epi32(byte_lanes(byte + 1), static_cast<unsigned>(8 - shift)));
      code = _mm512_and_si512(code, _mm512_set1_epi32((1 << bits) - 1));
      const __m512 relative = bits <= 5 ? _mm512_permutex2var_ps(ladder_low, code, ladder_high)
                                        : _mm512_i32gather_ps(code, row.ladder, 4);
      tile.scales[gi] = _mm512_mul_ps(row_scale, relative);
    }
  }

  // Dimension 8w + e of the tile's 16 tokens, given its dword w and its group's scales.
  static __m512 key(__m512 levels, __m512i word, int e, __m512 scales) {
    return _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(word, nibble_shift(e)), levels), scales);
  }

  void decode(const uint8_t* const* cells, int64_t n, float* tile) const {
    KeyTileCodes codes;
    load(cells, n, codes);
    const RowGeometry row = this->row;
    const __m512 levels = this->levels;
    for (int64_t w = 0; w < row.head_dim / kCodesPerDword; ++w) {
      const __m512i word = _mm512_load_si512(codes.words + w * kLanes);
      float* dims = tile + kCodesPerDword * w * kLanes;
      const __m512 word_scales = codes.scales[kCodesPerDword * w / row.group];
#pragma GCC unroll 8
      for (int e = 0; e < kCodesPerDword; ++e) {
        const __m512 s =
            row.group % kCodesPerDword == 0 ? word_scales : codes.scales[(kCodesPerDword * w + e) / row.group];
        _mm512_storeu_ps(dims + e * kLanes, key(levels, word, e, s));
      }
    }
  }
};

using KeyDecoder = KeyTileDecoder;
using ValueDecoder = RowDecoder;
#else
using KeyDecoder = PortableKeyDecoder;
using ValueDecoder = PortableRowDecoder;
#endif

// The K and V decoders of one layout, built once per thread and call.
struct KVDecoders {
  KeyDecoder key;
  ValueDecoder value;
  KVDecoders(const Tables& t, const CellGeometry& cell) : key(t, cell.key), value(t, cell.value) {}
};

// Dequantized keys of tokens [lo, hi) of one request and KV head, 16 tokens at a time from
// (tile_start - lo) * d on: AVX-512 tiles [tile][d][16] (tokens past hi are zero), portable
// rows [token - lo][d].
inline void gather_keys(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                        const CacheGeometry& g, const KeyDecoder& decoder, float* keys) {
  CellCursor cursor(cache, blocks, kv_head, lo, g);
  for (int64_t tile_start = lo; tile_start < hi; tile_start += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, hi - tile_start);
    const uint8_t* cells[kLanes];
    for (int64_t k = 0; k < n; ++k) cells[k] = cursor.next();
    decoder.decode(cells, n, keys + (tile_start - lo) * g.head_dim);
  }
}

// Dequantized values of tokens [lo, hi), row-major [token - lo][d].
inline void gather_values(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                          const CacheGeometry& g, const ValueDecoder& decoder, float* values) {
  CellCursor cursor(cache, blocks, kv_head, lo, g);
  for (int64_t pos = lo; pos < hi; ++pos)
    decoder.decode(cursor.next() + g.cell.value_offset, values + (pos - lo) * g.head_dim);
}

}  // namespace
}  // namespace nf4kv
