// Matmuls of a few rows (a decode step's) against float32, bfloat16 or int8 weights, on
// CPU: the weight is streamed once from memory and every row's products are taken from
// it while it is in registers; bf16 and int8 are widened to float32 in registers, so a
// step reads 2 or 1 bytes a weight instead of 4. An XLA FFI custom call; built and loaded
// by `pallas_kernels/cpu_native.py`, wrapped (and documented) by
// `pallas_kernels/cpu_matmul.py`, checked against numpy in tests/test_cpu_matmul.py.
//
// Why: XLA:CPU's dots read gpt2's float32 weights at 27-30 GB/s for one row but 12-18
// GB/s for 2 to 16 rows, and bf16 / int8 weights at 0.3-1.8 GB/s (examples/
// dot_roofline.py, 2-core AMD EPYC), so a decode step of 8 rows cost ~2.3x one row's.
//
// bf16 x against bf16 w at 2+ rows: bf16 pairs multiplied by `vdpbf16ps` (below), where
// the CPU has AVX-512 BF16; other bf16 x is widened to float32 first.
//
// x float32 (or bf16) [M, K]; y float32 [M, N] = x @ w (* scale):
//   "kn": w [K, N] (a Linear kernel, contraction first), scale [N] or none;
//   "nk": w [N, K] (an embedding table as the LM head), scale [N] or none.
// Work, shared out over XLA's intra-op thread pool: "kn" gives each thread a range of
// weight rows, a contiguous stretch of memory it streams 8 rows at a time through every
// column into its own partial sums, added after (splitting the columns instead walked
// each row in short runs: the 72 matmuls of a gpt2-124m decode step at 8 rows, cold,
// 24-35 -> 19-22 ms float32, and 17 -> 11 ms for one bf16 row); "nk" gives items of
// weight rows (contiguous already), 2 at a time against 8 x rows, dot products along K.

#include <type_traits>

#include "cpu_simd.h"

namespace {

using namespace ftjax_cpu;

constexpr int64_t KB = 8;       // weight rows per pass ("kn")
#ifndef NKPF_DEF
#define NKPF_DEF 1
#endif
#ifndef PF_DEF
#define PF_DEF 8
#endif
#ifndef NV_DEF
#define NV_DEF 2
#endif
#ifndef MR_DEF
#define MR_DEF 8
#endif
constexpr int NV = NV_DEF;      // vectors of columns per register tile ("kn")
constexpr int MR = MR_DEF;      // rows of x per register tile ("kn")
constexpr int64_t TN = NV * W;  // output columns per register tile

// y[m, c0:c1] (row stride N) += x[m, k0:k0+kb] @ w[k0:k0+kb, c0:c1], for MB rows of x
// (row stride K) starting at m0; c1 - c0 a multiple of TN.
template <typename WT, int MB>
inline void kn_tile_rows(const float* __restrict x, const WT* __restrict w, float* __restrict y,
                         int64_t K, int64_t N, int64_t m0, int64_t k0, int64_t kb, int64_t c0,
                         int64_t c1) {
  for (int64_t c = c0; c < c1; c += TN) {
    Vec acc[MB][NV];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = load(y + (m0 + m) * N + c + v * W);
    for (int64_t k = k0; k < k0 + kb; ++k) {
#if PF_DEF
      if (k + PF_DEF < K) {
        const char* p = reinterpret_cast<const char*>(w + (k + PF_DEF) * N + c);
        for (int64_t b = 0; b < static_cast<int64_t>(TN * sizeof(WT)); b += 64)
          _mm_prefetch(p + b, _MM_HINT_T0);
      }
#endif
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = load(w + k * N + c + v * W);
      for (int m = 0; m < MB; ++m) {
        const Vec xv = vset(x[(m0 + m) * K + k]);
        for (int v = 0; v < NV; ++v) acc[m][v] = fma(xv, wv[v], acc[m][v]);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < NV; ++v) store(y + (m0 + m) * N + c + v * W, acc[m][v]);
  }
}

template <typename WT>
inline void kn_tile(const float* x, const WT* w, float* y, int64_t K, int64_t N, int64_t m0,
                    int64_t mb, int64_t k0, int64_t kb, int64_t c0, int64_t c1) {
  switch (mb) {
    case 1: return kn_tile_rows<WT, 1>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 2: return kn_tile_rows<WT, 2>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 3: return kn_tile_rows<WT, 3>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 4: return kn_tile_rows<WT, 4>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 5: return kn_tile_rows<WT, 5>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 6: return kn_tile_rows<WT, 6>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 7: return kn_tile_rows<WT, 7>(x, w, y, K, N, m0, k0, kb, c0, c1);
    default: return kn_tile_rows<WT, MR>(x, w, y, K, N, m0, k0, kb, c0, c1);
  }
}

// y[m0:m0+MB, n0:n0+NB] = x[m0:m0+MB] . w[n0:n0+NB] along K (w rows of K).
template <typename WT, int MB, int NB>
inline void nk_block(const float* __restrict x, const WT* __restrict w, float* __restrict y,
                     int64_t K, int64_t N, int64_t m0, int64_t n0) {
  Vec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    Vec wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load(w + (n0 + j) * K + k);
    for (int m = 0; m < MB; ++m) {
      const Vec xv = load(x + (m0 + m) * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = fma(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[m][j]);
      for (int64_t t = k; t < K; ++t) s += x[(m0 + m) * K + t] * to_float(w[(n0 + j) * K + t]);
      y[(m0 + m) * N + n0 + j] = s;
    }
}

#ifndef NKB_DEF
#define NKB_DEF 2
#endif
#ifndef NKM_DEF
#define NKM_DEF 8
#endif
constexpr int NKB = NKB_DEF;  // weight rows per block ("nk")
constexpr int NKM = NKM_DEF;  // rows of x per block ("nk")

template <typename WT, int NB>
inline void nk_rows(const float* x, const WT* w, float* y, int64_t M, int64_t K, int64_t N,
                    int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + NKM <= M; m0 += NKM) nk_block<WT, NKM, NB>(x, w, y, K, N, m0, n0);
  for (; m0 < M; ++m0) nk_block<WT, 1, NB>(x, w, y, K, N, m0, n0);
}

// Rows [r0, r1) of w, NKB at a time (then one at a time), prefetching the next block:
// `rows(n, nb)` computes y[:, n:n+nb] for nb an std::integral_constant; then * scale.
template <typename WT, typename Rows>
void nk_walk(const WT* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
             int64_t r0, int64_t r1, const Rows& rows) {
  int64_t n = r0;
  for (; n + NKB <= r1; n += NKB) {
#if NKPF_DEF
    if (n + 2 * NKB <= r1) {
      const char* p = reinterpret_cast<const char*>(w + (n + NKB) * K);
      for (int64_t b = 0; b < static_cast<int64_t>(NKB * K * sizeof(WT)); b += 64)
        _mm_prefetch(p + b, _MM_HINT_T0);
    }
#endif
    rows(n, std::integral_constant<int, NKB>());
  }
  for (; n < r1; ++n) rows(n, std::integral_constant<int, 1>());
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = r0; c < r1; ++c) y[m * N + c] *= scale[c];
}

// Rows [r0, r1) of w: y[:, r0:r1] = x @ w[r0:r1]^T (* scale).
template <typename WT>
void nk_item(const float* x, const WT* w, const float* scale, float* y, int64_t M, int64_t K,
             int64_t N, int64_t r0, int64_t r1) {
  nk_walk(w, scale, y, M, K, N, r0, r1, [=](int64_t n, auto nb) {
    nk_rows<WT, decltype(nb)::value>(x, w, y, M, K, N, n);
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// "nk" float32 at 2..8 rows (a tied LM head's decode step): the rows of x in the 8 lanes
// of a ymm vector (x transposed once per call into xt [K][8]), each weight element
// broadcast against them: no horizontal sums, NKL weight rows (contiguous) per block.
constexpr int NKL = 8;
constexpr int64_t LANE_ROWS = 8;  // most rows of x this path takes

template <int R>
inline void nk_lanes_block(const float* __restrict xt, const float* __restrict w,
                           float* __restrict y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  __m256 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
  const float* wr = w + n0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 xv = _mm256_loadu_ps(xt + k * 8);
    for (int j = 0; j < R; ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(wr + j * K + k), xv, acc[j]);
  }
  alignas(32) float t[R][8];
  for (int j = 0; j < R; ++j) _mm256_store_ps(t[j], acc[j]);
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < R; ++j) y[m * N + n0 + j] = t[j][m];
}

// Rows [r0, r1) of w: y[:, r0:r1] = x @ w[r0:r1]^T (* scale), x given as xt [K][8].
inline void nk_lanes_item(const float* xt, const float* w, const float* scale, float* y,
                          int64_t M, int64_t K, int64_t N, int64_t r0, int64_t r1) {
  int64_t n = r0;
  for (; n + NKL <= r1; n += NKL) nk_lanes_block<NKL>(xt, w, y, M, K, N, n);
  for (; n < r1; ++n) nk_lanes_block<1>(xt, w, y, M, K, N, n);
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = r0; c < r1; ++c) y[m * N + c] *= scale[c];
}
#else
constexpr int64_t LANE_ROWS = 0;
inline void nk_lanes_item(const float*, const float*, const float*, float*, int64_t, int64_t,
                          int64_t, int64_t, int64_t) {}
#endif

// "kn" by ranges of weight rows: item i streams rows [k0, k1) of w, a contiguous stretch
// of memory, through every column into its own partial sums ([M, N] float32); the
// partials are added after. `tile(m0, mb, k0, kb, c0, c1, out)` accumulates
// out[m0:m0+mb, c0:c1] += x[m0:m0+mb, k0:k0+kb] @ w[k0:k0+kb, c0:c1]; `tail(c, m)` is
// column c's (a column past the last whole tile) value for row m, summed over all K.
template <typename Tile, typename Tail>
void kn_by_rows(ffi::ThreadPool& pool, int64_t items, const float* scale, float* y, int64_t M,
                int64_t K, int64_t N, int64_t tn, int64_t kstep, const Tile& tile,
                const Tail& tail) {
  const int64_t cv = N / tn * tn, steps = (K + kstep - 1) / kstep;
  items = std::clamp<int64_t>(items, 1, steps);
  // One buffer per calling thread, kept between calls (a fresh one per call would be
  // page-faulted in every time).
  thread_local std::vector<float> partial;
  const size_t need = static_cast<size_t>(items) * M * N;
  if (partial.size() < need) partial.resize(need);
  std::fill(partial.begin(), partial.begin() + need, 0.0f);
  float* part = partial.data();
  parallel_for(pool, items, [=](int64_t i, std::vector<float>&) {
    const int64_t k0 = steps * i / items * kstep, k1 = std::min(K, steps * (i + 1) / items * kstep);
    float* out = part + i * M * N;
    for (int64_t kb0 = k0; kb0 < k1; kb0 += KB)
      for (int64_t m0 = 0; m0 < M; m0 += 8)
        tile(m0, std::min<int64_t>(8, M - m0), kb0, std::min(KB, k1 - kb0), int64_t{0}, cv, out);
  });
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * N;
    std::copy(part + m * N, part + m * N + cv, row);
    for (int64_t i = 1; i < items; ++i) {
      const float* p = part + i * M * N + m * N;
      int64_t c = 0;
      for (; c + W <= cv; c += W) store(row + c, fma(vset(1.0f), load(p + c), load(row + c)));
      for (; c < cv; ++c) row[c] += p[c];
    }
    for (int64_t c = cv; c < N; ++c) row[c] = tail(c, m);
    if (scale)
      for (int64_t c = 0; c < N; ++c) row[c] *= scale[c];
  }
}

// y = x @ w (* scale): "kn" by ranges of weight rows (`kn_by_rows`, tiles of tn columns,
// row ranges in multiples of kstep), "nk" by items of weight rows, a few per thread
// (`nk_rows_item(r0, r1)`; the rows are contiguous already).
template <typename XT, typename WT, typename Tile, typename NkItem>
void run_split(ffi::ThreadPool& pool, bool nk, const XT* x, const WT* w, const float* scale,
               float* y, int64_t M, int64_t K, int64_t N, int64_t tn, int64_t kstep,
               const Tile& tile, const NkItem& nk_rows_item) {
  if (!nk) {
    kn_by_rows(pool, num_threads(pool), scale, y, M, K, N, tn, kstep, tile,
               [=](int64_t c, int64_t m) {
                 float t = 0.0f;
                 for (int64_t k = 0; k < K; ++k) t += to_float(x[m * K + k]) * to_float(w[k * N + c]);
                 return t;
               });
    return;
  }
  const int64_t units = (N + NKB - 1) / NKB;
  const int64_t items = std::clamp<int64_t>(4 * num_threads(pool), 1, units);
  parallel_for(pool, items, [=](int64_t i, std::vector<float>&) {
    const int64_t r0 = std::min(N, units * i / items * NKB);
    const int64_t r1 = std::min(N, units * (i + 1) / items * NKB);
    if (r0 < r1) nk_rows_item(r0, r1);
  });
}

template <typename WT>
void run(ffi::ThreadPool& pool, bool nk, const float* x, const WT* w, const float* scale,
         float* y, int64_t M, int64_t K, int64_t N) {
  // float32 "nk" at 2..LANE_ROWS rows: x transposed into the lanes (one buffer per
  // calling thread, kept between calls).
  const bool lanes = std::is_same<WT, float>::value && nk && M >= 2 && M <= LANE_ROWS;
  thread_local std::vector<float> xt_buffer;
  const float* xt = nullptr;
  if (lanes) {
    xt_buffer.assign(static_cast<size_t>(K) * 8, 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xt_buffer[k * 8 + m] = x[m * K + k];
    xt = xt_buffer.data();
  }
  run_split(
      pool, nk, x, w, scale, y, M, K, N, TN, 1,
      [=](int64_t m0, int64_t mb, int64_t k0, int64_t kb, int64_t c0, int64_t c1, float* out) {
        kn_tile(x, w, out, K, N, m0, mb, k0, kb, c0, c1);
      },
      [=](int64_t r0, int64_t r1) {
        if constexpr (std::is_same<WT, float>::value) {
          if (lanes) return nk_lanes_item(xt, w, scale, y, M, K, N, r0, r1);
        }
        nk_item(x, w, scale, y, M, K, N, r0, r1);
      });
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 activations against bf16 weights at 2+ rows (a bf16 model's decode step): the dots
// are compute-bound there once the weight is widened in registers (8 float32 FMAs per 16
// weights at 8 rows), so they take `vdpbf16ps` instead: two bf16 products per float32
// lane and instruction, exact in float32 and summed in float32 (the same sums, in pairs).
// "kn" interleaves two weight rows into (k, k+1) pairs per column; "nk" rows already are.
constexpr int64_t PT = 32;  // columns per "kn" tile: two vectors of 16 float32 sums

alignas(64) constexpr uint16_t kPairOrder[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                 37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

// y[m0:m0+MB, c0:c1] += x[m0:m0+MB, k0:k0+kb] @ w[k0:k0+kb, c0:c1], kb even.
template <int MB>
inline void kn_pairs_tile(const bf16* __restrict x, const bf16* __restrict w, float* __restrict y,
                          int64_t K, int64_t N, int64_t m0, int64_t k0, int64_t kb, int64_t c0,
                          int64_t c1) {
  const __m512i lo = _mm512_load_si512(kPairOrder);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t c = c0; c < c1; c += PT) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 2; ++v) acc[m][v] = _mm512_loadu_ps(y + (m0 + m) * N + c + v * 16);
    for (int64_t k = k0; k < k0 + kb; k += 2) {
#if PF_DEF
      if (k + PF_DEF + 1 < K) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF_DEF) * N + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF_DEF + 1) * N + c), _MM_HINT_T0);
      }
#endif
      const __m512i r0 = _mm512_loadu_si512(w + k * N + c), r1 = _mm512_loadu_si512(w + (k + 1) * N + c);
      const __m512bh b0 = (__m512bh)_mm512_permutex2var_epi16(r0, lo, r1);
      const __m512bh b1 = (__m512bh)_mm512_permutex2var_epi16(r0, hi, r1);
      for (int m = 0; m < MB; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + (m0 + m) * K + k, sizeof pair);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
      }
    }
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 2; ++v) _mm512_storeu_ps(y + (m0 + m) * N + c + v * 16, acc[m][v]);
  }
}

inline void kn_pairs_rows(const bf16* x, const bf16* w, float* y, int64_t K, int64_t N, int64_t m0,
                          int64_t mb, int64_t k0, int64_t kb, int64_t c0, int64_t c1) {
  switch (mb) {
    case 1: return kn_pairs_tile<1>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 2: return kn_pairs_tile<2>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 3: return kn_pairs_tile<3>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 4: return kn_pairs_tile<4>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 5: return kn_pairs_tile<5>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 6: return kn_pairs_tile<6>(x, w, y, K, N, m0, k0, kb, c0, c1);
    case 7: return kn_pairs_tile<7>(x, w, y, K, N, m0, k0, kb, c0, c1);
    default: return kn_pairs_tile<8>(x, w, y, K, N, m0, k0, kb, c0, c1);
  }
}

// y[m0:m0+MB, n0:n0+NB] = x[m0:m0+MB] . w[n0:n0+NB] along K, 32 bf16 (16 pairs) a step.
template <int MB, int NB>
inline void nk_pairs_block(const bf16* __restrict x, const bf16* __restrict w, float* __restrict y,
                           int64_t K, int64_t N, int64_t m0, int64_t n0) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 live = K - k >= 32 ? ~__mmask32{0} : (__mmask32{1} << (K - k)) - 1;
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(live, w + (n0 + j) * K + k);
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(live, x + (m0 + m) * K + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, wv[j]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) y[(m0 + m) * N + n0 + j] = _mm512_reduce_add_ps(acc[m][j]);
}

template <int NB>
inline void nk_pairs_rows(const bf16* x, const bf16* w, float* y, int64_t M, int64_t K, int64_t N,
                          int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + NKM <= M; m0 += NKM) nk_pairs_block<NKM, NB>(x, w, y, K, N, m0, n0);
  for (; m0 < M; ++m0) nk_pairs_block<1, NB>(x, w, y, K, N, m0, n0);
}

// Rows [r0, r1) of w: y[:, r0:r1] = x @ w[r0:r1]^T (* scale).
void nk_pairs_item(const bf16* x, const bf16* w, const float* scale, float* y, int64_t M,
                   int64_t K, int64_t N, int64_t r0, int64_t r1) {
  nk_walk(w, scale, y, M, K, N, r0, r1, [=](int64_t n, auto nb) {
    nk_pairs_rows<decltype(nb)::value>(x, w, y, M, K, N, n);
  });
}

void run_pairs(ffi::ThreadPool& pool, bool nk, const bf16* x, const bf16* w, const float* scale,
               float* y, int64_t M, int64_t K, int64_t N) {
  run_split(
      pool, nk, x, w, scale, y, M, K, N, PT, 2,
      [=](int64_t m0, int64_t mb, int64_t k0, int64_t kb, int64_t c0, int64_t c1, float* out) {
        kn_pairs_rows(x, w, out, K, N, m0, mb, k0, kb, c0, c1);
      },
      [=](int64_t r0, int64_t r1) { nk_pairs_item(x, w, scale, y, M, K, N, r0, r1); });
}
#define FTJAX_BF16_PAIRS 1
#endif  // __AVX512BF16__

// x [M, K] float32 or bfloat16; w "kn" [K, N] / "nk" [N, K] of float32, bfloat16 or
// int8; scale float32 [N] or empty (no scale); nk: 0 or 1; y [M, N] float32. bf16 x with
// bf16 w at 2+ rows takes the `vdpbf16ps` path where the CPU has it; any other bf16 x is
// widened to float32 first (exactly).
ffi::Error matmul_impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t nk) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("cpu matmul: x, w and y must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = nk ? wd[0] : wd[1];
  if ((nk ? wd[1] : wd[0]) != K || yd[0] != M || yd[1] != N)
    return ffi::Error::InvalidArgument("cpu matmul: shapes do not agree");
  const int64_t ns = static_cast<int64_t>(scale.element_count());
  if (ns != 0 && ns != N)
    return ffi::Error::InvalidArgument("cpu matmul: scale must have one value per output");
  const float* s = ns ? scale.typed_data() : nullptr;
  float* out = y->typed_data();
  std::vector<float> widened;
  const float* xf = nullptr;
  if (x.element_type() == ffi::DataType::BF16) {
    const bf16* xb = static_cast<const bf16*>(x.untyped_data());
#ifdef FTJAX_BF16_PAIRS
    if (w.element_type() == ffi::DataType::BF16 && M >= 2 && (nk || K % 2 == 0)) {
      run_pairs(pool, nk, xb, static_cast<const bf16*>(w.untyped_data()), s, out, M, K, N);
      return ffi::Error::Success();
    }
#endif
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) widened[i] = to_float(xb[i]);
    xf = widened.data();
  } else if (x.element_type() == ffi::DataType::F32) {
    xf = static_cast<const float*>(x.untyped_data());
  } else {
    return ffi::Error::InvalidArgument("cpu matmul: x must be float32 or bfloat16");
  }
  switch (w.element_type()) {
    case ffi::DataType::F32:
      run(pool, nk, xf, static_cast<const float*>(w.untyped_data()), s, out, M, K, N);
      break;
    case ffi::DataType::BF16:
      run(pool, nk, xf, static_cast<const bf16*>(w.untyped_data()), s, out, M, K, N);
      break;
    case ffi::DataType::S8:
      run(pool, nk, xf, static_cast<const int8_t*>(w.untyped_data()), s, out, M, K, N);
      break;
    default:
      return ffi::Error::InvalidArgument("cpu matmul: weights must be float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxSmallMatmul, matmul_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("nk"));
