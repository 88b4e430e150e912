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
// x float32 [M, K]; y float32 [M, N] = x @ w (* scale):
//   "kn": w [K, N] (a Linear kernel, contraction first), scale [N] or none;
//   "nk": w [N, K] (an embedding table as the LM head), scale [N] or none.
// Work: items are ranges of output columns ("kn") or rows ("nk"), shared out over XLA's
// intra-op thread pool. "kn" walks the item's columns 8 weight rows at a time (8
// sequential streams), the rows' partial sums kept in the output (L1-resident);
// "nk" takes 4 weight rows at a time against 4 x rows, dot products along K.

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
#ifndef CB_FLOATS_DEF
#define CB_FLOATS_DEF 4096
#endif
constexpr int64_t CB_FLOATS = CB_FLOATS_DEF;  // partial sums per column block (16 KB)

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

// Columns [c0, c1) of y = x @ w (* scale) for every row.
template <typename WT>
void kn_item(const float* x, const WT* w, const float* scale, float* y, int64_t M, int64_t K,
             int64_t N, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * N + c0, y + m * N + c1, 0.0f);
  const int64_t cv = c0 + (c1 - c0) / TN * TN;  // vector columns [c0, cv), the rest scalar
  // Column blocks whose partial sums stay in L1 (M x cb floats).
  const int64_t cb = std::max<int64_t>(TN, CB_FLOATS / std::max<int64_t>(M, 1) / TN * TN);
  for (int64_t b0 = c0; b0 < cv; b0 += cb) {
    const int64_t b1 = std::min(b0 + cb, cv);
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kb = std::min(KB, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += MR)
        kn_tile(x, w, y, K, N, m0, std::min<int64_t>(MR, M - m0), k0, kb, b0, b1);
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = cv; c < c1; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * to_float(w[k * N + c]);
      y[m * N + c] = s;
    }
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = c0; c < c1; ++c) y[m * N + c] *= scale[c];
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

// Rows [r0, r1) of w: y[:, r0:r1] = x @ w[r0:r1]^T (* scale).
template <typename WT>
void nk_item(const float* x, const WT* w, const float* scale, float* y, int64_t M, int64_t K,
             int64_t N, int64_t r0, int64_t r1) {
  int64_t n = r0;
  for (; n + NKB <= r1; n += NKB) {
#if NKPF_DEF
    if (n + 2 * NKB <= r1) {
      const char* p = reinterpret_cast<const char*>(w + (n + NKB) * K);
      for (int64_t b = 0; b < static_cast<int64_t>(NKB * K * sizeof(WT)); b += 64)
        _mm_prefetch(p + b, _MM_HINT_T0);
    }
#endif
    nk_rows<WT, NKB>(x, w, y, M, K, N, n);
  }
  for (; n < r1; ++n) nk_rows<WT, 1>(x, w, y, M, K, N, n);
  if (scale)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = r0; c < r1; ++c) y[m * N + c] *= scale[c];
}

template <typename WT>
void run(ffi::ThreadPool& pool, bool nk, const float* x, const WT* w, const float* scale,
         float* y, int64_t M, int64_t K, int64_t N) {
  // Items of whole register tiles (kn) / row groups (nk), a few per thread.
  const int64_t unit = nk ? NKB : TN;
  const int64_t units = (N + unit - 1) / unit;
  const int64_t items = std::clamp<int64_t>(4 * num_threads(pool), 1, units);
  parallel_for(pool, items, [=](int64_t i, std::vector<float>&) {
    const int64_t c0 = std::min(N, units * i / items * unit);
    const int64_t c1 = std::min(N, units * (i + 1) / items * unit);
    if (c0 >= c1) return;
    if (nk)
      nk_item(x, w, scale, y, M, K, N, c0, c1);
    else
      kn_item(x, w, scale, y, M, K, N, c0, c1);
  });
}

// x [M, K] float32; w "kn" [K, N] / "nk" [N, K] of float32, bfloat16 or int8; scale
// float32 [N] or empty (no scale); nk: 0 or 1; y [M, N] float32.
ffi::Error matmul_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
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
  switch (w.element_type()) {
    case ffi::DataType::F32:
      run(pool, nk, x.typed_data(), static_cast<const float*>(w.untyped_data()), s, out, M, K, N);
      break;
    case ffi::DataType::BF16:
      run(pool, nk, x.typed_data(), static_cast<const bf16*>(w.untyped_data()), s, out, M, K, N);
      break;
    case ffi::DataType::S8:
      run(pool, nk, x.typed_data(), static_cast<const int8_t*>(w.untyped_data()), s, out, M, K, N);
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
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("nk"));
