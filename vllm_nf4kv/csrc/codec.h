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

// The NF4 code of x / safe, clamped to [-1, 1], 16 lanes at a time: the number of midpoints
// below it, by a binary search over the midpoints (4 steps for 16 levels).
inline __m512i nearest_level(__m512 x, __m512 safe, const SearchConstants& k) {
  const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(x, safe), _mm512_set1_ps(-1.0f)), _mm512_set1_ps(1.0f));
  __m512i code = _mm512_setzero_si512();
  for (int step = NUM_LEVELS / 2; step >= 1; step /= 2) {
    const __m512 probe = _mm512_permutexvar_ps(_mm512_add_epi32(code, _mm512_set1_epi32(step - 1)), k.midpoints);
    code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(probe, v, _CMP_LT_OQ), code, _mm512_set1_epi32(step));
  }
  return code;
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
    const __m512i code = nearest_level(xv, safe_v, k);
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

// Relative code k of group gi into the packed bytes (LSB first, as relative_code reads them).
inline void pack_relative_code(uint8_t* packed, int64_t gi, int bits, int32_t k) {
  const int64_t bit = bits * gi, byte = bit >> 3, shift = bit & 7;
  packed[byte] = static_cast<uint8_t>(packed[byte] | (k << shift));
  if (shift + bits > 8) packed[byte + 1] = static_cast<uint8_t>(packed[byte + 1] | (k >> (8 - shift)));
}

#if defined(NF4KV_AVX512)
// The two-level rung search of a row of at most 8 groups with the groups side by side: lane
// l < 8 is group l at search step s, lane 8 + l the same group at step s + 1, and one register
// holds element i of every group. Each lane does group_trial's operations on its own group's
// values (divide, clamp, nearest level, squared error), and the error sum is pairwise_sum's
// tree: with groups of a multiple of 8 its first three levels are the aligned blocks of 8
// summed here, register by register, then pairwise_sum over the blocks. The steps are
// compared in order, the first minimum kept. So the rungs are the one-group-at-a-time
// search's, bit for bit; the codes are computed once more at the chosen rungs (the same
// nearest_level) and packed straight into the row's code bytes. The shipped keys are 8 groups
// x 8 steps: one group at a time filled half a register (groups of 8) and paid a horizontal
// sum, a branch and a copy of the codes per trial (store 1.7x faster at head_dim 64,
// docs/performance.md).
constexpr int kSideBySideGroups = kLanes / 2;
constexpr int kSideBySideGroupSize = 32;  // the shipped keys' largest group (head_dim 256)
constexpr int kErrorBlock = 8;            // elements whose squared errors are summed in registers
static_assert(kErrorBlock % kCodesPerDword == 0, "a group of whole error blocks is whole code dwords");

// kGroup: the group size as a constant (8, 16, 32: the loops unroll), or 0 for row.group.
template <int kGroup>
void quantize_two_level_side_by_side(const float* x, const float* absmax, const RowGeometry row, int search_steps,
                                     float row_scale, const SearchConstants& k, uint8_t* out) {
  const int group = kGroup != 0 ? kGroup : static_cast<int>(row.group), groups = static_cast<int>(row.num_groups);
  const int last_rung = (1 << row.relative_bits) - 1;
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i group_of_lane = _mm512_and_si512(lane, _mm512_set1_epi32(kSideBySideGroups - 1));
  const __m512i upper_half = _mm512_srli_epi32(lane, 3);  // 0 in lanes 0-7, 1 in lanes 8-15
  const __mmask16 low = static_cast<__mmask16>((1u << groups) - 1), used = static_cast<__mmask16>(low | (low << 8));
  const __m512i one = _mm512_set1_epi32(1);
  // row scale * ladder[rung] per lane (the scalar search's product), and group_trial's divisor
  const auto rung_scale = [&](__m512i rung, __mmask16 lanes) {
    return _mm512_mul_ps(_mm512_set1_ps(row_scale),
                         _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, rung, row.ladder, 4));
  };
  const auto divisor = [](__m512 scale) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(1.0f), _mm512_cmp_ps_mask(scale, _mm512_setzero_ps(), _CMP_GT_OQ), scale);
  };
  // element i of every group, in both halves
  __m512 xs[kSideBySideGroupSize];
  const __m512i first_element = _mm512_mullo_epi32(group_of_lane, _mm512_set1_epi32(group));
  for (int i = 0; i < group; ++i)
    xs[i] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), used, _mm512_add_epi32(first_element, _mm512_set1_epi32(i)),
                                     x, 4);
  // the smallest covering rung of each group (quantize_two_level's count, compare for compare)
  const __m512 group_absmax = _mm512_permutexvar_ps(group_of_lane, _mm512_maskz_loadu_ps(low, absmax));
  __m512i covering = _mm512_setzero_si512();
  for (int r = 0; r <= last_rung; ++r) {
    const __m512 rung = _mm512_set1_ps(row_scale * row.ladder[r]);
    covering = _mm512_mask_add_epi32(covering, _mm512_cmp_ps_mask(rung, group_absmax, _CMP_GE_OQ), covering, one);
  }
  const __m512i first = _mm512_max_epi32(_mm512_sub_epi32(covering, one), _mm512_setzero_si512());

  __m512 best_err = _mm512_setzero_ps();
  __m512i best_rung = first;
  for (int step = 0; step < search_steps; step += 2) {
    const __m512i rung = _mm512_min_epi32(_mm512_add_epi32(first, _mm512_add_epi32(_mm512_set1_epi32(step), upper_half)),
                                          _mm512_set1_epi32(last_rung));
    const __m512 scale = rung_scale(rung, used), safe = divisor(scale);
    __m512 blocks[kSideBySideGroupSize / kErrorBlock];
    for (int b = 0; b < group / kErrorBlock; ++b) {
      __m512 err[kErrorBlock];
      for (int e = 0; e < kErrorBlock; ++e) {
        const __m512 xi = xs[b * kErrorBlock + e];
        const __m512i code = nearest_level(xi, safe, k);
        const __m512 diff = _mm512_sub_ps(_mm512_mul_ps(_mm512_permutexvar_ps(code, k.levels), scale), xi);
        err[e] = _mm512_mul_ps(diff, diff);
      }
      for (int width = kErrorBlock / 2; width >= 1; width /= 2)  // (0+1), (2+3), ...: pairwise_sum's first levels
        for (int e = 0; e < width; ++e) err[e] = _mm512_add_ps(err[2 * e], err[2 * e + 1]);
      blocks[b] = err[0];
    }
    for (int n = group / kErrorBlock; n > 1;) {  // pairwise_sum over the blocks, an odd tail + 0
      const int half = (n + 1) / 2;
      for (int b = 0; b < half; ++b)
        blocks[b] = _mm512_add_ps(blocks[2 * b], 2 * b + 1 < n ? blocks[2 * b + 1] : _mm512_setzero_ps());
      n = half;
    }
    __m512 total = blocks[0];
    // step, then step + 1 (moved to the low lanes): strictly better replaces, ties keep the earlier
    __m512i step_rung = rung;
    for (int s = step; s < std::min(step + 2, search_steps); ++s) {
      const __mmask16 better = s == 0 ? low : _mm512_mask_cmp_ps_mask(low, total, best_err, _CMP_LT_OQ);
      best_err = _mm512_mask_mov_ps(best_err, better, total);
      best_rung = _mm512_mask_mov_epi32(best_rung, better, step_rung);
      total = _mm512_shuffle_f32x4(total, total, _MM_SHUFFLE(1, 0, 3, 2));
      step_rung = _mm512_shuffle_i32x4(step_rung, step_rung, _MM_SHUFFLE(1, 0, 3, 2));
    }
  }
  // the codes at each group's rung, element i of every group a register: the code bytes of a
  // group of a multiple of 8 are whole dwords, element i in dword i / 8 at nibble_shift(i % 8)
  const __m512 safe = divisor(rung_scale(best_rung, low));
  const int dwords = group / kCodesPerDword;
  const __m512i first_dword = _mm512_mullo_epi32(group_of_lane, _mm512_set1_epi32(dwords));
  for (int q = 0; q < dwords; ++q) {
    __m512i word = _mm512_setzero_si512();
    for (int i = 0; i < kCodesPerDword; ++i)
      word = _mm512_or_si512(word,
                             _mm512_slli_epi32(nearest_level(xs[q * kCodesPerDword + i], safe, k), nibble_shift(i)));
    _mm512_mask_i32scatter_epi32(out, low, _mm512_add_epi32(first_dword, _mm512_set1_epi32(q)), word, 4);
  }
  alignas(64) int32_t rung[kLanes];
  _mm512_store_si512(rung, best_rung);
  uint8_t* packed = out + row.scale_offset + 1;
  for (int gi = 0; gi < groups; ++gi) pack_relative_code(packed, gi, static_cast<int>(row.relative_bits), rung[gi]);
}

// Whether quantize_two_level_side_by_side takes this row.
inline bool side_by_side(const RowGeometry& row) {
  return row.num_groups <= kSideBySideGroups && row.group % kErrorBlock == 0 && row.group <= kSideBySideGroupSize;
}
#endif

// TWO_LEVEL rows (reference.quantize_two_level): the row code covers the row's absmax, written
// with the relative codes zeroed; returns the row scale.
inline float start_two_level(const float* absmax, const RowGeometry row, const Tables& t, uint8_t* scale_bytes) {
  float row_absmax = 0.0f;
  for (int64_t gi = 0; gi < row.num_groups; ++gi) row_absmax = std::max(row_absmax, absmax[gi]);
  const int32_t row_code = encode_scale_ceil(row_absmax);
  scale_bytes[0] = static_cast<uint8_t>(row_code);
  std::memset(scale_bytes + 1, 0, row.scale_bytes - 1);
  return t.scale_values[row_code];
}

// TWO_LEVEL scales one group at a time: per group, the rungs from the smallest covering one
// down, search_steps of them (clamped).
inline void quantize_two_level(const float* x, const float* absmax, const RowGeometry row, int search_steps,
                               float row_scale, const Tables& t, const SearchConstants& constants, uint8_t* codes,
                               uint8_t* scale_bytes) {
  const int group = static_cast<int>(row.group);
  const int bits = static_cast<int>(row.relative_bits), rungs = 1 << bits;
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
    pack_relative_code(scale_bytes + 1, gi, bits, rung_at(best));
  }
}

// One rotated head vector -> codes | scale bytes (reference.quantize_rows).
// The row's geometry comes by value: the uint8 stores below may alias anything, so through a
// reference the compiler would reload its fields after each one.
inline void quantize_row(const float* x_in, const RowGeometry row, int search_steps, const Tables& t,
                         const SearchConstants& constants, uint8_t* out) {
  const int head_dim = static_cast<int>(row.head_dim), group = static_cast<int>(row.group);
  float x[CPU_MAX_HEAD_DIM];
  float absmax[CPU_MAX_SCALE_GROUPS];
#if defined(NF4KV_AVX512)
  if (group % 8 == 0) {  // eight values a register (a maximum is exact in any order)
    const __m256 magnitude_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t gi = 0; gi < row.num_groups; ++gi) {
      __m256 m = _mm256_setzero_ps();
      for (int i = static_cast<int>(gi) * group; i < (static_cast<int>(gi) + 1) * group; i += 8) {
        const __m256 v = sanitize(_mm256_loadu_ps(x_in + i));
        _mm256_storeu_ps(x + i, v);
        m = _mm256_max_ps(m, _mm256_and_ps(v, magnitude_bits));
      }
      absmax[gi] = _mm512_reduce_max_ps(_mm512_zextps256_ps512(m));
    }
  } else
#endif
  {
    for (int i = 0; i < head_dim; ++i) x[i] = sanitize(x_in[i]);
    for (int64_t gi = 0; gi < row.num_groups; ++gi) {
      float m = 0.0f;
      for (int i = 0; i < group; ++i) m = std::max(m, std::fabs(x[gi * group + i]));
      absmax[gi] = m;
    }
  }
  uint8_t codes[CPU_MAX_HEAD_DIM];
  if (row.relative_bits == 0) {
    quantize_per_group(x, absmax, row, search_steps, t, constants, codes, out + row.scale_offset);
  } else {
    const float row_scale = start_two_level(absmax, row, t, out + row.scale_offset);
#if defined(NF4KV_AVX512)
    if (side_by_side(row)) {  // writes the code bytes too
      switch (group) {
        case 8: return quantize_two_level_side_by_side<8>(x, absmax, row, search_steps, row_scale, constants, out);
        case 16: return quantize_two_level_side_by_side<16>(x, absmax, row, search_steps, row_scale, constants, out);
        case 32: return quantize_two_level_side_by_side<32>(x, absmax, row, search_steps, row_scale, constants, out);
        default: return quantize_two_level_side_by_side<0>(x, absmax, row, search_steps, row_scale, constants, out);
      }
    }
#endif
    quantize_two_level(x, absmax, row, search_steps, row_scale, t, constants, codes, out + row.scale_offset);
  }
  // two codes a byte, the even element in the high nibble
  const int64_t code_bytes = row.code_bytes;
  for (int64_t i = 0; i < code_bytes; ++i)
    out[i] = static_cast<uint8_t>((codes[2 * i] << CODE_BITS) | codes[2 * i + 1]);
}

}  // namespace
}  // namespace nf4kv
