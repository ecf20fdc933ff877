// NF4 KV-cache kernels for vLLM's CPU platform: quantize-on-write, and paged
// attention that reads NF4 pages directly (each task dequantizes the pages it
// needs into cache-resident fp32 tiles; no fp32 copy of the cache exists).
//
// Ground truth is vllm_nf4kv/reference.py. The store kernel reproduces it byte
// for byte (same integer scale encoding, same nearest-level index, same pairwise
// error sums; this file is compiled with -ffp-contract=off so no a*b+c is
// fused behind our back). The attention kernel reads the same fp32 values the
// reference decodes (level * scale) and accumulates in fp32 in an order that
// depends only on a query's own position (see "The attention arithmetic"
// below). So a query's result is the same whatever else is in the batch, which
// is what makes a prefix-cache hit, chunked prefill and a cold run reproduce
// each other bit for bit.
//
// Layouts (see vllm_nf4kv/format.py):
//   cache  uint8 [num_blocks, num_kv_heads, block_size, cell_bytes]
//   cell   K codes (D/2) | K scale codes (D/gk) | V codes (D/2) | V scale codes (D/gv)
//   codes  two NF4 indices a byte, the even element in the high nibble
// Queries, keys and values arrive as the model made them and are rotated here
// (rotation.py's fp64 butterflies, bit for bit); outputs are rotated back.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

// The vector path needs AVX-512 F, BW and VL (every AVX-512 CPU since Skylake-SP).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NF4KV_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace nf4kv {
namespace {

constexpr int kLanes = 16;            // one AVX-512 register of fp32
constexpr int kQueryTile = 64;        // queries of one request per attention task
constexpr float kScaleMax = 61440.0f; // format.SCALE_MAX, the largest ue5m3 scale
constexpr int kMaxHeadDim = 512;
constexpr int64_t kKeyChunk = 64;     // tokens dequantized at a time (16 KB of K or V at head_dim 64)
constexpr int kMaxRowsPerQuery = 64;  // query heads per KV head (GQA group) the kernel takes

// reference.sanitize: NaN -> 0, +-inf -> +-SCALE_MAX.
inline float sanitize(float x) {
  if (std::isnan(x)) return 0.0f;
  if (std::isinf(x)) return x > 0 ? kScaleMax : -kScaleMax;
  return x;
}

#if defined(NF4KV_AVX512)
inline __m256 sanitize(__m256 x) {
  const __m256 magnitude = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
  const __mmask8 infinite = _mm256_cmp_ps_mask(magnitude, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ);
  const __m256 clamped = _mm256_or_ps(_mm256_xor_ps(x, magnitude), _mm256_set1_ps(kScaleMax));
  x = _mm256_mask_mov_ps(x, infinite, clamped);
  return _mm256_mask_mov_ps(x, _mm256_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm256_setzero_ps());
}
#endif

// ------------------------------------------------------------------ rotation

// x @ R and x @ R^T of rotation.py on CPU: signs, Hadamard butterflies with
// strides 1, 2, 4, ... per power-of-two block (largest block first), then
// 1/sqrt(block), all in fp64, in exactly rotation._hadamard_blocks' order.
class Rotation {
 public:
  Rotation(const double* signs, int64_t head_dim) : signs_(signs), head_dim_(head_dim) {
    for (int bit = 62; bit >= 0; --bit)
      if (head_dim >> bit & 1) blocks_.push_back(int64_t{1} << bit);
  }

  // fp32 out = (sanitize(x) * signs) H, rounded once from fp64
  void forward(const float* x, float* out) const {
    double y[kMaxHeadDim];
    int64_t i = 0;
#if defined(NF4KV_AVX512)
    for (; i + 8 <= head_dim_; i += 8)
      _mm512_storeu_pd(y + i, _mm512_mul_pd(_mm512_cvtps_pd(sanitize(_mm256_loadu_ps(x + i))),
                                            _mm512_loadu_pd(signs_ + i)));
#endif
    for (; i < head_dim_; ++i) y[i] = static_cast<double>(sanitize(x[i])) * signs_[i];
    hadamard(y);
    to_float(y, nullptr, out);
  }

  // fp32 out = (x H) * signs
  void inverse(const float* x, float* out) const {
    double y[kMaxHeadDim];
    int64_t i = 0;
#if defined(NF4KV_AVX512)
    for (; i + 8 <= head_dim_; i += 8) _mm512_storeu_pd(y + i, _mm512_cvtps_pd(_mm256_loadu_ps(x + i)));
#endif
    for (; i < head_dim_; ++i) y[i] = static_cast<double>(x[i]);
    hadamard(y);
    to_float(y, signs_, out);
  }

 private:
  // out = float(y) or float(y * signs), each rounded once (the conversion
  // rounds to nearest even, as the cast does).
  void to_float(const double* y, const double* signs, float* out) const {
    int64_t i = 0;
#if defined(NF4KV_AVX512)
    for (; i + 8 <= head_dim_; i += 8) {
      __m512d v = _mm512_loadu_pd(y + i);
      if (signs != nullptr) v = _mm512_mul_pd(v, _mm512_loadu_pd(signs + i));
      _mm256_storeu_ps(out + i, _mm512_cvtpd_ps(v));
    }
#endif
    for (; i < head_dim_; ++i) out[i] = static_cast<float>(signs != nullptr ? y[i] * signs[i] : y[i]);
  }

  void hadamard(double* y) const {
    int64_t start = 0;
    for (const int64_t size : blocks_) {
      double* b = y + start;
      int64_t stride = 1;
#if defined(NF4KV_AVX512)
      if (size >= 8) {  // a power of two: whole registers of 8
        butterflies_within_registers(b, size);
        stride = 8;
      }
#endif
      for (; stride < size; stride *= 2)
        for (int64_t i = 0; i < size; i += 2 * stride)
          for (int64_t j = i; j < i + stride; ++j) {
            const double first = b[j], second = b[j + stride];
            b[j] = first + second;
            b[j + stride] = first - second;
          }
      const double norm = 1.0 / std::sqrt(static_cast<double>(size));
      for (int64_t j = 0; j < size; ++j) b[j] = b[j] * norm;
      start += size;
    }
  }

#if defined(NF4KV_AVX512)
  // The stages with strides 1, 2 and 4, eight values a register: each lane
  // gets its partner by a shuffle, and keeps first + second or first - second
  // of the same two operands as the scalar loop (addition commutes exactly).
  static void butterflies_within_registers(double* b, int64_t size) {
    for (int64_t i = 0; i < size; i += 8) {
      __m512d x = _mm512_loadu_pd(b + i);
      __m512d partner = _mm512_permute_pd(x, 0x55);                       // stride 1
      x = _mm512_mask_blend_pd(0xAA, _mm512_add_pd(x, partner), _mm512_sub_pd(partner, x));
      partner = _mm512_permutex_pd(x, _MM_SHUFFLE(1, 0, 3, 2));           // stride 2
      x = _mm512_mask_blend_pd(0xCC, _mm512_add_pd(x, partner), _mm512_sub_pd(partner, x));
      partner = _mm512_shuffle_f64x2(x, x, _MM_SHUFFLE(1, 0, 3, 2));      // stride 4
      x = _mm512_mask_blend_pd(0xF0, _mm512_add_pd(x, partner), _mm512_sub_pd(partner, x));
      _mm512_storeu_pd(b + i, x);
    }
  }
#endif

  const double* signs_;
  int64_t head_dim_;
  std::vector<int64_t> blocks_;
};

const double* signs_of(const at::Tensor& signs, int64_t head_dim) {
  TORCH_CHECK(signs.dtype() == at::kDouble && signs.is_contiguous() && signs.numel() == head_dim,
              "signs must be fp64 [", head_dim, "]");
  return signs.data_ptr<double>();
}

// ------------------------------------------------------------------ store

// Smallest ue5m3 code whose value is >= s (reference.encode_scale_ceil).
inline int32_t encode_scale_ceil(float s) {
  s = std::min(std::max(s, 0.0f), kScaleMax);
  if (!(s > 0.0f)) return 0;
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof bits);
  const int32_t exponent = static_cast<int32_t>(bits >> 23) - 127 + 16;
  const int32_t mantissa = static_cast<int32_t>(((bits & 0x7FFFFFu) + ((1u << 20) - 1)) >> 20);
  return std::min(std::max(exponent * 8 + mantissa, 1), 255);
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
  for (int i = 0; i < 15; ++i) code += midpoints[i] < v;
  return code;
}

struct Tables {
  const float* levels;        // [16]
  const float* midpoints;     // [15]
  const float* scale_values;  // [256], code 0 -> 0.0
};

// The vector constants of the scale search, built once per thread (building
// them per call would stall on store forwarding).
struct SearchConstants {
#if defined(NF4KV_AVX512)
  __m512 midpoints, levels;  // midpoint lane 15 is +inf, never probed
  explicit SearchConstants(const Tables& t) {
    alignas(64) float mids[kLanes];
    std::memcpy(mids, t.midpoints, 15 * sizeof(float));
    mids[15] = std::numeric_limits<float>::infinity();
    midpoints = _mm512_load_ps(mids);
    levels = _mm512_loadu_ps(t.levels);
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
#endif

// Codes of one group for one candidate scale and their summed squared error
// (the inner step of reference.quantize_groups).
float group_trial(const float* x, int group, float scale, const Tables& t, const SearchConstants& k,
                  uint8_t* trial) {
  const float safe = scale > 0.0f ? scale : 1.0f;
  float err[kMaxHeadDim];
#if defined(NF4KV_AVX512)
  if (group % kLanes == 0) {  // 16 values at a time; nearest level by a 4-step binary search
    const __m512 safe_v = _mm512_set1_ps(safe), scale_v = _mm512_set1_ps(scale);
    for (int c = 0; c < group; c += kLanes) {
      const __m512 xv = _mm512_loadu_ps(x + c);
      const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(xv, safe_v), _mm512_set1_ps(-1.0f)),
                                     _mm512_set1_ps(1.0f));
      __m512i code = _mm512_setzero_si512();  // ends as the number of midpoints below v
      for (int step = 8; step >= 1; step /= 2) {
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
#endif
  for (int i = 0; i < group; ++i) {
    const float v = std::min(std::max(x[i] / safe, -1.0f), 1.0f);
    trial[i] = nf4_code(v, t.midpoints);
    const float diff = t.levels[trial[i]] * scale - x[i];
    err[i] = diff * diff;
  }
  return pairwise_sum(err, group);
}

// One rotated head vector -> codes | scale codes (reference.quantize_groups + packing).
void quantize_row(const float* x_in, int head_dim, int group, int search_steps, const Tables& t,
                  const SearchConstants& constants, uint8_t* row) {
  float x[kMaxHeadDim];
  for (int i = 0; i < head_dim; ++i) x[i] = sanitize(x_in[i]);
  uint8_t* scale_codes = row + head_dim / 2;
  uint8_t codes[kMaxHeadDim];
  uint8_t trial[kMaxHeadDim];
  for (int g0 = 0, gi = 0; g0 < head_dim; g0 += group, ++gi) {
    float absmax = 0.0f;
    for (int i = 0; i < group; ++i) absmax = std::max(absmax, std::fabs(x[g0 + i]));
    const int32_t first = encode_scale_ceil(absmax);
    float best_err = 0.0f;
    int32_t best_code = first;
    for (int step = 0; step < search_steps; ++step) {
      const int32_t candidate = first > step ? first - step : first;
      const float total = group_trial(x + g0, group, t.scale_values[candidate], t, constants, trial);
      if (step == 0 || total < best_err) {  // the first minimum: the largest scale on ties
        best_err = total;
        best_code = candidate;
        std::memcpy(codes + g0, trial, group);
      }
    }
    scale_codes[gi] = static_cast<uint8_t>(best_code);
  }
  for (int i = 0; i < head_dim / 2; ++i) row[i] = static_cast<uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
}

const float* table_of(const at::Tensor& table, int64_t size, const char* name) {
  TORCH_CHECK(table.dtype() == at::kFloat && table.numel() == size && table.is_contiguous(), name,
              " must be a contiguous fp32 table of ", size);
  return table.data_ptr<float>();
}

// midpoints: the store needs them, attention does not (nullptr there).
Tables tables_of(const at::Tensor& levels, const at::Tensor* midpoints, const at::Tensor& scale_values) {
  return {table_of(levels, 16, "levels"), midpoints != nullptr ? table_of(*midpoints, 15, "midpoints") : nullptr,
          table_of(scale_values, 256, "scale_values")};
}

void check_cache(const at::Tensor& cache, int64_t cell_bytes) {
  TORCH_CHECK(cache.dtype() == at::kByte && cache.dim() == 4 && cache.size(3) == cell_bytes &&
                  cache.is_contiguous(),
              "nf4 cache must be contiguous uint8 [num_blocks, num_kv_heads, block_size, ", cell_bytes, "]");
}

int64_t row_bytes(int64_t head_dim, int64_t group) { return head_dim / 2 + head_dim / group; }

void check_group(int64_t head_dim, int64_t group) {
  TORCH_CHECK(head_dim > 0 && head_dim <= kMaxHeadDim && head_dim % 2 == 0, "unsupported head_dim ", head_dim);
  TORCH_CHECK(group >= 2 && group % 2 == 0 && head_dim % group == 0, "bad group size ", group);
}

void store(const at::Tensor& key, const at::Tensor& value, const at::Tensor& cache, const at::Tensor& slot_mapping,
           const at::Tensor& signs,
           const at::Tensor& levels, const at::Tensor& midpoints, const at::Tensor& scale_values,
           int64_t key_group, int64_t value_group, int64_t search_steps) {
  TORCH_CHECK(key.dtype() == at::kFloat && value.dtype() == at::kFloat && key.is_contiguous() &&
              value.is_contiguous() && key.dim() == 3 && key.sizes() == value.sizes(),
              "key/value must be contiguous fp32 [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(slot_mapping.dtype() == at::kLong && slot_mapping.is_contiguous());
  TORCH_CHECK(search_steps >= 1);
  const int64_t num_tokens = std::min(key.size(0), slot_mapping.size(0));
  const int64_t num_heads = key.size(1), head_dim = key.size(2);
  check_group(head_dim, key_group);
  check_group(head_dim, value_group);
  const int64_t key_bytes = row_bytes(head_dim, key_group);
  const int64_t cell_bytes = key_bytes + row_bytes(head_dim, value_group);
  check_cache(cache, cell_bytes);
  TORCH_CHECK(cache.size(1) == num_heads, "cache has ", cache.size(1), " KV heads, key has ", num_heads);
  const int64_t num_blocks = cache.size(0), block_size = cache.size(2);
  const Tables t = tables_of(levels, &midpoints, scale_values);
  const Rotation rotation(signs_of(signs, head_dim), head_dim);
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  uint8_t* base = cache.data_ptr<uint8_t>();
  for (int64_t i = 0; i < num_tokens; ++i)
    TORCH_CHECK(slots[i] < num_blocks * block_size, "slot ", slots[i], " is outside the cache");
  at::parallel_for(0, num_tokens * num_heads, 16, [&](int64_t begin, int64_t end) {
    const SearchConstants constants(t);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_heads, head = item % num_heads;
      const int64_t slot = slots[token];
      if (slot < 0) continue;  // padding tokens
      uint8_t* cell = base + (((slot / block_size) * num_heads + head) * block_size + slot % block_size) * cell_bytes;
      float rotated[kMaxHeadDim];
      rotation.forward(k + item * head_dim, rotated);
      quantize_row(rotated, head_dim, key_group, search_steps, t, constants, cell);
      rotation.forward(v + item * head_dim, rotated);
      quantize_row(rotated, head_dim, value_group, search_steps, t, constants, cell + key_bytes);
    }
  });
}

// ------------------------------------------------------------------ attention

// exp(x) for x <= 0: Cody-Waite reduction and a degree-6 polynomial (about 2
// ulp). Branch-free so the compiler vectorizes it, and the same instructions
// for every element, so results do not depend on where an element sits.
inline float exp_nonpositive(float x) {
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
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

struct Geometry {
  int64_t num_heads, num_kv_heads, head_dim, block_size, cell_bytes;
  int64_t key_group, value_group, value_offset, max_blocks;
};

// The attention arithmetic exists twice: AVX-512 intrinsics, and portable
// loops doing the same fp32 operations in the same order, so the two give the
// same bits (the tests build both). Per (query, key) a score is one fma chain
// over d = 0, 1, ..., times the softmax scale; per (query, d) an output is one
// fma chain over the keys in order, divided by the softmax sum; softmax sums
// use 16 lanes indexed from the query's first key, folded by the fixed tree
// (i, i+8), (i, i+4), (i, i+2), (0, 1). The AVX-512 path computes 16 keys at a
// time from transposed key tiles (one register = one dimension of 16 keys).

#if defined(NF4KV_AVX512)
constexpr bool kAvx512 = true;
#else
constexpr bool kAvx512 = false;
#endif

// ---- dequantization: level * scale in fp32, exactly the reference's values

void dequant_row_portable(const uint8_t* codes, const uint8_t* scale_codes, int64_t head_dim, int64_t group,
                          const Tables& t, float* out) {
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float s = t.scale_values[scale_codes[(2 * i) / group]];
    out[2 * i] = t.levels[codes[i] >> 4] * s;
    out[2 * i + 1] = t.levels[codes[i] & 15] * s;
  }
}

#if defined(NF4KV_AVX512)
// ue5m3 codes (one per lane) -> fp32 scales from their bits, as reference.decode_scale builds
// them (code 0 -> 0.0). Computed in registers: a table lookup per code would stall on store
// forwarding.
inline __m512 decode_scales(__m512i code) {
  const __m512i exponent = _mm512_add_epi32(_mm512_srli_epi32(code, 3), _mm512_set1_epi32(127 - 16));
  const __m512i bits = _mm512_or_si512(_mm512_slli_epi32(exponent, 23),
                                       _mm512_slli_epi32(_mm512_and_si512(code, _mm512_set1_epi32(7)), 20));
  return _mm512_maskz_mov_ps(_mm512_test_epi32_mask(code, code), _mm512_castsi512_ps(bits));
}

// One head vector's codes -> level * scale, row-major (values; keys go through KeyTileDecoder).
// With groups of a multiple of 16 each group gets its own 16-entry table of level * scale (the
// same fp32 products), and 16 values cost one byte expansion, one shift and one lookup (vpermps
// reads only an index's low 4 bits); other group sizes look up levels and scales per element.
struct RowDecoder {
  __m512 levels;
  __m512i interleave;  // (high nibble i, low nibble i) pairs: 0, 16, 1, 17, ...
  __m512i group_of[kMaxHeadDim / kLanes];
  int64_t head_dim, group, num_groups;
  __mmask16 group_mask;

  RowDecoder(const Tables& t, int64_t head_dim_, int64_t group_)
      : head_dim(head_dim_), group(group_), num_groups(head_dim_ / group_),
        group_mask(static_cast<__mmask16>((1u << num_groups) - 1)) {
    TORCH_CHECK(num_groups <= kLanes, "at most 16 scale groups per head vector, got ", num_groups);
    levels = _mm512_loadu_ps(t.levels);
    alignas(64) int32_t idx[kLanes];
    for (int l = 0; l < kLanes; ++l) idx[l] = (l / 2) + (l % 2) * kLanes;
    interleave = _mm512_load_si512(idx);
    for (int64_t c = 0; c < head_dim / kLanes; ++c) {
      for (int l = 0; l < kLanes; ++l) idx[l] = static_cast<int32_t>((c * kLanes + l) / group);
      group_of[c] = _mm512_load_si512(idx);
    }
  }

  void decode(const uint8_t* codes, const uint8_t* scale_codes, float* out) const {
    const __m512 row_scales = decode_scales(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(group_mask, scale_codes)));
    if (group % kLanes == 0) {
      const __m512i nibble_shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
      const int64_t chunks = group / kLanes;
      for (int64_t gi = 0; gi < num_groups; ++gi) {
        const __m512 table =
            _mm512_mul_ps(levels, _mm512_permutexvar_ps(_mm512_set1_epi32(static_cast<int32_t>(gi)), row_scales));
        for (int64_t c = gi * chunks; c < (gi + 1) * chunks; ++c) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * c));
          const __m512i index = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), nibble_shift);
          _mm512_storeu_ps(out + c * kLanes, _mm512_permutexvar_ps(index, table));
        }
      }
      return;
    }
    const __m512i low_mask = _mm512_set1_epi32(15);
    for (int64_t c = 0; c < head_dim / kLanes; ++c) {
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * c)));
      const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), levels);
      const __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_mask), levels);
      const __m512 values = _mm512_permutex2var_ps(high, interleave, low);
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

// The keys of 16 tokens straight into a transposed tile [d][16 tokens]. The cells' code and
// scale-code bytes are loaded as rows of dwords and transposed as dwords (a dword holds 8
// codes, so this moves 1/8 of what transposing decoded fp32 would); then each dimension of the
// 16 tokens is one shift, one level lookup (vpermps reads only the index's low 4 bits) and one
// multiply by its group's 16 scales: the same fp32 products as the reference.
struct KeyTileDecoder {
  static constexpr int kMaxColumns = kMaxHeadDim / 8 + kLanes / 4;  // codes, then <= 16 scale codes
  __m512 levels;
  int64_t head_dim, group, num_groups, columns;

  KeyTileDecoder(const Tables& t, int64_t head_dim_, int64_t group_)
      : levels(_mm512_loadu_ps(t.levels)), head_dim(head_dim_), group(group_), num_groups(head_dim_ / group_),
        columns((head_dim_ / 2 + head_dim_ / group_ + 3) / 4) {
    TORCH_CHECK(num_groups <= kLanes, "at most 16 scale groups per head vector, got ", num_groups);
  }

  // cells[k] for k < n; tokens n..15 of the tile decode as zeros.
  void decode(const uint8_t* const* cells, int64_t n, float* tile) const {
    alignas(64) int32_t words[kMaxColumns * kLanes];  // [column][token]
    for (int64_t c0 = 0; c0 < columns; c0 += kLanes) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(kLanes, columns - c0)) - 1);
      __m512 r[kLanes];
      for (int64_t k = 0; k < kLanes; ++k)
        r[k] = k < n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, cells[k] + 4 * c0)) : _mm512_setzero_ps();
      transpose_16x16(r);
      for (int64_t j = 0; j < std::min<int64_t>(kLanes, columns - c0); ++j)
        _mm512_store_ps(reinterpret_cast<float*>(words + (c0 + j) * kLanes), r[j]);
    }
    __m512 scales[kLanes];
    for (int64_t gi = 0; gi < num_groups; ++gi) {
      const int64_t byte = head_dim / 2 + gi;
      const __m512i word = _mm512_load_si512(words + byte / 4 * kLanes);
      scales[gi] = decode_scales(_mm512_and_si512(_mm512_srli_epi32(word, 8 * (byte % 4)), _mm512_set1_epi32(255)));
    }
    // dword w holds the codes of dims 8w .. 8w + 7: byte b = dims (2b high nibble, 2b + 1 low)
    for (int64_t w = 0; w < head_dim / 8; ++w) {
      const __m512i word = _mm512_load_si512(words + w * kLanes);
      float* dims = tile + 8 * w * kLanes;
      const __m512 word_scales = scales[8 * w / group];
      auto one = [&](int e, __m512i index) {
        const __m512 s = group % 8 == 0 ? word_scales : scales[(8 * w + e) / group];
        _mm512_storeu_ps(dims + e * kLanes, _mm512_mul_ps(_mm512_permutexvar_ps(index, levels), s));
      };
      one(0, _mm512_srli_epi32(word, 4));
      one(1, word);
      one(2, _mm512_srli_epi32(word, 12));
      one(3, _mm512_srli_epi32(word, 8));
      one(4, _mm512_srli_epi32(word, 20));
      one(5, _mm512_srli_epi32(word, 16));
      one(6, _mm512_srli_epi32(word, 28));
      one(7, _mm512_srli_epi32(word, 24));
    }
  }
};

// The K and V decoders of one layout, built once per thread and call.
struct KVDecoders {
  KeyTileDecoder key;
  RowDecoder value;
  KVDecoders(const Tables& t, const Geometry& g)
      : key(t, g.head_dim, g.key_group), value(t, g.head_dim, g.value_group) {}
};

#endif

// Walks the cells of one KV head in token order (no division per token).
class CellCursor {
 public:
  CellCursor(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t pos, const Geometry& g)
      : cache_(cache), blocks_(blocks), kv_head_(kv_head), g_(g), block_(pos / g.block_size),
        offset_(pos % g.block_size) {}

  const uint8_t* next() {
    if (offset_ == g_.block_size) {
      offset_ = 0;
      ++block_;
    }
    return cache_ + ((blocks_[block_] * g_.num_kv_heads + kv_head_) * g_.block_size + offset_++) * g_.cell_bytes;
  }

 private:
  const uint8_t* cache_;
  const int32_t* blocks_;
  int64_t kv_head_;
  const Geometry& g_;
  int64_t block_, offset_;
};

#if !defined(NF4KV_AVX512)
struct KVDecoders {  // the portable path decodes with plain table lookups
  KVDecoders(const Tables&, const Geometry&) {}
};
#endif

// Dequantized keys of tokens [lo, hi) of one request and KV head. AVX-512:
// tiles of 16 tokens [tile][d][16] (tokens past hi are zero); portable:
// row-major [token - lo][d].
void gather_keys(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                 const Geometry& g, const Tables& t, const KVDecoders& decoders, float* keys) {
  const int64_t d = g.head_dim;
  CellCursor cursor(cache, blocks, kv_head, lo, g);
#if defined(NF4KV_AVX512)
  for (int64_t tile_start = lo; tile_start < hi; tile_start += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, hi - tile_start);
    const uint8_t* cells[kLanes];
    for (int64_t k = 0; k < n; ++k) cells[k] = cursor.next();
    decoders.key.decode(cells, n, keys + (tile_start - lo) * d);  // tile index * 16 * d
  }
#else
  for (int64_t pos = lo; pos < hi; ++pos) {
    const uint8_t* cell = cursor.next();
    dequant_row_portable(cell, cell + d / 2, d, g.key_group, t, keys + (pos - lo) * d);
  }
#endif
}

// Dequantized values of tokens [lo, hi), row-major [token - lo][d].
void gather_values(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                   const Geometry& g, const Tables& t, const KVDecoders& decoders, float* values) {
  const int64_t d = g.head_dim;
  CellCursor cursor(cache, blocks, kv_head, lo, g);
  for (int64_t pos = lo; pos < hi; ++pos) {
    const uint8_t* codes = cursor.next() + g.value_offset;
#if defined(NF4KV_AVX512)
    decoders.value.decode(codes, codes + d / 2, values + (pos - lo) * d);
#else
    dequant_row_portable(codes, codes + d / 2, d, g.value_group, t, values + (pos - lo) * d);
#endif
  }
}

// ---- scores[r][t] = scale * q_r . k_t for keys [a, b) and up to 4 query rows sharing them

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
#endif

void scores_rows(const float* const* q, int rows, const float* keys, int64_t a, int64_t b, int64_t head_dim,
                 float scale, float* const* scores) {
#if defined(NF4KV_AVX512)
  for (int r0 = 0; r0 < rows; r0 += 4) {
    switch (std::min(4, rows - r0)) {
      case 1: scores_avx512<1>(q + r0, keys, a, b, head_dim, scale, scores + r0); break;
      case 2: scores_avx512<2>(q + r0, keys, a, b, head_dim, scale, scores + r0); break;
      case 3: scores_avx512<3>(q + r0, keys, a, b, head_dim, scale, scores + r0); break;
      default: scores_avx512<4>(q + r0, keys, a, b, head_dim, scale, scores + r0); break;
    }
  }
#else
  for (int r = 0; r < rows; ++r)
    for (int64_t t = a; t < b; ++t) {
      const float* k = keys + t * head_dim;
      float s = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) s = std::fma(q[r][d], k[d], s);
      scores[r][t] = s * scale;
    }
#endif
}

// ---- softmax over scores[a, b) in place; returns the sum of the exponentials

inline float tree_sum(float* lane) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] = lane[l] + lane[l + width];
  return lane[0];
}

float softmax_numerators(float* scores, int64_t a, int64_t b) {
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
  return tree_sum(lane);
}

// ---- acc[r] += sum_t p[r][t] v_t for keys [a, b): per element an fma chain over t in
// order, continued across calls (fp32 stores and loads are exact), so walking the
// keys in chunks gives the bits of one pass

void accumulate_values_portable(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                                int64_t head_dim, float* const* acc) {
  for (int r = 0; r < rows; ++r)
    for (int64_t t = a; t < b; ++t)
      for (int64_t d = 0; d < head_dim; ++d) acc[r][d] = std::fma(p[r][t], values[t * head_dim + d], acc[r][d]);
}

#if defined(NF4KV_AVX512)
// kRows rows share each loaded value vector; all kRows x kChunks accumulators in registers.
template <int kRows, int kChunks>
void accumulate_values_avx512(const float* const* p, const float* values, int64_t a, int64_t b, float* const* acc) {
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
      accumulate_values_avx512<3, kChunks>(p + r0, values, a, b, acc + r0);
    else if (n == 2)
      accumulate_values_avx512<(kMaxRows >= 2 ? 2 : 1), kChunks>(p + r0, values, a, b, acc + r0);
    else
      accumulate_values_avx512<1, kChunks>(p + r0, values, a, b, acc + r0);
  }
}
#endif

void accumulate_values(const float* const* p, int rows, const float* values, int64_t a, int64_t b,
                       int64_t head_dim, float* const* acc) {
#if defined(NF4KV_AVX512)
  switch (head_dim / kLanes) {
#define NF4KV_CASE(n) \
  case n:             \
    return accumulate_values_passes<n>(p, rows, values, a, b, acc);
    NF4KV_CASE(1) NF4KV_CASE(2) NF4KV_CASE(3) NF4KV_CASE(4) NF4KV_CASE(5) NF4KV_CASE(6) NF4KV_CASE(7)
    NF4KV_CASE(8) NF4KV_CASE(9) NF4KV_CASE(10) NF4KV_CASE(11) NF4KV_CASE(12) NF4KV_CASE(13) NF4KV_CASE(14)
    NF4KV_CASE(15) NF4KV_CASE(16)
#undef NF4KV_CASE
    default:
      break;
  }
#endif
  accumulate_values_portable(p, rows, values, a, b, head_dim, acc);
}

struct Task {
  int64_t request, kv_head, first_query, end_query;
};

void attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
               const at::Tensor& signs,
               const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& levels,
               const at::Tensor& scale_values, double scale, bool causal, int64_t sliding_window,
               int64_t key_group, int64_t value_group, const at::Tensor& out) {
  TORCH_CHECK(query.dtype() == at::kFloat && query.is_contiguous() && query.dim() == 3,
              "query must be contiguous fp32 [num_tokens, num_heads, head_dim]");
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.sizes() == query.sizes());
  TORCH_CHECK(block_table.dtype() == at::kInt && block_table.is_contiguous() && block_table.dim() == 2);
  TORCH_CHECK(seq_lens.dtype() == at::kInt && query_start_loc.dtype() == at::kInt && seq_lens.is_contiguous() &&
              query_start_loc.is_contiguous());
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) >= num_reqs + 1 && block_table.size(0) >= num_reqs);
  Geometry g{};
  g.num_heads = query.size(1);
  g.head_dim = query.size(2);
  check_group(g.head_dim, key_group);
  check_group(g.head_dim, value_group);
  g.key_group = key_group;
  g.value_group = value_group;
  g.value_offset = row_bytes(g.head_dim, key_group);
  g.cell_bytes = g.value_offset + row_bytes(g.head_dim, value_group);
  check_cache(cache, g.cell_bytes);
  g.num_kv_heads = cache.size(1);
  g.block_size = cache.size(2);
  g.max_blocks = block_table.size(1);
  TORCH_CHECK(g.num_heads % g.num_kv_heads == 0, "num_heads ", g.num_heads, " is not a multiple of num_kv_heads ",
              g.num_kv_heads);
  const int64_t group = g.num_heads / g.num_kv_heads;
  TORCH_CHECK(group <= kMaxRowsPerQuery, "at most ", kMaxRowsPerQuery, " query heads per KV head, got ", group);
  const Rotation rotation(signs_of(signs, g.head_dim), g.head_dim);
  const Tables t = tables_of(levels, nullptr, scale_values);
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();

  std::vector<Task> tasks;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t q_len = starts[r + 1] - starts[r];
    TORCH_CHECK(q_len >= 0 && q_len <= lens[r], "request ", r, ": ", q_len, " queries but seq_len ", lens[r]);
    TORCH_CHECK((lens[r] + g.block_size - 1) / g.block_size <= g.max_blocks, "request ", r,
                ": block table too short for seq_len ", lens[r]);
    TORCH_CHECK(starts[r + 1] <= query.size(0), "query_start_loc beyond the query tensor");
    for (int64_t j = 0; j < q_len; j += kQueryTile)
      for (int64_t h = 0; h < g.num_kv_heads; ++h) tasks.push_back({r, h, j, std::min(q_len, j + kQueryTile)});
  }
  const uint8_t* cache_ptr = cache.data_ptr<uint8_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const float* q_ptr = query.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const float sm_scale = static_cast<float>(scale);

  // Longest tasks first, handed out one at a time: a static split gives one thread the late
  // (long) query tiles of a causal prefill and leaves the other idle. Which thread runs a task
  // does not change its bits.
  auto cost = [&](const Task& task) {
    return (task.end_query - task.first_query + 1) * (lens[task.request] - starts[task.request + 1] +
                                                      starts[task.request] + task.end_query);
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next_task{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    const KVDecoders decoders(t, g);
    std::vector<float> keys(static_cast<size_t>(kKeyChunk * g.head_dim));
    std::vector<float> values(keys.size()), scores, query_rows, acc, denominators;
    std::vector<const float*> q_rows;
    std::vector<float*> score_rows, acc_rows;
    for (int64_t i; (i = next_task.fetch_add(1)) < num_tasks;) {
      const Task& task = tasks[i];
      const int32_t* blocks = table + task.request * g.max_blocks;
      const int64_t seq_len = lens[task.request];
      const int64_t context = seq_len - (starts[task.request + 1] - starts[task.request]);
      // Keys query j may read: [first_key(j), end_key(j)), both nondecreasing in j.
      auto first_key = [&](int64_t j) {
        return sliding_window > 0 ? std::max<int64_t>(0, context + j - sliding_window + 1) : 0;
      };
      auto end_key = [&](int64_t j) { return causal ? std::min(context + j + 1, seq_len) : seq_len; };
      const int64_t lo = first_key(task.first_query), hi = end_key(task.end_query - 1);
      const int64_t span = (hi - lo + kLanes - 1) / kLanes * kLanes;  // whole key tiles
      // One row per (query of the task, query head of this KV head).
      const int64_t num_rows = (task.end_query - task.first_query) * group;
      scores.resize(static_cast<size_t>(num_rows * span));
      query_rows.resize(static_cast<size_t>(num_rows * g.head_dim));
      acc.assign(static_cast<size_t>(num_rows * g.head_dim), 0.0f);
      denominators.resize(static_cast<size_t>(num_rows));
      q_rows.resize(num_rows);
      score_rows.resize(num_rows);
      acc_rows.resize(num_rows);
      for (int64_t row = 0; row < num_rows; ++row) {
        const int64_t j = task.first_query + row / group, h = task.kv_head * group + row % group;
        rotation.forward(q_ptr + ((starts[task.request] + j) * g.num_heads + h) * g.head_dim,
                         query_rows.data() + row * g.head_dim);
        q_rows[row] = query_rows.data() + row * g.head_dim;
        score_rows[row] = scores.data() + row * span;
        acc_rows[row] = acc.data() + row * g.head_dim;
      }
      // Keys, then values, a chunk of kKeyChunk tokens at a time (the dequantized chunk stays in
      // L1); chunk starts are lo + multiples of 16, so score tiles line up across chunks.
      const int rows_per_query = static_cast<int>(group);
      // visit(first row of query j, the query's keys within the chunk as [a, b) from c0)
      auto for_each_query = [&](int64_t c0, int64_t c1, auto&& visit) {
        for (int64_t j = task.first_query; j < task.end_query; ++j) {
          const int64_t a = std::max(first_key(j), c0), b = std::min(end_key(j), c1);
          if (a < b) visit((j - task.first_query) * group, a - c0, b - c0);
        }
      };
      for (int64_t c0 = lo; c0 < hi; c0 += kKeyChunk) {
        const int64_t c1 = std::min(hi, c0 + kKeyChunk);
        gather_keys(cache_ptr, blocks, task.kv_head, c0, c1, g, t, decoders, keys.data());
        for_each_query(c0, c1, [&](int64_t row, int64_t a, int64_t b) {
          float* shifted[kMaxRowsPerQuery];
          for (int r = 0; r < rows_per_query; ++r) shifted[r] = score_rows[row + r] + (c0 - lo);
          scores_rows(q_rows.data() + row, rows_per_query, keys.data(), a, b, g.head_dim, sm_scale, shifted);
        });
      }
      for (int64_t row = 0; row < num_rows; ++row) {
        const int64_t j = task.first_query + row / group;
        denominators[row] = softmax_numerators(score_rows[row], first_key(j) - lo, end_key(j) - lo);
      }
      for (int64_t c0 = lo; c0 < hi; c0 += kKeyChunk) {
        const int64_t c1 = std::min(hi, c0 + kKeyChunk);
        gather_values(cache_ptr, blocks, task.kv_head, c0, c1, g, t, decoders, values.data());
        for_each_query(c0, c1, [&](int64_t row, int64_t a, int64_t b) {
          const float* shifted[kMaxRowsPerQuery];
          for (int r = 0; r < rows_per_query; ++r) shifted[r] = score_rows[row + r] + (c0 - lo);
          accumulate_values(shifted, rows_per_query, values.data(), a, b, g.head_dim, acc_rows.data() + row);
        });
      }
      for (int64_t row = 0; row < num_rows; ++row) {
        const int64_t j = task.first_query + row / group, h = task.kv_head * group + row % group;
        float* out = out_ptr + ((starts[task.request] + j) * g.num_heads + h) * g.head_dim;
        if (end_key(j) <= first_key(j)) {  // cannot happen for decoders (a query sees itself)
          std::fill(out, out + g.head_dim, 0.0f);
          continue;
        }
        const float inv = 1.0f / denominators[row];
        for (int64_t d = 0; d < g.head_dim; ++d) acc_rows[row][d] = acc_rows[row][d] * inv;
        rotation.inverse(acc_rows[row], out);
      }
    }
  });
}

}  // namespace

// The op namespace is a build parameter so that a second build (the portable
// path, in the tests) can be loaded beside the first.
#ifndef NF4KV_OPS
#define NF4KV_OPS nf4kv_cpu
#endif
#define NF4KV_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define NF4KV_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

NF4KV_LIBRARY(NF4KV_OPS, m) {
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor signs, Tensor levels, "
      "Tensor midpoints, Tensor scale_values, int key_group, int value_group, int search_steps) -> ()");
  m.def(
      "attention(Tensor query, Tensor cache, Tensor block_table, Tensor signs, Tensor seq_lens, "
      "Tensor query_start_loc, "
      "Tensor levels, Tensor scale_values, float scale, bool causal, int sliding_window, int key_group, "
      "int value_group, Tensor(a!) out) -> ()");
  m.def("has_avx512() -> bool", +[]() { return kAvx512; });
}

NF4KV_LIBRARY_IMPL(NF4KV_OPS, CPU, m) {
  m.impl("store", &store);
  m.impl("attention", &attention);
}

}  // namespace nf4kv
