// SIMD and threading helpers shared by ftjax's native CPU kernels (cpu_*.cc beside this
// file; built together by `pallas_kernels/cpu_native.py`, which hashes this header into
// the library's cache key).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ftjax_cpu {

namespace ffi = xla::ffi;

// bfloat16 as its bits (XLA FFI maps BF16 to uint16_t).
using bf16 = uint16_t;

inline float to_float(float x) { return x; }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// W-lane float vectors: AVX-512, AVX2, or one lane. `load` widens int8 and bf16 to float.
#if defined(__AVX512F__)
constexpr int64_t W = 16;
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float x) { return _mm512_set1_ps(x); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec load(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(Vec a) { return _mm512_reduce_add_ps(a); }
inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float hmax(Vec a) { return _mm512_reduce_max_ps(a); }
inline Vec iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// Lanes >= n replaced by fill.
inline Vec keep_below(Vec x, int64_t n, float fill) {
  const __mmask16 k = _mm512_cmplt_epi32_mask(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(n, 0, W))));
  return _mm512_mask_blend_ps(k, _mm512_set1_ps(fill), x);
}
inline Vec vfloor(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {  // 2^n for integral n in [-126, 127]
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t W = 8;
using Vec = __m256;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset(float x) { return _mm256_set1_ps(x); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(Vec a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float hmax(Vec a) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
inline Vec iota() { return _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7); }
inline Vec keep_below(Vec x, int64_t n, float fill) {
  const __m256i k = _mm256_cmpgt_epi32(
      _mm256_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(n, 0, W))),
      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(_mm256_set1_ps(fill), x, _mm256_castsi256_ps(k));
}
inline Vec vfloor(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline Vec pow2(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
#else
constexpr int64_t W = 1;
using Vec = float;
inline Vec vzero() { return 0.0f; }
inline Vec vset(float x) { return x; }
inline Vec load(const float* p) { return *p; }
inline Vec load(const int8_t* p) { return static_cast<float>(*p); }
inline Vec load(const bf16* p) { return to_float(*p); }
inline Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float hsum(Vec a) { return a; }
inline void store(float* p, Vec a) { *p = a; }
inline Vec vmax(Vec a, Vec b) { return std::max(a, b); }
inline float hmax(Vec a) { return a; }
inline Vec iota() { return 0.0f; }
inline Vec keep_below(Vec x, int64_t n, float fill) { return n > 0 ? x : fill; }
inline Vec vfloor(Vec x) { return std::floor(x); }
inline Vec pow2(Vec n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
#endif

// Items 0..items-1 shared out over XLA's intra-op pool: the caller works too, and waits
// only for items some thread has claimed (a helper that starts after all are claimed
// touches nothing but the shared counters), so a busy or absent pool never deadlocks
// it. fn(item, scratch): scratch is a vector private to the worker running the item.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t items, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto sh = std::make_shared<Shared>();
  auto work = [sh, &fn, items]() {
    std::vector<float> scratch;
    for (int64_t i; (i = sh->next.fetch_add(1)) < items;) {
      fn(i, scratch);
      sh->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(threads, items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (sh->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

inline int64_t num_threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

}  // namespace ftjax_cpu
