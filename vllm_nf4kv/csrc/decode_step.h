// Decode steps (a task with one query): keys and values decoded in registers and used at once.
//
// A prefill task decodes each chunk of keys and values once into L1 scratch and shares it
// among up to 64 x group query rows. A decode has only its group's rows (1 to 8), so the
// store to scratch and the reload cost about what the arithmetic does; here the levels are
// looked up and multiplied by their scales (the same fp32 products as decoders.h) and go
// straight into the same fma chains as attention_math.h's score_tiles and
// accumulate_rows_avx512: per (row, key) one chain over d in order, per (row, dimension) one
// chain over the keys in order. Same bits as the scratch path by construction; the tests
// compare a query alone (this path) with the same query inside a prefill (the other).
//
// AVX-512 only; the portable build keeps its one path.

#pragma once

#include "attention_math.h"
#include "common.h"
#include "decoders.h"

namespace nf4kv {
namespace {

#if defined(NF4KV_AVX512)

// Up to four query rows against kTiles decoded key tiles: for each dword of the row, its
// 8 dimensions of every tile are looked up, scaled and fed to kRows x kTiles chains.
template <int kRows, int kTiles>
void score_key_codes(const KeyTileDecoder& decoder, const KeyTileCodes* tiles, const float* const* q,
                     int64_t head_dim, __m512 scale, float* const* scores) {
  const __m512 levels = decoder.levels;
  const int64_t group = decoder.row.group;
  __m512 acc[kRows][kTiles];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kTiles; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t w = 0; w < head_dim / kCodesPerDword; ++w) {
    __m512i word[kTiles];
    __m512 word_scales[kTiles];
    for (int i = 0; i < kTiles; ++i) {
      word[i] = _mm512_load_si512(tiles[i].words + w * kLanes);
      word_scales[i] = tiles[i].scales[kCodesPerDword * w / group];
    }
#pragma GCC unroll 8
    for (int e = 0; e < kCodesPerDword; ++e) {
      const int64_t d = kCodesPerDword * w + e;
      __m512 k[kTiles];
      for (int i = 0; i < kTiles; ++i) {
        const __m512 s = group % kCodesPerDword == 0 ? word_scales[i] : tiles[i].scales[d / group];
        k[i] = in_register(KeyTileDecoder::key(levels, word[i], e, s));
      }
      for (int r = 0; r < kRows; ++r) {
        const __m512 qd = _mm512_set1_ps(q[r][d]);
        for (int i = 0; i < kTiles; ++i) acc[r][i] = _mm512_fmadd_ps(qd, k[i], acc[r][i]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kTiles; ++i) _mm512_storeu_ps(scores[r] + i * kLanes, _mm512_mul_ps(acc[r][i], scale));
}

template <int kRows>
void score_key_codes(const KeyTileDecoder& decoder, const KeyTileCodes* tiles, int tiles_n, const float* const* q,
                     int64_t head_dim, __m512 scale, float* const* scores) {
  switch (tiles_n) {
    case 4: score_key_codes<kRows, 4>(decoder, tiles, q, head_dim, scale, scores); break;
    case 3: score_key_codes<kRows, 3>(decoder, tiles, q, head_dim, scale, scores); break;
    case 2: score_key_codes<kRows, 2>(decoder, tiles, q, head_dim, scale, scores); break;
    default: score_key_codes<kRows, 1>(decoder, tiles, q, head_dim, scale, scores); break;
  }
}

// scores[r][t - lo] = scale * q_r . k_t for the keys [lo, hi) of one KV head, 4 tiles of 16
// keys at a time (rows in passes of 4; a pass re-reads the tiles' codes, not the cache).
inline void score_decode_keys(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                              const CacheGeometry& g, const KeyTileDecoder& decoder, const float* const* q, int rows,
                              float scale, float* const* scores) {
  constexpr int kTiles = 4;
  KeyTileCodes tiles[kTiles];
  const __m512 scale_v = _mm512_set1_ps(scale);
  // Cells are read first here (the value pass finds them in L2): fetch kAhead keys ahead, by
  // cache line (a page jumps to another block every block_size keys, which the hardware
  // prefetcher does not follow).
  constexpr int64_t kStep = kTiles * kLanes, kAhead = 2 * kStep;
  const int64_t cell_bytes = g.cell.cell_bytes;
  for (int64_t t0 = lo; t0 < hi; t0 += kStep) {
    for (int64_t pos = t0 + kAhead, until = std::min(hi, t0 + kAhead + kStep); pos < until;) {
      const CellRun run = cell_run(cache, blocks, kv_head, pos, g);
      const int64_t cells = std::min(run.length, until - pos);
      for (int64_t byte = 0; byte < cells * cell_bytes; byte += 64)
        _mm_prefetch(reinterpret_cast<const char*>(run.first + byte), _MM_HINT_T0);
      pos += cells;
    }
    int n = 0;
    for (int64_t pos = t0; n < kTiles && pos < hi; ++n) {
      const int64_t count = std::min<int64_t>(kLanes, hi - pos);
      const uint8_t* cells[kLanes];
      for (int64_t k = 0; k < count;) {
        const CellRun run = cell_run(cache, blocks, kv_head, pos + k, g);
        for (int64_t i = 0; i < run.length && k < count; ++i, ++k) cells[k] = run.first + i * cell_bytes;
      }
      decoder.load(cells, count, tiles[n]);
      pos += count;
    }
    for (int r0 = 0; r0 < rows; r0 += 4) {
      float* shifted[4];
      const int pass = std::min(4, rows - r0);
      for (int r = 0; r < pass; ++r) shifted[r] = scores[r0 + r] + (t0 - lo);
      switch (pass) {
        case 1: score_key_codes<1>(decoder, tiles, n, q + r0, g.head_dim, scale_v, shifted); break;
        case 2: score_key_codes<2>(decoder, tiles, n, q + r0, g.head_dim, scale_v, shifted); break;
        case 3: score_key_codes<3>(decoder, tiles, n, q + r0, g.head_dim, scale_v, shifted); break;
        default: score_key_codes<4>(decoder, tiles, n, q + r0, g.head_dim, scale_v, shifted); break;
      }
    }
  }
}

// Values: a 16-byte load holds the codes of 32 dimensions (a block). Its high nibbles (the
// even dimensions) and its low nibbles (the odd ones) become two registers, so a block's
// accumulators hold [even dims, odd dims]; they are split from and interleaved back to the
// natural order when loaded and stored (moves, exact). Rows whose value groups are whole
// blocks (group % 32 == 0, one ue5m3 code a group) look a block up in its group's table of
// level * scale, as RowDecoder does.
constexpr int kBlockDims = 2 * kLanes;

inline bool decodes_value_blocks(const RowGeometry& row) {
  return row.relative_bits == 0 && row.group % kBlockDims == 0 && row.head_dim % kBlockDims == 0;
}

struct BlockOrder {
  __m512i even, odd, first, second;  // split: natural -> (even, odd); join: (even, odd) -> natural halves
  BlockOrder() {
    alignas(64) int32_t idx[4][kLanes];
    for (int l = 0; l < kLanes; ++l) {
      idx[0][l] = 2 * l;
      idx[1][l] = 2 * l + 1;
      idx[2][l] = l / 2 + (l % 2) * kLanes;
      idx[3][l] = kLanes / 2 + l / 2 + (l % 2) * kLanes;
    }
    even = _mm512_load_si512(idx[0]);
    odd = _mm512_load_si512(idx[1]);
    first = _mm512_load_si512(idx[2]);
    second = _mm512_load_si512(idx[3]);
  }
};

// acc[r][block0 * 32 ...) += sum_t p[r][t] v_t over n tokens from `cursor`, kBlocks blocks.
template <int kRows, int kBlocks>
void accumulate_value_blocks(const RowDecoder& decoder, const BlockOrder& order, CellCursor cursor,
                             int64_t value_offset, int64_t n, const float* const* p, int64_t block0,
                             float* const* acc) {
  const RowGeometry row = decoder.row;  // locals: see RowDecoder::decode
  const __m512 levels = decoder.levels;
  const __mmask16 group_mask = decoder.group_mask;
  __m512 sum[kRows][kBlocks][2];
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < kBlocks; ++b) {
      const float* a = acc[r] + (block0 + b) * kBlockDims;
      const __m512 lo = _mm512_loadu_ps(a), hi = _mm512_loadu_ps(a + kLanes);
      sum[r][b][0] = _mm512_permutex2var_ps(lo, order.even, hi);
      sum[r][b][1] = _mm512_permutex2var_ps(lo, order.odd, hi);
    }
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* codes = cursor.next() + value_offset;
    const __m512 row_scales =
        decode_scales(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(group_mask, codes + row.scale_offset)));
    __m512 table = levels;
    int64_t table_group = -1;
    for (int b = 0; b < kBlocks; ++b) {
      const int64_t group = (block0 + b) * kBlockDims / row.group;
      if (group != table_group) {
        table = _mm512_mul_ps(levels, _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(group)), row_scales));
        table_group = group;
      }
      const __m512i bytes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (block0 + b) * kBlockDims * CODE_BITS / 8)));
      const __m512 even = in_register(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, CODE_BITS), table));
      const __m512 odd = in_register(_mm512_permutexvar_ps(bytes, table));
      for (int r = 0; r < kRows; ++r) {
        const __m512 weight = _mm512_set1_ps(p[r][t]);
        sum[r][b][0] = _mm512_fmadd_ps(weight, even, sum[r][b][0]);
        sum[r][b][1] = _mm512_fmadd_ps(weight, odd, sum[r][b][1]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < kBlocks; ++b) {
      float* a = acc[r] + (block0 + b) * kBlockDims;
      _mm512_storeu_ps(a, _mm512_permutex2var_ps(sum[r][b][0], order.first, sum[r][b][1]));
      _mm512_storeu_ps(a + kLanes, _mm512_permutex2var_ps(sum[r][b][0], order.second, sum[r][b][1]));
    }
}

// Passes of kRows rows x kBlocks blocks that keep at most 16 accumulators live.
template <int kRows>
void accumulate_value_passes(const RowDecoder& decoder, const BlockOrder& order, const CellCursor& cursor,
                             int64_t value_offset, int64_t n, const float* const* p, float* const* acc) {
  constexpr int kBlocks = 16 / (2 * kRows);  // 8, 4, 2, 2 blocks for 1..4 rows
  const int64_t blocks = decoder.row.head_dim / kBlockDims;
  int64_t b0 = 0;
  for (; b0 + kBlocks <= blocks; b0 += kBlocks)
    accumulate_value_blocks<kRows, kBlocks>(decoder, order, cursor, value_offset, n, p, b0, acc);
  for (; b0 < blocks; ++b0) accumulate_value_blocks<kRows, 1>(decoder, order, cursor, value_offset, n, p, b0, acc);
}

// acc[r] += sum_t p[r][t] v_t for the values [lo, hi) of one KV head (p[r] indexed from lo).
inline void accumulate_decode_values(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo,
                                     int64_t hi, const CacheGeometry& g, const RowDecoder& decoder,
                                     const BlockOrder& order, const float* const* p, int rows, float* const* acc) {
  const CellCursor cursor(cache, blocks, kv_head, lo, g);
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const int pass = std::min(4, rows - r0);
    const int64_t n = hi - lo, offset = g.cell.value_offset;
    switch (pass) {
      case 1: accumulate_value_passes<1>(decoder, order, cursor, offset, n, p + r0, acc + r0); break;
      case 2: accumulate_value_passes<2>(decoder, order, cursor, offset, n, p + r0, acc + r0); break;
      case 3: accumulate_value_passes<3>(decoder, order, cursor, offset, n, p + r0, acc + r0); break;
      default: accumulate_value_passes<4>(decoder, order, cursor, offset, n, p + r0, acc + r0); break;
    }
  }
}

#endif

}  // namespace
}  // namespace nf4kv
