// NF4 KV-cache kernels for vLLM's CPU platform: quantize-on-write and paged
// attention that dequantizes inside the dot products.
//
// Ground truth is vllm_nf4kv/reference.py. The store kernel reproduces it byte
// for byte (same integer scale encoding, same midpoint counting, same pairwise
// error sums; this file is compiled with -ffp-contract=off so no a*b+c is
// fused behind our back). The attention kernel reads the same fp32 values the
// reference decodes (level * scale) and accumulates in fp32 in an order that
// depends only on a query's own position: every score is a dot product over d
// in order, every output a sum over keys in order, and softmax sums use 16
// lanes indexed from the query's first key. So a query's result is the same
// whatever else is in the batch, which is what makes a prefix-cache hit,
// chunked prefill and a cold run reproduce each other bit for bit.
//
// Layouts (see vllm_nf4kv/format.py):
//   cache  uint8 [num_blocks, num_kv_heads, block_size, cell_bytes]
//   cell   K codes (D/2) | K scale codes (D/gk) | V codes (D/2) | V scale codes (D/gv)
//   codes  two NF4 indices a byte, the even element in the high nibble
// Queries, keys and values arrive already rotated (torch does the fp64
// rotation, shared with the reference); outputs leave in the rotated space.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
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

// reference.sanitize: NaN -> 0, +-inf -> +-SCALE_MAX.
inline float sanitize(float x) {
  if (std::isnan(x)) return 0.0f;
  if (std::isinf(x)) return x > 0 ? kScaleMax : -kScaleMax;
  return x;
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

// One rotated head vector -> codes | scale codes (reference.quantize_groups + packing).
void quantize_row(const float* x_in, int head_dim, int group, int search_steps, const Tables& t,
                  uint8_t* row) {
  float x[kMaxHeadDim];
  for (int i = 0; i < head_dim; ++i) x[i] = sanitize(x_in[i]);
  uint8_t* scale_codes = row + head_dim / 2;
  uint8_t codes[kMaxHeadDim];
  uint8_t trial[kMaxHeadDim];
  float err[kMaxHeadDim];
  for (int g0 = 0, gi = 0; g0 < head_dim; g0 += group, ++gi) {
    float absmax = 0.0f;
    for (int i = 0; i < group; ++i) absmax = std::max(absmax, std::fabs(x[g0 + i]));
    const int32_t first = encode_scale_ceil(absmax);
    float best_err = 0.0f;
    int32_t best_code = first;
    for (int step = 0; step < search_steps; ++step) {
      const int32_t candidate = first > step ? first - step : first;
      const float scale = t.scale_values[candidate];
      const float safe = scale > 0.0f ? scale : 1.0f;
      for (int i = 0; i < group; ++i) {
        const float v = std::min(std::max(x[g0 + i] / safe, -1.0f), 1.0f);
        trial[i] = nf4_code(v, t.midpoints);
        const float diff = t.levels[trial[i]] * scale - x[g0 + i];
        err[i] = diff * diff;
      }
      const float total = pairwise_sum(err, group);
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

Tables tables_of(const at::Tensor& levels, const at::Tensor& midpoints, const at::Tensor& scale_values) {
  TORCH_CHECK(levels.dtype() == at::kFloat && levels.numel() == 16 && levels.is_contiguous());
  TORCH_CHECK(midpoints.dtype() == at::kFloat && midpoints.numel() == 15 && midpoints.is_contiguous());
  TORCH_CHECK(scale_values.dtype() == at::kFloat && scale_values.numel() == 256 &&
              scale_values.is_contiguous());
  return {levels.data_ptr<float>(), midpoints.data_ptr<float>(), scale_values.data_ptr<float>()};
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
  const Tables t = tables_of(levels, midpoints, scale_values);
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  uint8_t* base = cache.data_ptr<uint8_t>();
  for (int64_t i = 0; i < num_tokens; ++i)
    TORCH_CHECK(slots[i] < num_blocks * block_size, "slot ", slots[i], " is outside the cache");
  at::parallel_for(0, num_tokens * num_heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t token = item / num_heads, head = item % num_heads;
      const int64_t slot = slots[token];
      if (slot < 0) continue;  // padding tokens
      uint8_t* cell = base + (((slot / block_size) * num_heads + head) * block_size + slot % block_size) * cell_bytes;
      quantize_row(k + item * head_dim, head_dim, key_group, search_steps, t, cell);
      quantize_row(v + item * head_dim, head_dim, value_group, search_steps, t, cell + key_bytes);
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

// The arithmetic below exists twice: AVX-512 intrinsics, and portable loops
// that do the same fp32 operations in the same order (so the two give the same
// bits; tests build both). Per (query, key): a score is 16 lane partials, each
// an fma chain over the head dim in steps of 16, summed by the fixed tree
// lanes (i, i+8), then (i, i+4), (i, i+2), (0, 1).

#if defined(__AVX512F__)
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

#if defined(__AVX512F__)
struct RowDecoder {
  __m512 levels;
  __m512i interleave;  // (high nibble i, low nibble i) pairs: 0, 16, 1, 17, ...
  __m512i group_of[kMaxHeadDim / kLanes];
  int64_t head_dim, num_groups;

  RowDecoder(const Tables& t, int64_t head_dim_, int64_t group) : head_dim(head_dim_), num_groups(head_dim_ / group) {
    levels = _mm512_loadu_ps(t.levels);
    alignas(64) int32_t idx[kLanes];
    for (int l = 0; l < kLanes; ++l) idx[l] = (l / 2) + (l % 2) * kLanes;
    interleave = _mm512_load_si512(idx);
    for (int64_t c = 0; c < head_dim / kLanes; ++c) {
      for (int l = 0; l < kLanes; ++l) idx[l] = static_cast<int32_t>((c * kLanes + l) / group);
      group_of[c] = _mm512_load_si512(idx);
    }
  }

  void decode(const uint8_t* codes, const uint8_t* scale_codes, const float* scale_values, float* out) const {
    alignas(64) float scales[kLanes] = {};
    for (int64_t g = 0; g < num_groups; ++g) scales[g] = scale_values[scale_codes[g]];
    const __m512 row_scales = _mm512_load_ps(scales);
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
#endif

// Dequantize tokens [lo, hi) of one request and KV head into row-major
// K and V buffers ([token - lo][head_dim]).
void gather_head(const uint8_t* cache, const int32_t* blocks, int64_t kv_head, int64_t lo, int64_t hi,
                 const Geometry& g, const Tables& t, float* keys, float* values) {
  const int64_t d = g.head_dim;
#if defined(__AVX512F__)
  const RowDecoder key_decoder(t, d, g.key_group), value_decoder(t, d, g.value_group);
#endif
  for (int64_t pos = lo; pos < hi; ++pos) {
    const int64_t block = blocks[pos / g.block_size];
    const uint8_t* cell =
        cache + ((block * g.num_kv_heads + kv_head) * g.block_size + pos % g.block_size) * g.cell_bytes;
    const uint8_t* v_codes = cell + g.value_offset;
    float* k_out = keys + (pos - lo) * d;
    float* v_out = values + (pos - lo) * d;
#if defined(__AVX512F__)
    key_decoder.decode(cell, cell + d / 2, t.scale_values, k_out);
    value_decoder.decode(v_codes, v_codes + d / 2, t.scale_values, v_out);
#else
    dequant_row_portable(cell, cell + d / 2, d, g.key_group, t, k_out);
    dequant_row_portable(v_codes, v_codes + d / 2, d, g.value_group, t, v_out);
#endif
  }
}

// ---- scores: scale * q . k for keys [a, b) (row-major K)

inline float tree_sum(float* lane) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] = lane[l] + lane[l + width];
  return lane[0];
}

void scores_portable(const float* q, const float* keys, int64_t a, int64_t b, int64_t head_dim, float scale,
                     float* scores) {
  for (int64_t t = a; t < b; ++t) {
    const float* k = keys + t * head_dim;
    float lane[kLanes] = {};
    for (int64_t c = 0; c < head_dim; c += kLanes)
      for (int l = 0; l < kLanes; ++l) lane[l] = std::fma(q[c + l], k[c + l], lane[l]);
    scores[t] = tree_sum(lane) * scale;
  }
}

#if defined(__AVX512F__)
// Sums each of 16 vectors' lanes with tree_sum's pairing; result lane k is vector k's sum.
inline __m512 tree_sum_16(__m512* v) {
  __m512 w[8], u[4], z[2];
  for (int k = 0; k < 8; ++k)  // lanes (i, i+8): 256-bit halves
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)  // (i, i+4): 128-bit quarters
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // (i, i+2) within quarters
    z[k] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(u[2 * k], u[2 * k + 1], 0xEE));
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  // lane 4q + p holds vector 4p + q
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

void scores_avx512(const float* q, const float* keys, int64_t a, int64_t b, int64_t head_dim, float scale,
                   float* scores) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t t0 = a; t0 < b; t0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, b - t0);
    __m512 partial[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
      __m512 acc = _mm512_setzero_ps();
      if (k < n) {
        const float* key = keys + (t0 + k) * head_dim;
        for (int64_t c = 0; c < head_dim; c += kLanes)
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(key + c), acc);
      }
      partial[k] = acc;
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    _mm512_mask_storeu_ps(scores + t0, mask, _mm512_mul_ps(tree_sum_16(partial), scale_v));
  }
}
#endif

// ---- softmax over scores[a, b) in place; returns the sum of the exponentials

float softmax_numerators(float* scores, int64_t a, int64_t b) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = a; t < b; ++t) m = std::max(m, scores[t]);
  float lane[kLanes] = {};
  for (int64_t t = a; t < b; ++t) {
    scores[t] = exp_nonpositive(scores[t] - m);
    lane[(t - a) % kLanes] += scores[t];
  }
  return tree_sum(lane);
}

// ---- out = sum_t p_t v_t / denominator, an fma chain over t per element

void weighted_values_portable(const float* p, const float* values, int64_t a, int64_t b, int64_t head_dim,
                              float denominator, float* out) {
  float acc[kMaxHeadDim];
  std::fill(acc, acc + head_dim, 0.0f);
  for (int64_t t = a; t < b; ++t)
    for (int64_t d = 0; d < head_dim; ++d) acc[d] = std::fma(p[t], values[t * head_dim + d], acc[d]);
  const float inv = 1.0f / denominator;
  for (int64_t d = 0; d < head_dim; ++d) out[d] = acc[d] * inv;
}

#if defined(__AVX512F__)
template <int kChunks>  // head_dim / 16, so the accumulators live in registers
void weighted_values_avx512(const float* p, const float* values, int64_t a, int64_t b, float denominator,
                            float* out) {
  constexpr int64_t d = kChunks * kLanes;
  __m512 acc[kChunks];
  for (int c = 0; c < kChunks; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t t = a; t < b; ++t) {
    const __m512 weight = _mm512_set1_ps(p[t]);
    for (int c = 0; c < kChunks; ++c)
      acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(values + t * d + c * kLanes), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / denominator);
  for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(out + c * kLanes, _mm512_mul_ps(acc[c], inv));
}
#endif

void weighted_values(const float* p, const float* values, int64_t a, int64_t b, int64_t head_dim,
                     float denominator, float* out) {
#if defined(__AVX512F__)
  switch (head_dim / kLanes) {
#define NF4KV_CASE(n) \
  case n:             \
    return weighted_values_avx512<n>(p, values, a, b, denominator, out);
    NF4KV_CASE(1) NF4KV_CASE(2) NF4KV_CASE(3) NF4KV_CASE(4) NF4KV_CASE(5) NF4KV_CASE(6) NF4KV_CASE(7)
    NF4KV_CASE(8) NF4KV_CASE(9) NF4KV_CASE(10) NF4KV_CASE(11) NF4KV_CASE(12) NF4KV_CASE(13) NF4KV_CASE(14)
    NF4KV_CASE(15) NF4KV_CASE(16)
#undef NF4KV_CASE
    default:
      break;
  }
#endif
  weighted_values_portable(p, values, a, b, head_dim, denominator, out);
}

// softmax(scale * q . K[a:b]) @ V[a:b] for one query row (buffer rows [a, b)).
void attend_row(const float* q, const float* keys, const float* values, int64_t a, int64_t b, int64_t head_dim,
                float scale, float* scores, float* out) {
  if (b <= a) {
    std::fill(out, out + head_dim, 0.0f);
    return;
  }
#if defined(__AVX512F__)
  scores_avx512(q, keys, a, b, head_dim, scale, scores);
#else
  scores_portable(q, keys, a, b, head_dim, scale, scores);
#endif
  const float denominator = softmax_numerators(scores, a, b);
  weighted_values(scores, values, a, b, head_dim, denominator, out);
}

struct Task {
  int64_t request, kv_head, first_query, end_query;
};

void attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
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
  const Tables t{levels.data_ptr<float>(), nullptr, scale_values.data_ptr<float>()};
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

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> keys, values, scores;
    for (int64_t i = begin; i < end; ++i) {
      const Task& task = tasks[i];
      const int64_t seq_len = lens[task.request];
      const int64_t context = seq_len - (starts[task.request + 1] - starts[task.request]);
      // Keys query j may read: [first_key(j), end_key(j)), both nondecreasing in j.
      auto first_key = [&](int64_t j) {
        return sliding_window > 0 ? std::max<int64_t>(0, context + j - sliding_window + 1) : 0;
      };
      auto end_key = [&](int64_t j) { return causal ? std::min(context + j + 1, seq_len) : seq_len; };
      const int64_t lo = first_key(task.first_query), hi = end_key(task.end_query - 1);
      keys.resize(static_cast<size_t>((hi - lo) * g.head_dim));
      values.resize(keys.size());
      scores.resize(static_cast<size_t>(hi - lo + kLanes));
      gather_head(cache_ptr, table + task.request * g.max_blocks, task.kv_head, lo, hi, g, t, keys.data(),
                  values.data());
      for (int64_t j = task.first_query; j < task.end_query; ++j) {
        const int64_t a = first_key(j) - lo, b = end_key(j) - lo;
        const int64_t token = starts[task.request] + j;
        for (int64_t h = task.kv_head * group; h < (task.kv_head + 1) * group; ++h) {
          const int64_t offset = (token * g.num_heads + h) * g.head_dim;
          attend_row(q_ptr + offset, keys.data(), values.data(), a, b, g.head_dim, sm_scale, scores.data(),
                     out_ptr + offset);
        }
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
      "store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor levels, "
      "Tensor midpoints, Tensor scale_values, int key_group, int value_group, int search_steps) -> ()");
  m.def(
      "attention(Tensor query, Tensor cache, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, "
      "Tensor levels, Tensor scale_values, float scale, bool causal, int sliding_window, int key_group, "
      "int value_group, Tensor(a!) out) -> ()");
  m.def("has_avx512() -> bool", +[]() { return kAvx512; });
}

NF4KV_LIBRARY_IMPL(NF4KV_OPS, CPU, m) {
  m.impl("store", &store);
  m.impl("attention", &attention);
}

}  // namespace nf4kv
