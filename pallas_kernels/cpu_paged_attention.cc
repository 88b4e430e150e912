// Paged attention on CPU: queries attend their rows' KV pages in place, through the page
// table, with no gathered copy of the pages. An XLA FFI custom call; built and loaded by
// `pallas_kernels/cpu_paged_attention.py` (which documents the arguments), checked
// against `ftjax.numerics.attend` in tests/test_cpu_kernels.py.
//
// Layout (as `ftjax.paged_kv`): pools k, v `[L, P, K, S, H]` (float32, bfloat16, or int8 with
// float32 scales `[L, P, K, S]`), page table int32 `[B, M]`, queries float32
// `[B, T, N, H]` at int32 positions `[B, T]` (< 0: a padding query, output zeros),
// ALiBi slopes float32 `[N]` (zeros: none), layer int32 scalar. A key at position p is
// seen by a query at position t iff p <= t. Output float32 `[B, T, N, H]`.
//
// Work: an item is one row's kv heads (or a share of them, so every thread has a few);
// items are shared out over XLA's intra-op thread pool. Per item, the row's pages are
// visited in order, each page's heads in pool order (contiguous), with an online softmax
// a page at a time. Fewer than 4 queries per kv head (MHA decode): scores by vector dots
// along H. More (GQA decode, prefill chunks): four queries at a time against the page's
// keys transposed once, each value row loaded once for the four. Values accumulate in
// registers. Measured (gpt2-124m, 2-core AMD EPYC): decode attention reads the pages at
// ~18 GB/s against ~7 for XLA's gather-then-dot; the attention of 8 rows x 64 prefill
// queries (12 layers) 63 ms against 223-290 ms.

#include "cpu_simd.h"

namespace {

using namespace ftjax_cpu;

constexpr float kMask = -3.4028234663852886e38f;  // float32 min, as numerics.MASK

struct Shapes {
  int64_t L, P, K, S, H, B, T, N, M;
};

template <typename KV>
struct Args {
  Shapes d;
  const float* q;
  const KV* k;
  const KV* v;
  const float* k_scale;  // nullptr for a float cache
  const float* v_scale;
  const int32_t* table;
  const int32_t* q_pos;
  const float* slopes;
  int32_t layer;
  float* out;
};

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, relative
// error ~1e-7), written so the compiler vectorizes a loop of it (libm's expf does not).
inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);  // below: 0 to float32 precision in a softmax sum
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}


// exp_nonpos on a vector (the same polynomial).
inline Vec vexp_nonpos(Vec x) {
  x = vmax(x, vset(-87.0f));
  const Vec n = vfloor(fma(x, vset(1.44269504088896341f), vset(0.5f)));
  Vec r = fma(n, vset(-0.693359375f), x);
  r = fma(n, vset(2.12194440e-4f), r);
  Vec p = vset(1.9875691500e-4f);
  p = fma(p, r, vset(1.3981999507e-3f));
  p = fma(p, r, vset(8.3334519073e-3f));
  p = fma(p, r, vset(4.1665795894e-2f));
  p = fma(p, r, vset(1.6666665459e-1f));
  p = fma(p, r, vset(5.0000001201e-1f));
  const Vec e = fma(p * r, r, r + vset(1.0f));
  return e * pow2(n);
}

// sum_h q[h] k[h]: two vector accumulators, then the lanes.
template <typename KV>
inline float dot(const float* __restrict q, const KV* __restrict k, int64_t H) {
  Vec a0 = vzero(), a1 = vzero();
  int64_t h = 0;
  for (; h + 2 * W <= H; h += 2 * W) {
    a0 = fma(load(q + h), load(k + h), a0);
    a1 = fma(load(q + h + W), load(k + h + W), a1);
  }
  for (; h + W <= H; h += W) a0 = fma(load(q + h), load(k + h), a0);
  float r = hsum(a0) + hsum(a1);
  for (; h < H; ++h) r += q[h] * to_float(k[h]);
  return r;
}

// acc[h] += sum_j p[j] v[j * H + h] for j < n: 4W columns at a time held in registers
// across the keys (the values of a page stay in L1 between column blocks).
template <typename KV>
inline void accumulate(float* __restrict acc, const float* __restrict p,
                       const KV* __restrict v, int64_t n, int64_t H) {
  int64_t h0 = 0;
  for (; h0 + 4 * W <= H; h0 += 4 * W) {
    Vec r0 = load(acc + h0), r1 = load(acc + h0 + W), r2 = load(acc + h0 + 2 * W),
        r3 = load(acc + h0 + 3 * W);
    for (int64_t j = 0; j < n; ++j) {
      const Vec pj = vset(p[j]);
      const KV* vr = v + j * H + h0;
      r0 = fma(pj, load(vr), r0);
      r1 = fma(pj, load(vr + W), r1);
      r2 = fma(pj, load(vr + 2 * W), r2);
      r3 = fma(pj, load(vr + 3 * W), r3);
    }
    store(acc + h0, r0);
    store(acc + h0 + W, r1);
    store(acc + h0 + 2 * W, r2);
    store(acc + h0 + 3 * W, r3);
  }
  for (; h0 + W <= H; h0 += W) {
    Vec r = load(acc + h0);
    for (int64_t j = 0; j < n; ++j) r = fma(vset(p[j]), load(v + j * H + h0), r);
    store(acc + h0, r);
  }
  for (; h0 < H; ++h0)
    for (int64_t j = 0; j < n; ++j) acc[h0] += p[j] * to_float(v[j * H + h0]);
}

// Softmax state of one query: running max, sum, and the weighted values (acc, H wide).
// One online-softmax update of query qi (pre-scaled by 1/sqrt(H)) at position qp with
// keys k0.. of one page (kp / vp: S x H, scales ks / vs or null); s: S floats of scratch.
template <typename KV>
inline void page_update(const float* __restrict qi, const KV* __restrict kp,
                        const KV* __restrict vp, const float* ks,
                        const float* vs, int64_t S, int64_t H, int64_t k0, int64_t seen,
                        int64_t qp, float slope, float* __restrict s, float& m, float& z,
                        float* __restrict acc) {
  for (int64_t j = 0; j < seen; ++j) s[j] = dot(qi, kp + j * H, H);
  float mx = m;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < seen; ++j) {
    float x = s[j];
    if (ks != nullptr) x *= ks[j];
    x += slope * static_cast<float>(k0 + j - qp);
    s[j] = x;
    mx = std::max(mx, x);
  }
  const float corr = exp_nonpos(m - mx);
  float zs = 0.0f;
#pragma omp simd reduction(+ : zs)
  for (int64_t j = 0; j < seen; ++j) {
    s[j] = exp_nonpos(s[j] - mx);
    zs += s[j];
  }
  if (vs != nullptr)
    for (int64_t j = 0; j < seen; ++j) s[j] *= vs[j];
  z = z * corr + zs;
  m = mx;
  for (int64_t h = 0; h < H; ++h) acc[h] *= corr;
  accumulate(acc, s, vp, seen, H);
}

// Four queries of one kv head at once (rows qv, acc of stride H; m, z; positions qp,
// slopes sl; nq <= 4 of them real) against one page whose keys are transposed in kt
// [H, Sp] (Sp = S rounded up to W, columns >= live zero): a query's scores of W keys are
// one vector accumulated along H, and each value row is loaded once for the four. For
// many queries per kv head (prefill); s: [4, Sp] scratch.
template <typename KV>
void tile_update(const float* __restrict qv, int64_t nq, const float* __restrict kt,
                 int64_t Sp, int64_t S, const KV* __restrict vp, const float* ks,
                 const float* vs, int64_t H, int64_t k0, int64_t live, const int64_t* qp, const float* sl,
                 float* __restrict s, float* m, float* z, float* __restrict acc) {
  for (int64_t jc = 0; jc < Sp; jc += W) {
    Vec r0 = vzero(), r1 = vzero(), r2 = vzero(), r3 = vzero();
    for (int64_t h = 0; h < H; ++h) {
      const Vec kv = load(kt + h * Sp + jc);
      r0 = fma(vset(qv[h]), kv, r0);
      r1 = fma(vset(qv[H + h]), kv, r1);
      r2 = fma(vset(qv[2 * H + h]), kv, r2);
      r3 = fma(vset(qv[3 * H + h]), kv, r3);
    }
    store(s + jc, r0);
    store(s + Sp + jc, r1);
    store(s + 2 * Sp + jc, r2);
    store(s + 3 * Sp + jc, r3);
  }
  float corr[4] = {1.0f, 1.0f, 1.0f, 1.0f};
  int64_t most = 0;
  for (int64_t q = 0; q < 4; ++q) {
    float* __restrict sq = s + q * Sp;
    const int64_t seen = q < nq && qp[q] >= k0 ? std::min<int64_t>(live, qp[q] - k0 + 1) : 0;
    if (seen > 0 && Sp == S) {  // whole vectors: masked lanes instead of loop tails
      const Vec slope = vset(sl[q]);
      Vec mxv = vset(m[q]);
      for (int64_t jc = 0; jc < S; jc += W) {
        Vec x = load(sq + jc);
        if (ks != nullptr) x = x * load(ks + jc);
        x = fma(slope, vset(static_cast<float>(k0 + jc - qp[q])) + iota(), x);
        x = keep_below(x, seen - jc, kMask);
        store(sq + jc, x);
        mxv = vmax(mxv, x);
      }
      const float mx = hmax(mxv);
      corr[q] = exp_nonpos(m[q] - mx);
      Vec zv = vzero();
      for (int64_t jc = 0; jc < S; jc += W) {
        Vec p = keep_below(vexp_nonpos(load(sq + jc) - vset(mx)), seen - jc, 0.0f);
        zv = zv + p;
        if (vs != nullptr) p = p * load(vs + jc);
        store(sq + jc, p);
      }
      z[q] = z[q] * corr[q] + hsum(zv);
      m[q] = mx;
    } else if (seen > 0) {
      float mx = m[q];
      for (int64_t j = 0; j < seen; ++j) {
        float x = sq[j];
        if (ks != nullptr) x *= ks[j];
        x += sl[q] * static_cast<float>(k0 + j - qp[q]);
        sq[j] = x;
        mx = std::max(mx, x);
      }
      corr[q] = exp_nonpos(m[q] - mx);
      float zs = 0.0f;
#pragma omp simd reduction(+ : zs)
      for (int64_t j = 0; j < seen; ++j) {
        sq[j] = exp_nonpos(sq[j] - mx);
        zs += sq[j];
      }
      if (vs != nullptr)
        for (int64_t j = 0; j < seen; ++j) sq[j] *= vs[j];
      z[q] = z[q] * corr[q] + zs;
      m[q] = mx;
    }
    for (int64_t j = seen; j < Sp; ++j) sq[j] = 0.0f;  // (vector path: already)
    most = std::max(most, seen);
  }
  if (most == 0) return;
  int64_t h0 = 0;
  for (; h0 + W <= H; h0 += W) {
    Vec r0 = load(acc + h0) * vset(corr[0]), r1 = load(acc + H + h0) * vset(corr[1]),
        r2 = load(acc + 2 * H + h0) * vset(corr[2]), r3 = load(acc + 3 * H + h0) * vset(corr[3]);
    for (int64_t j = 0; j < most; ++j) {
      const Vec vj = load(vp + j * H + h0);
      r0 = fma(vset(s[j]), vj, r0);
      r1 = fma(vset(s[Sp + j]), vj, r1);
      r2 = fma(vset(s[2 * Sp + j]), vj, r2);
      r3 = fma(vset(s[3 * Sp + j]), vj, r3);
    }
    store(acc + h0, r0);
    if (nq > 1) store(acc + H + h0, r1);
    if (nq > 2) store(acc + 2 * H + h0, r2);
    if (nq > 3) store(acc + 3 * H + h0, r3);
  }
  for (; h0 < H; ++h0)
    for (int64_t q = 0; q < nq; ++q) {
      float x = acc[q * H + h0] * corr[q];
      for (int64_t j = 0; j < most; ++j) x += s[q * Sp + j] * to_float(vp[j * H + h0]);
      acc[q * H + h0] = x;
    }
}

// One work item: row b's queries of kv heads [h_lo, h_hi), over the row's pages in
// order; per page, the heads in pool order: a page's heads are contiguous, which the
// hardware prefetcher follows (software prefetch of the next page measured slower).
template <typename KV>
void attend_item(const Args<KV>& a, int64_t b, int64_t h_lo, int64_t h_hi,
                 std::vector<float>& buf) {
  const Shapes& d = a.d;
  const int64_t G = d.N / d.K, S = d.S, H = d.H, nh = h_hi - h_lo;
  const int64_t Q = d.T * G * nh;  // queries: (head in item, t, g)
  const float inv = 1.0f / std::sqrt(static_cast<float>(H));
  int64_t last = -1;
  for (int64_t t = 0; t < d.T; ++t) last = std::max<int64_t>(last, a.q_pos[b * d.T + t]);
  const int64_t n_keys = std::min<int64_t>(last + 1, d.M * S);
  // Many queries per kv head go four at a time against each page's transposed keys.
  const bool tiled = d.T * G >= 4;
  const int64_t Sp = (S + W - 1) / W * W;
  // buf: kt [H, Sp] | s [4, Sp] | m [Q] | z [Q] | acc [Q + 4, H] | qv [Q + 4, H]
  buf.assign(H * Sp + 4 * Sp + 2 * Q + 2 * (Q + 4) * H, 0.0f);
  float* __restrict kt = buf.data();
  float* __restrict s = kt + H * Sp;
  float* __restrict m = s + 4 * Sp;
  float* __restrict z = m + Q;
  float* __restrict acc = z + Q;
  float* __restrict qv = acc + (Q + 4) * H;
  for (int64_t i = 0; i < Q; ++i) {
    const int64_t kh = h_lo + i / (d.T * G), t = i / G % d.T, g = i % G;
    const float* src = a.q + ((b * d.T + t) * d.N + kh * G + g) * H;
    for (int64_t h = 0; h < H; ++h) qv[i * H + h] = src[h] * inv;
    m[i] = kMask;
    z[i] = 0.0f;
  }
  const int64_t pages = (n_keys + S - 1) / S;
  for (int64_t pi = 0; pi < pages; ++pi) {
    const int64_t page = std::clamp<int64_t>(a.table[b * d.M + pi], 0, d.P - 1);
    const int64_t k0 = pi * S, live = std::min<int64_t>(S, n_keys - k0);
    for (int64_t kh = h_lo; kh < h_hi; ++kh) {
      const int64_t base = ((a.layer * d.P + page) * d.K + kh) * S;
      const KV* kp = a.k + base * H;
      const KV* vp = a.v + base * H;
      const float* ks = a.k_scale ? a.k_scale + base : nullptr;
      const float* vs = a.v_scale ? a.v_scale + base : nullptr;
      if (tiled) {
        for (int64_t j = 0; j < S; ++j)
          for (int64_t h = 0; h < H; ++h)
            kt[h * Sp + j] = j < live ? to_float(kp[j * H + h]) : 0.0f;
        for (int64_t tg = 0; tg < d.T * G; tg += 4) {
          const int64_t i = (kh - h_lo) * d.T * G + tg, nq = std::min<int64_t>(4, d.T * G - tg);
          int64_t qp[4];
          float sl[4];
          for (int64_t q = 0; q < 4; ++q) {
            const int64_t u = std::min<int64_t>(tg + q, d.T * G - 1);
            qp[q] = a.q_pos[b * d.T + u / G];
            sl[q] = a.slopes[kh * G + u % G];
          }
          if (std::max({qp[0], qp[1], qp[2], qp[3]}) < k0) continue;
          tile_update(qv + i * H, nq, kt, Sp, S, vp, ks, vs, H, k0, live, qp, sl, s, m + i, z + i,
                      acc + i * H);
        }
        continue;
      }
      for (int64_t tg = 0; tg < d.T * G; ++tg) {
        const int64_t i = (kh - h_lo) * d.T * G + tg, t = tg / G;
        const int64_t qp = a.q_pos[b * d.T + t];
        if (qp < k0) continue;  // this query sees none of the page (or is padding)
        page_update(qv + i * H, kp, vp, ks, vs, S, H, k0,
                    std::min<int64_t>(live, qp - k0 + 1), qp, a.slopes[kh * G + tg % G], s,
                    m[i], z[i], acc + i * H);
      }
    }
  }
  for (int64_t i = 0; i < Q; ++i) {
    const int64_t kh = h_lo + i / (d.T * G), t = i / G % d.T, g = i % G;
    float* dst = a.out + ((b * d.T + t) * d.N + kh * G + g) * H;
    const float r = z[i] > 0.0f ? 1.0f / z[i] : 0.0f;
    for (int64_t h = 0; h < H; ++h) dst[h] = acc[i * H + h] * r;
  }
}

// An item is a row's kv heads split in `parts` (enough items for every thread to have a
// few), shared out over the pool.
template <typename KV>
void run(ffi::ThreadPool& pool, const Args<KV>& a) {
  const int64_t parts =
      std::clamp<int64_t>((4 * num_threads(pool) + a.d.B - 1) / a.d.B, 1, a.d.K);
  parallel_for(pool, a.d.B * parts, [&a, parts](int64_t i, std::vector<float>& buf) {
    const int64_t b = i / parts, p = i % parts;
    attend_item(a, b, a.d.K * p / parts, a.d.K * (p + 1) / parts, buf);
  });
}

template <typename KV, typename KB>
ffi::Error impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, KB k, KB v,
                const float* k_scale, const float* v_scale, ffi::Buffer<ffi::S32> table,
                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> slopes,
                ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  const auto kd = k.dimensions(), qd = q.dimensions(), td = table.dimensions();
  if (kd.size() != 5 || qd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: bad ranks");
  Shapes d{kd[0], kd[1], kd[2], kd[3], kd[4], qd[0], qd[1], qd[2], td[1]};
  if (qd[3] != d.H || td[0] != d.B || d.N % d.K != 0 || slopes.element_count() != d.N ||
      q_pos.element_count() != d.B * d.T)
    return ffi::Error::InvalidArgument("paged attention: shapes do not agree");
  const int32_t l = *layer.typed_data();
  if (l < 0 || l >= d.L) return ffi::Error::InvalidArgument("paged attention: layer out of range");
  Args<KV> a{d, q.typed_data(), static_cast<const KV*>(k.untyped_data()),
             static_cast<const KV*>(v.untyped_data()), k_scale, v_scale,
             table.typed_data(), q_pos.typed_data(), slopes.typed_data(), l,
             out->typed_data()};
  run(pool, a);
  return ffi::Error::Success();
}

ffi::Error float_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                      ffi::AnyBuffer v, ffi::Buffer<ffi::S32> table,
                      ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> slopes,
                      ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  if (k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("paged attention: k and v pools differ in dtype");
  if (k.element_type() == ffi::DataType::BF16 || k.element_type() == ffi::DataType::U16)
    return impl<bf16>(pool, q, k, v, nullptr, nullptr, table, q_pos, slopes, layer, out);
  if (k.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("paged attention: pools must be float32, bfloat16 or int8");
  return impl<float>(pool, q, k, v, nullptr, nullptr, table, q_pos, slopes, layer, out);
}

ffi::Error int8_impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
                     ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> k_scale,
                     ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> table,
                     ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::F32> slopes,
                     ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  if (k_scale.element_count() * v.dimensions()[4] != k.element_count() ||
      v_scale.element_count() != k_scale.element_count())
    return ffi::Error::InvalidArgument("paged attention: scales do not match the pools");
  return impl<int8_t>(pool, q, k, v, k_scale.typed_data(), v_scale.typed_data(), table, q_pos,
                      slopes, layer, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxPagedAttentionF32, float_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FtjaxPagedAttentionI8, int8_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
