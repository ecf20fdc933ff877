// The attention arithmetic: exp, scores, softmax and the weighted sum of values.
//
// It exists twice: AVX-512 intrinsics, and portable loops doing the same fp32 operations in
// the same order, so the two give the same bits (the tests build both). Per (query, key) a
// score is one fma chain over d = 0, 1, ..., times the softmax scale; per (query, d) an output
// is one fma chain over the keys in order, divided by the softmax sum; softmax sums use 16
// lanes indexed from the query's first key, folded by the fixed tree (i, i+8), (i, i+4),
// (i, i+2), (0, 1). The AVX-512 path computes 16 keys at a time from transposed key tiles
// (one register = one dimension of 16 keys, decoders.h).
//
// A query's keys are cut at fixed positions into segments (kKeySegment keys: [k S, (k + 1) S)
// of its request). Each segment gets its own softmax and value sum, and the segments are folded
// into one running (max, sum, outputs) in order (SoftmaxState): inside one task for a prefill,
// or from per-segment partials in a second pass when a decode's segments ran on different
// threads. Either way the same folds in the same order, so a context of S keys or fewer gives
// the bits of one softmax, and a longer one the same bits however its segments were scheduled.
//
// None of it depends on where a query sits in the batch, which is what makes a prefix-cache
// hit, chunked prefill and a cold run reproduce each other bit for bit.

#pragma once

#include <algorithm>
#include <cstring>
#include <limits>

#include "common.h"

namespace nf4kv {
namespace {

// exp(x) for x <= 0: Cody-Waite reduction and a degree-6 polynomial (about 2
// ulp). Branch-free so the compiler vectorizes it, and the same instructions
// for every element, so results do not depend on where an element sits.
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = x * 1.44269504088896341f + shifter;
  n = n - shifter;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + FP32_EXP_BIAS) << FP32_MANTISSA_BITS;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// ---- scores[r][t] = scale * q_r . k_t for keys [a, b) and up to 4 query rows sharing them

// Keys row-major [t][d].
inline void scores_portable(const float* const* q, int rows, const float* keys, int64_t a, int64_t b,
                            int64_t head_dim, float scale, float* const* scores) {
  for (int r = 0; r < rows; ++r)
    for (int64_t t = a; t < b; ++t) {
      const float* k = keys + t * head_dim;
      float s = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) s = std::fma(q[r][d], k[d], s);
      scores[r][t] = s * scale;
    }
}

#if defined(NF4KV_AVX512)
// A loaded value kept in a register. Without this GCC folds the load into every fma that uses v, so
// the inner loops issue a 512-bit load per fma plus the broadcasts, more than the load ports
// take (one 512-bit load a cycle on Zen 4), and the fmas wait on them.
inline __m512 in_register(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

// kTiles key tiles at once: kRows x kTiles independent fma chains hide the fma latency (one
// tile's kRows chains alone would wait on it), and each broadcast query value serves kTiles tiles.
template <int kRows, int kTiles>
void score_tiles(const float* const* q, const float* key_tiles, int64_t tile, int64_t head_dim, __m512 scale,
                 float* const* scores) {
  const float* kt = key_tiles + tile * kLanes * head_dim;
  __m512 acc[kRows][kTiles];
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kTiles; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head_dim; ++d) {
    __m512 k[kTiles];
    for (int i = 0; i < kTiles; ++i) k[i] = in_register(_mm512_loadu_ps(kt + (i * head_dim + d) * kLanes));
    for (int r = 0; r < kRows; ++r) {
      const __m512 qd = _mm512_set1_ps(q[r][d]);
      for (int i = 0; i < kTiles; ++i) acc[r][i] = _mm512_fmadd_ps(qd, k[i], acc[r][i]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int i = 0; i < kTiles; ++i) _mm512_storeu_ps(scores[r] + (tile + i) * kLanes, _mm512_mul_ps(acc[r][i], scale));
}

template <int kRows>
void scores_avx512(const float* const* q, const float* key_tiles, int64_t a, int64_t b, int64_t head_dim,
                   float scale, float* const* scores) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const int64_t end = (b + kLanes - 1) / kLanes;
  int64_t tile = a / kLanes;
  for (; tile + 4 <= end; tile += 4) score_tiles<kRows, 4>(q, key_tiles, tile, head_dim, scale_v, scores);
  switch (end - tile) {
    case 3: score_tiles<kRows, 3>(q, key_tiles, tile, head_dim, scale_v, scores); break;
    case 2: score_tiles<kRows, 2>(q, key_tiles, tile, head_dim, scale_v, scores); break;
    case 1: score_tiles<kRows, 1>(q, key_tiles, tile, head_dim, scale_v, scores); break;
    default: break;
  }
}

// Keys as tiles [tile][d][16]; query rows four at a time.
inline void scores_tiled(const float* const* q, int rows, const float* key_tiles, int64_t a, int64_t b,
                         int64_t head_dim, float scale, float* const* scores) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    switch (std::min(4, rows - r0)) {
      case 1: scores_avx512<1>(q + r0, key_tiles, a, b, head_dim, scale, scores + r0); break;
      case 2: scores_avx512<2>(q + r0, key_tiles, a, b, head_dim, scale, scores + r0); break;
      case 3: scores_avx512<3>(q + r0, key_tiles, a, b, head_dim, scale, scores + r0); break;
      default: scores_avx512<4>(q + r0, key_tiles, a, b, head_dim, scale, scores + r0); break;
    }
  }
}
#endif

// The keys as this build's KeyDecoder laid them out (decoders.h).
inline void scores_rows(const float* const* q, int rows, const float* keys, int64_t a, int64_t b, int64_t head_dim,
                        float scale, float* const* scores) {
#if defined(NF4KV_AVX512)
  scores_tiled(q, rows, keys, a, b, head_dim, scale, scores);
#else
  scores_portable(q, rows, keys, a, b, head_dim, scale, scores);
#endif
}

// ---- softmax over scores[a, b) in place; returns the sum of the exponentials

inline float tree_sum(float* lane) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] = lane[l] + lane[l + width];
  return lane[0];
}

// What softmax_numerators leaves beside the numerators: their max (subtracted) and sum.
struct SegmentSoftmax {
  float max, sum;
};

inline SegmentSoftmax softmax_numerators(float* scores, int64_t a, int64_t b) {
  float lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -std::numeric_limits<float>::infinity());
  int64_t t = a;
  for (; t + kLanes <= b; t += kLanes)
    for (int l = 0; l < kLanes; ++l) lane_max[l] = std::max(lane_max[l], scores[t + l]);
  for (int l = 0; t + l < b; ++l) lane_max[l] = std::max(lane_max[l], scores[t + l]);
  const float m = *std::max_element(lane_max, lane_max + kLanes);  // exact: order does not matter
  for (t = a; t < b; ++t) scores[t] = exp_nonpositive(scores[t] - m);
  float lane[kLanes] = {};
  for (t = a; t + kLanes <= b; t += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += scores[t + l];
  for (int l = 0; t + l < b; ++l) lane[l] += scores[t + l];
  return {m, tree_sum(lane)};
}

// One row's softmax over the segments folded so far: their max, sum of exponentials and the
// unnormalized output, all relative to `max`. The first segment is taken as it is (exact), so
// a query with one segment gets the bits of a single softmax; each later one is folded in by
// rescaling both sides to the larger max, in one order everywhere (the scalar loop is the
// same source in both builds; fp-contract is off, the fmas are explicit).
struct SoftmaxState {
  float max, sum;
  float* acc;  // [head_dim]

  void take(const SegmentSoftmax& segment, const float* segment_acc, int64_t head_dim) {
    max = segment.max;
    sum = segment.sum;
    std::copy(segment_acc, segment_acc + head_dim, acc);
  }

  void fold(const SegmentSoftmax& segment, const float* segment_acc, int64_t head_dim) {
    const float m = std::max(max, segment.max);
    const float mine = exp_nonpositive(max - m), theirs = exp_nonpositive(segment.max - m);
    sum = std::fma(segment.sum, theirs, sum * mine);
    for (int64_t i = 0; i < head_dim; ++i) acc[i] = std::fma(segment_acc[i], theirs, acc[i] * mine);
    max = m;
  }
};

// ---- acc[r] += sum_t p[r][t] v_t for keys [a, b): per element an fma chain over t in
// order, continued across calls (fp32 stores and loads are exact), so walking the
// keys in chunks gives the bits of one pass

inline void accumulate_values_portable(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                                       int64_t head_dim, float* const* acc) {
  for (int r = 0; r < rows; ++r)
    for (int64_t t = a; t < b; ++t)
      for (int64_t d = 0; d < head_dim; ++d) acc[r][d] = std::fma(p[r][t], values[t * head_dim + d], acc[r][d]);
}

#if defined(NF4KV_AVX512)
// kRows rows share each loaded value vector; all kRows x kChunks accumulators in registers.
template <int kRows, int kChunks>
void accumulate_rows_avx512(const float* const* p, const float* values, int64_t a, int64_t b, float* const* acc) {
  constexpr int64_t d = kChunks * kLanes;
  __m512 sum[kRows][kChunks];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) sum[r][c] = _mm512_loadu_ps(acc[r] + c * kLanes);
  for (int64_t t = a; t < b; ++t) {
    __m512 v[kChunks];
    for (int c = 0; c < kChunks; ++c) v[c] = in_register(_mm512_loadu_ps(values + t * d + c * kLanes));
    for (int r = 0; r < kRows; ++r) {
      const __m512 weight = _mm512_set1_ps(p[r][t]);
      for (int c = 0; c < kChunks; ++c) sum[r][c] = _mm512_fmadd_ps(weight, v[c], sum[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(acc[r] + c * kLanes, sum[r][c]);
}

// Rows in passes that keep at most ~24 accumulators live.
template <int kChunks>
void accumulate_values_passes(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                              float* const* acc) {
  constexpr int kMaxRows = kChunks <= 6 ? 3 : (kChunks <= 12 ? 2 : 1);
  for (int r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int n = std::min(kMaxRows, rows - r0);
    if (n == 3)
      accumulate_rows_avx512<3, kChunks>(p + r0, values, a, b, acc + r0);
    else if (n == 2)
      accumulate_rows_avx512<(kMaxRows >= 2 ? 2 : 1), kChunks>(p + r0, values, a, b, acc + r0);
    else
      accumulate_rows_avx512<1, kChunks>(p + r0, values, a, b, acc + r0);
  }
}

// Head vectors of up to 16 registers; false (nothing done) for longer ones.
inline bool accumulate_values_avx512(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                                     int64_t head_dim, float* const* acc) {
  switch (head_dim / kLanes) {
#define NF4KV_CASE(n)                                              \
  case n:                                                          \
    accumulate_values_passes<n>(p, rows, values, a, b, acc); \
    return true;
    NF4KV_CASE(1) NF4KV_CASE(2) NF4KV_CASE(3) NF4KV_CASE(4) NF4KV_CASE(5) NF4KV_CASE(6) NF4KV_CASE(7)
    NF4KV_CASE(8) NF4KV_CASE(9) NF4KV_CASE(10) NF4KV_CASE(11) NF4KV_CASE(12) NF4KV_CASE(13) NF4KV_CASE(14)
    NF4KV_CASE(15) NF4KV_CASE(16)
#undef NF4KV_CASE
    default:
      return false;
  }
}
#endif

inline void accumulate_values(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                              int64_t head_dim, float* const* acc) {
#if defined(NF4KV_AVX512)
  if (accumulate_values_avx512(p, rows, values, a, b, head_dim, acc)) return;
#endif
  accumulate_values_portable(p, rows, values, a, b, head_dim, acc);
}

}  // namespace
}  // namespace nf4kv
