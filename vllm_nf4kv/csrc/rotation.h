// The seeded Hadamard rotation of vllm_nf4kv/rotation.py, bit for bit: the store rotates keys
// and values before quantizing them, attention rotates queries in and outputs back (the
// rotation is orthogonal, so attention in the rotated space is exact).

#pragma once

#include <vector>

#include "common.h"

namespace nf4kv {
namespace {

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
    double y[CPU_MAX_HEAD_DIM];
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
    double y[CPU_MAX_HEAD_DIM];
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
        for (stride = 8; stride < size; stride *= 2) butterflies_across_registers(b, size, stride);
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

  // One stage of stride 8 or more: partners are whole registers apart, so each register pair
  // gives first + second and first - second, the scalar loop's operations eight at a time.
  static void butterflies_across_registers(double* b, int64_t size, int64_t stride) {
    for (int64_t i = 0; i < size; i += 2 * stride)
      for (int64_t j = i; j < i + stride; j += 8) {
        const __m512d first = _mm512_loadu_pd(b + j), second = _mm512_loadu_pd(b + j + stride);
        _mm512_storeu_pd(b + j, _mm512_add_pd(first, second));
        _mm512_storeu_pd(b + j + stride, _mm512_sub_pd(first, second));
      }
  }
#endif

  const double* signs_;
  int64_t head_dim_;
  std::vector<int64_t> blocks_;
};

}  // namespace
}  // namespace nf4kv
