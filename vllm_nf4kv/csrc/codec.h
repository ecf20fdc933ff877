// The store's codec: one rotated head vector -> NF4 codes | ue5m3 scale codes, with
// reference.quantize_groups' exact arithmetic (the same integer scale encoding, the same
// nearest-level index, the same pairwise error sums). The files that include this are
// compiled with -ffp-contract=off, so no a*b+c is fused behind our back.

#pragma once

#include <algorithm>
#include <cstring>
#include <limits>

#include "common.h"

namespace nf4kv {
namespace {

// Smallest ue5m3 code whose value is >= s (reference.encode_scale_ceil): integer operations
// on the fp32 bits, the kept mantissa bits rounded up.
inline int32_t encode_scale_ceil(float s) {
  s = std::min(std::max(s, 0.0f), SCALE_MAX);
  if (!(s > 0.0f)) return 0;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  constexpr uint32_t kMantissaMask = (1u << FP32_MANTISSA_BITS) - 1;
  constexpr uint32_t kRoundUp = (1u << SCALE_DROPPED_BITS) - 1;
  const int32_t exponent = static_cast<int32_t>(bits >> FP32_MANTISSA_BITS) - FP32_EXP_BIAS + SCALE_EXP_BIAS;
  const int32_t mantissa = static_cast<int32_t>(((bits & kMantissaMask) + kRoundUp) >> SCALE_DROPPED_BITS);
  // a mantissa carry bumps the exponent
  return std::min(std::max(exponent * (1 << SCALE_MANTISSA_BITS) + mantissa, SCALE_CODE_MIN), SCALE_CODE_MAX);
}

// reference.pairwise_sum: (0+1), (2+3), ... level by level, an odd tail padded with 0.
inline float pairwise_sum(float* x, int n) {
  while (n > 1) {
    const int half = (n + 1) / 2;
    for (int i = 0; i < half; ++i) x[i] = x[2 * i] + (2 * i + 1 < n ? x[2 * i + 1] : 0.0f);
    n = half;
  }
  return x[0];
}

// Number of midpoints strictly below v (torch.bucketize, right=False).
inline uint8_t nf4_code(float v, const float* midpoints) {
  uint8_t code = 0;
  for (int i = 0; i < NUM_MIDPOINTS; ++i) code += midpoints[i] < v;
  return code;
}

// The vector constants of the scale search, built once per thread (building
// them per call would stall on store forwarding).
struct SearchConstants {
#if defined(NF4KV_AVX512)
  static_assert(NUM_LEVELS == kLanes, "the levels and midpoints are one register each (vpermps tables)");
  __m512 midpoints, levels;  // midpoint lane NUM_MIDPOINTS is +inf, never probed
  __m256 midpoints_low, midpoints_high, levels_low, levels_high;  // the same tables in halves (groups of 8)
  explicit SearchConstants(const Tables& t) {
    alignas(64) float mids[kLanes];
    std::memcpy(mids, t.midpoints, NUM_MIDPOINTS * sizeof(float));
    mids[NUM_MIDPOINTS] = std::numeric_limits<float>::infinity();
    midpoints = _mm512_load_ps(mids);
    levels = _mm512_loadu_ps(t.levels);
    midpoints_low = _mm256_load_ps(mids);
    midpoints_high = _mm256_load_ps(mids + kLanes / 2);
    levels_low = _mm256_loadu_ps(t.levels);
    levels_high = _mm256_loadu_ps(t.levels + kLanes / 2);
  }
#else
  explicit SearchConstants(const Tables&) {}
#endif
};

#if defined(NF4KV_AVX512)
// pairwise_sum of 16 values in one register: lanes (0+1), (2+3), ..., then
// pairs of those, and so on; each add takes the same two operands as the
// scalar loop's. A sum over 16k values is k of these, then pairwise_sum over
// the k results (no pair of pairwise_sum's first four levels crosses a
// 16-aligned boundary).
inline float pairwise_sum(__m512 x) {
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(2, 3, 0, 1)));        // lane 2i: x[2i] + x[2i+1]
  x = _mm512_add_ps(x, _mm512_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));        // lane 4i
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(2, 3, 0, 1)));  // lane 8i
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, _MM_SHUFFLE(1, 0, 3, 2)));  // lane 0
  return _mm512_cvtss_f32(x);
}

// group_trial for groups of a multiple of 16: 16 values at a time, the nearest level by a
// binary search over the midpoints (4 steps for 16 levels).
inline float group_trial_avx512(const float* x, int group, float scale, const SearchConstants& k,
                                uint8_t* trial) {
  const float safe = scale > 0.0f ? scale : 1.0f;
  float err[CPU_MAX_HEAD_DIM / kLanes];
  const __m512 safe_v = _mm512_set1_ps(safe), scale_v = _mm512_set1_ps(scale);
  for (int c = 0; c < group; c += kLanes) {
    const __m512 xv = _mm512_loadu_ps(x + c);
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(xv, safe_v), _mm512_set1_ps(-1.0f)),
                                   _mm512_set1_ps(1.0f));
    __m512i code = _mm512_setzero_si512();  // ends as the number of midpoints below v
    for (int step = NUM_LEVELS / 2; step >= 1; step /= 2) {
      const __m512 probe =
          _mm512_permutexvar_ps(_mm512_add_epi32(code, _mm512_set1_epi32(step - 1)), k.midpoints);
      code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(probe, v, _CMP_LT_OQ), code, _mm512_set1_epi32(step));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(trial + c), _mm512_cvtepi32_epi8(code));
    const __m512 diff = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutexvar_ps(code, k.levels), scale_v), xv);
    err[c / kLanes] = pairwise_sum(_mm512_mul_ps(diff, diff));
  }
  return pairwise_sum(err, group / kLanes);
}

// group_trial for groups of exactly 8 (the shipped keys at head_dim 64): one 256-bit register,
// the 16-entry tables looked up across two halves (vpermt2ps), and the pairwise sum of 8 in
// pairwise_sum's order: lanes (0+1), (2+3), ..., then pairs of those, then the two halves.
inline float group_trial_avx512_8(const float* x, float scale, const SearchConstants& k, uint8_t* trial) {
  const float safe = scale > 0.0f ? scale : 1.0f;
  const __m256 xv = _mm256_loadu_ps(x);
  const __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(xv, _mm256_set1_ps(safe)), _mm256_set1_ps(-1.0f)),
                                 _mm256_set1_ps(1.0f));
  __m256i code = _mm256_setzero_si256();  // ends as the number of midpoints below v
  for (int step = NUM_LEVELS / 2; step >= 1; step /= 2) {
    const __m256i probe_index = _mm256_add_epi32(code, _mm256_set1_epi32(step - 1));
    const __m256 probe = _mm256_permutex2var_ps(k.midpoints_low, probe_index, k.midpoints_high);
    code = _mm256_mask_add_epi32(code, _mm256_cmp_ps_mask(probe, v, _CMP_LT_OQ), code, _mm256_set1_epi32(step));
  }
  _mm_storel_epi64(reinterpret_cast<__m128i*>(trial), _mm256_cvtepi32_epi8(code));
  const __m256 level = _mm256_permutex2var_ps(k.levels_low, code, k.levels_high);
  const __m256 diff = _mm256_sub_ps(_mm256_mul_ps(level, _mm256_set1_ps(scale)), xv);
  __m256 e = _mm256_mul_ps(diff, diff);
  e = _mm256_add_ps(e, _mm256_permute_ps(e, _MM_SHUFFLE(2, 3, 0, 1)));  // lane 2i: e[2i] + e[2i+1]
  e = _mm256_add_ps(e, _mm256_permute_ps(e, _MM_SHUFFLE(1, 0, 3, 2)));  // lane 4i
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1)));
}
#endif

// group_trial one value at a time: any group size, any ISA.
inline float group_trial_portable(const float* x, int group, float scale, const Tables& t, uint8_t* trial) {
  const float safe = scale > 0.0f ? scale : 1.0f;
  float err[CPU_MAX_HEAD_DIM];
  for (int i = 0; i < group; ++i) {
    const float v = std::min(std::max(x[i] / safe, -1.0f), 1.0f);
    trial[i] = nf4_code(v, t.midpoints);
    const float diff = t.levels[trial[i]] * scale - x[i];
    err[i] = diff * diff;
  }
  return pairwise_sum(err, group);
}

// Codes of one group for one candidate scale and their summed squared error
// (the inner step of reference.quantize_groups). Both paths give the same bits.
inline float group_trial(const float* x, int group, float scale, const Tables& t,
                         [[maybe_unused]] const SearchConstants& k, uint8_t* trial) {
#if defined(NF4KV_AVX512)
  if (group % kLanes == 0) return group_trial_avx512(x, group, scale, k, trial);
  if (group == kLanes / 2) return group_trial_avx512_8(x, scale, k, trial);
#endif
  return group_trial_portable(x, group, scale, t, trial);
}

// The search of one group over candidate scales (reference._best_candidate): candidate(step)
// gives the scale to try at each step; the first minimum wins (the largest scale on ties).
// Returns the winning step; the group's codes are left in codes.
template <typename Candidate>
inline int search_group(const float* x, int group, int search_steps, Candidate candidate, const Tables& t,
                        const SearchConstants& constants, uint8_t* codes) {
  uint8_t trial[CPU_MAX_HEAD_DIM];
  float best_err = 0.0f;
  int best = 0;
  for (int step = 0; step < search_steps; ++step) {
    const float total = group_trial(x, group, candidate(step), t, constants, trial);
    if (step == 0 || total < best_err) {
      best_err = total;
      best = step;
      std::memcpy(codes, trial, group);
    }
  }
  return best;
}

// UE5M3_PER_GROUP scales (reference.quantize_groups): per group the ceil code of its absmax
// and the search_steps - 1 codes below it.
inline void quantize_per_group(const float* x, const float* absmax, const RowGeometry row, int search_steps,
                               const Tables& t, const SearchConstants& constants, uint8_t* codes,
                               uint8_t* scale_codes) {
  const int group = static_cast<int>(row.group);
  for (int64_t gi = 0; gi < row.num_groups; ++gi) {
    const int32_t first = encode_scale_ceil(absmax[gi]);
    const auto code_at = [first](int step) { return first > step ? first - step : first; };
    const int best = search_group(
        x + gi * group, group, search_steps, [&](int step) { return t.scale_values[code_at(step)]; }, t, constants,
        codes + gi * group);
    scale_codes[gi] = static_cast<uint8_t>(code_at(best));
  }
}

// TWO_LEVEL scales (reference.quantize_two_level): the row code covers the row's absmax; per
// group, the rungs from the smallest covering one down, search_steps of them (clamped).
inline void quantize_two_level(const float* x, const float* absmax, const RowGeometry row, int search_steps,
                               const Tables& t, const SearchConstants& constants, uint8_t* codes,
                               uint8_t* scale_bytes) {
  const int group = static_cast<int>(row.group);
  const int bits = static_cast<int>(row.relative_bits), rungs = 1 << bits;
  float row_absmax = 0.0f;
  for (int64_t gi = 0; gi < row.num_groups; ++gi) row_absmax = std::max(row_absmax, absmax[gi]);
  const int32_t row_code = encode_scale_ceil(row_absmax);
  const float row_scale = t.scale_values[row_code];
  scale_bytes[0] = static_cast<uint8_t>(row_code);
  uint8_t* packed = scale_bytes + 1;
  std::memset(packed, 0, row.scale_bytes - 1);
  for (int64_t gi = 0; gi < row.num_groups; ++gi) {
    int covering = 0;
    for (int k = 0; k < rungs; ++k) {
      const float rung = row_scale * row.ladder[k];
      covering += rung >= absmax[gi];
    }
    const int first = std::max(covering - 1, 0);
    const auto rung_at = [first, rungs](int step) { return std::min(first + step, rungs - 1); };
    const int best = search_group(
        x + gi * group, group, search_steps, [&](int step) { return row_scale * row.ladder[rung_at(step)]; }, t,
        constants, codes + gi * group);
    const int32_t k = rung_at(best);
    const int64_t bit = bits * gi, byte = bit >> 3, shift = bit & 7;  // LSB first, as relative_code reads
    packed[byte] = static_cast<uint8_t>(packed[byte] | (k << shift));
    if (shift + bits > 8) packed[byte + 1] = static_cast<uint8_t>(packed[byte + 1] | (k >> (8 - shift)));
  }
}

// One rotated head vector -> codes | scale bytes (reference.quantize_rows).
// The row's geometry comes by value: the uint8 stores below may alias anything, so through a
// reference the compiler would reload its fields after each one.
inline void quantize_row(const float* x_in, const RowGeometry row, int search_steps, const Tables& t,
                         const SearchConstants& constants, uint8_t* out) {
  const int head_dim = static_cast<int>(row.head_dim), group = static_cast<int>(row.group);
  float x[CPU_MAX_HEAD_DIM];
  for (int i = 0; i < head_dim; ++i) x[i] = sanitize(x_in[i]);
  float absmax[CPU_MAX_SCALE_GROUPS];
  for (int64_t gi = 0; gi < row.num_groups; ++gi) {
    float m = 0.0f;
    for (int i = 0; i < group; ++i) m = std::max(m, std::fabs(x[gi * group + i]));
    absmax[gi] = m;
  }
  uint8_t codes[CPU_MAX_HEAD_DIM];
  if (row.relative_bits == 0)
    quantize_per_group(x, absmax, row, search_steps, t, constants, codes, out + row.scale_offset);
  else
    quantize_two_level(x, absmax, row, search_steps, t, constants, codes, out + row.scale_offset);
  // two codes a byte, the even element in the high nibble
  const int64_t code_bytes = row.code_bytes;
  for (int64_t i = 0; i < code_bytes; ++i)
    out[i] = static_cast<uint8_t>((codes[2 * i] << CODE_BITS) | codes[2 * i + 1]);
}

}  // namespace
}  // namespace nf4kv
