"""The paged KV cache pieces: the paged decode-attention kernel (pallas_kernels),
device-side page ops (ftjax.paged_kv) and the host block manager (ftjax.blocks).

Kernel proofs as in test_kernels.py: interpreter numerics vs the jnp reference over
ragged lengths and shuffled page tables, the reference vs ftjax.numerics.attend on the
same data laid out contiguously, and the real Triton lowering for CUDA on this CPU.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lower_for_cuda
from tiny import tiny_config

from ftjax import numerics, paged_kv
from ftjax.blocks import BlockManager, OutOfPages
from ftjax.cache import KVCache
from ftjax.numerics import attend
from pallas_kernels import paged_attention, paged_attention_reference

TRITON_CALL = "__gpu$xla.gpu.triton"

# Max abs error, outputs O(1); the same budgets as test_kernels.py's decode attention
# (float32: summation order and online-softmax rescaling only, measured <= 5e-7;
# bf16 / fp16: probabilities fed to the second dot in the input dtype, one output
# rounding: bf16 step 2^-7 at |y| in [1, 2), fp16 2^-10).
ATTN_TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}


def _rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _quantize(x):
    """Per-token, per-head symmetric int8 over the last axis (as ftjax.quant)."""
    scale = jnp.maximum(jnp.abs(x).max(axis=-1), 1e-6) / 127.0
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


def _scattered_table(rng, b, max_pages, num_pages, lengths, page_size):
    """A page table whose used entries are distinct shuffled pages 1..P-1; entries past a
    row's last page hold random (valid) page ids, which must never be read."""
    table = rng.integers(0, num_pages, (b, max_pages))
    free = list(rng.permutation(np.arange(1, num_pages)))
    for row, n in enumerate(lengths):
        for i in range(min(-(-n // page_size), max_pages)):
            table[row, i] = free.pop()
    return jnp.asarray(table, jnp.int32)


def _paged_case(n, kv, dtype, alibi=False, int8=False, page_size=8, max_pages=6,
                lengths=(1, 17, 48), n_layers=2, seed=0):
    rng = np.random.default_rng(seed)
    b, h = len(lengths), 8
    num_pages = b * max_pages + 3
    shape = (n_layers, num_pages, kv, page_size, h)
    q = _rand(rng, (b, n, h), dtype)
    k, v = _rand(rng, shape, dtype), _rand(rng, shape, dtype)
    kw = {"layer": n_layers - 1}
    if int8:
        (k, kw["k_scale"]), (v, kw["v_scale"]) = _quantize(k), _quantize(v)
    if alibi:
        kw["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
    table = _scattered_table(rng, b, max_pages, num_pages, lengths, page_size)
    return (q, k, v, table, jnp.asarray(lengths, jnp.int32)), kw


@pytest.mark.parametrize("n,kv,dtype,alibi,int8,page_size,ppb", [
    (4, 4, jnp.float32, False, False, 8, 2),      # MHA, two 8-token pages per block
    (4, 1, jnp.float32, False, False, 16, 1),     # MQA, one page per block
    (8, 2, jnp.float32, True, False, 8, 2),       # GQA (G=4) + ALiBi
    (4, 2, jnp.bfloat16, False, False, 8, 4),
    (4, 2, jnp.float16, True, False, 16, 1),
    (4, 2, jnp.float32, False, True, 8, 2),       # int8 pages
    (8, 2, jnp.bfloat16, True, True, 16, 1),
])
def test_paged_attention_matches_reference(n, kv, dtype, alibi, int8, page_size, ppb):
    args, kw = _paged_case(n, kv, dtype, alibi, int8, page_size=page_size,
                           max_pages=96 // page_size)
    out = paged_attention(*args, **kw, pages_per_block=ppb, num_splits=2, interpret=True)
    ref = paged_attention_reference(*args, **kw)
    assert out.dtype == dtype and out.shape == args[0].shape
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= ATTN_TOL[dtype], err


def test_paged_attention_default_tiles_traced_layer_and_empty_row():
    """Default blocking / splits, the layer index traced under jit (each layer read in
    place), a row of length 0 (zeros, not NaN) and lengths past the table (clamped)."""
    args, kw = _paged_case(4, 2, jnp.float32, alibi=True, int8=True, lengths=(0, 9, 60),
                           n_layers=3)
    kw.pop("layer")
    run = jax.jit(lambda layer: paged_attention(*args, **kw, layer=layer, interpret=True))
    for layer in (0, 2):
        out = run(jnp.int32(layer))
        ref = paged_attention_reference(*args, **kw, layer=layer)
        assert float(jnp.abs(out - ref).max()) <= ATTN_TOL[jnp.float32]
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    assert not np.isnan(np.asarray(out)).any()


def test_paged_attention_never_reads_past_length():
    """Huge values in every page slot past a row's length (the rest of its last page,
    the null page, pages the table names past the end) leave the output unchanged."""
    args, kw = _paged_case(4, 2, jnp.float32, lengths=(3, 17, 30))
    q, k, v, table, lengths = args
    ps = k.shape[3]
    out = paged_attention(*args, **kw, interpret=True)
    live = np.zeros(k.shape[:2] + (ps,), bool)      # [L, P, ps]: slots some row reads
    for row, n in enumerate(np.asarray(lengths)):
        for t in range(n):
            live[kw["layer"], int(table[row, t // ps]), t % ps] = True
    dead = jnp.asarray(~live)[:, :, None, :, None]
    k2, v2 = jnp.where(dead, 1e4, k), jnp.where(dead, -1e4, v)
    out2 = paged_attention(q, k2, v2, table, lengths, **kw, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


@pytest.mark.parametrize("n,kv,alibi,int8", [(4, 4, False, False), (8, 2, True, False),
                                             (4, 1, True, True)])
def test_paged_reference_matches_contiguous_attend(n, kv, alibi, int8):
    """The same keys/values laid out contiguously `[B, K, S, H]` and scattered over
    shuffled pages: paged_attention_reference == ftjax.numerics.attend (heads_first), the
    model's own attention (float32, within summation order)."""
    rng = np.random.default_rng(1)
    b, h, s, ps = 3, 8, 40, 8
    lengths = np.array([1, 17, 40])
    k, v = _rand(rng, (b, kv, s, h)), _rand(rng, (b, kv, s, h))
    q = _rand(rng, (b, n, h))
    ks = vs = None
    if int8:
        (k, ks), (v, vs) = _quantize(k), _quantize(v)
    slopes = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32) if alibi else None
    num_pages, max_pages = b * s // ps + 1, s // ps
    table = np.asarray(_scattered_table(rng, b, max_pages, num_pages, [s] * b, ps))

    def to_pages(x):                  # [B, K, S, ...] -> pool [1, P, K, ps, ...]
        pool = np.zeros((num_pages, x.shape[1], ps) + x.shape[3:], np.asarray(x).dtype)
        for row in range(b):
            for i in range(max_pages):
                pool[table[row, i]] = np.asarray(x[row, :, i * ps:(i + 1) * ps])
        return jnp.asarray(pool)[None]

    kw = {"alibi_slopes": slopes}
    if int8:
        kw.update(k_scale=to_pages(ks), v_scale=to_pages(vs))
    ref = paged_attention_reference(q, to_pages(k), to_pages(v), jnp.asarray(table),
                                    jnp.asarray(lengths, jnp.int32), layer=0, **kw)
    q_pos = jnp.asarray(lengths - 1)[:, None]
    want = attend(q[:, None], k, v, q_pos, jnp.arange(s), slopes, heads_first=True,
                  k_scale=ks, v_scale=vs)[:, 0]
    assert float(jnp.abs(ref - want).max()) <= 2e-6


def test_paged_attention_rejects_bad_input():
    args, kw = _paged_case(4, 2, jnp.float32)
    q, k, v, table, lengths = args
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        paged_attention(q, k[:, :, :, :6], v[:, :, :, :6], table, lengths, **kw,
                        interpret=True)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_attention(q[:, :3], k, v, table, lengths, **kw, interpret=True)
    with pytest.raises(ValueError, match="int8 pages need"):
        k8, _ = _quantize(k)
        paged_attention(q, k8, k8, table, lengths, **kw, interpret=True)
    with pytest.raises(ValueError, match=r"page_table must be \[B, max_pages\]"):
        paged_attention(q, k, v, table[:2], lengths, **kw, interpret=True)
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_attention(*args, **kw, pages_per_block=1, interpret=True)   # 8 keys < 16


# -- CUDA lowering -------------------------------------------------------------



# (head_dim, query heads, kv heads, dtype, int8 pages, page_size): GPT-2 (64, MHA),
# NeoX-style 80 (padded), Llama GQA 128 with int8, MQA with 8-token pages.
LOWER_PAGED = [
    (64, 12, 12, jnp.float16, False, 16),
    (80, 8, 2, jnp.float32, False, 16),
    (128, 32, 8, jnp.bfloat16, True, 16),
    (64, 16, 1, jnp.bfloat16, True, 8),
]


@pytest.mark.parametrize("h,n,kv,dtype,int8,page_size", LOWER_PAGED)
def test_paged_attention_lowers_for_cuda(h, n, kv, dtype, int8, page_size):
    sds = jax.ShapeDtypeStruct
    # Pool and table sizes need not be powers of two: only power-of-two blocks are loaded.
    n_layers, num_pages, b, max_pages = 24, 1000, 3, 100
    pool = sds((n_layers, num_pages, kv, page_size, h), jnp.int8 if int8 else dtype)
    scale = sds(pool.shape[:4], jnp.float32)

    def f(q, k, v, table, lengths, layer, slopes, ks=None, vs=None):
        return paged_attention(q, k, v, table, lengths, layer=layer, alibi_slopes=slopes,
                               k_scale=ks, v_scale=vs)

    args = [sds((b, n, h), dtype), pool, pool, sds((b, max_pages), jnp.int32),
            sds((b,), jnp.int32), sds((), jnp.int32), sds((n,), jnp.float32)]
    text = lower_for_cuda(f, *args, *([scale, scale] if int8 else []))
    assert TRITON_CALL in text


# -- device-side page ops (ftjax.paged_kv) ----------------------------------------

def _kv_case(kv_dtype, seed=2):
    """Three batch rows using page-table rows [2, 0, 3] of a 4-row table (row 1 idle),
    pages shuffled over the pool; a ragged padded prefill then one decode token."""
    cfg = tiny_config(n_heads=4, n_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(seed)
    ps, m, s = 4, 6, 24
    b, kvh, h = 3, cfg.n_kv_heads, cfg.head_dim
    prompt = np.array([5, 1, 11])        # prompt lengths; the decode token sits at prompt
    slots = np.array([2, 0, 3])
    table = np.zeros((4, m), np.int32)   # unallocated entries stay 0 (the null page)
    free = list(rng.permutation(np.arange(1, 4 * m)))
    for row, n in zip(slots, prompt + 1):
        for i in range(-(-n // ps)):
            table[row, i] = free.pop()
    t = 12
    pos = np.where(np.arange(t)[None, :] < prompt[:, None], np.arange(t)[None, :], -1)
    writes = [(jnp.asarray(pos, jnp.int32), _rand(rng, (b, t, kvh, h)),
               _rand(rng, (b, t, kvh, h))),
              (jnp.asarray(prompt[:, None], jnp.int32), _rand(rng, (b, 1, kvh, h)),
               _rand(rng, (b, 1, kvh, h)))]
    return cfg, jnp.asarray(table), jnp.asarray(slots, jnp.int32), writes, s, ps


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_paged_write_then_gather_equals_contiguous_cache(kv_dtype):
    """Paged writes (traced layer, jitted, pools donated) then gather give exactly the
    contiguous KVCache written with the same keys/values at the same positions, int8
    scales included; padding (position -1) is dropped and the null page stays zero."""
    cfg, table, slots, writes, s, ps = _kv_case(kv_dtype)
    b = slots.shape[0]
    pool = paged_kv.zeros(cfg, 4 * 6, ps, jnp.float32, kv_dtype)
    cache = KVCache.zeros(cfg, b, s, jnp.float32, kv_dtype)
    pwrite = jax.jit(paged_kv.write, donate_argnums=0)
    for layer in range(cfg.n_layers):
        for pos, k, v in writes:
            cache = cache.update(layer, k + layer, v - layer, pos)
            pool = pwrite(pool, jnp.int32(layer), table, slots, pos, k + layer, v - layer)
    for layer in range(cfg.n_layers):
        got = paged_kv.gather(pool, layer, table[slots], s)
        want = [None if a is None else a[layer]
                for a in (cache.k, cache.v, cache.k_scale, cache.v_scale)]
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if w is not None:
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    for a in (pool.k, pool.v):
        assert not np.asarray(a[:, 0]).any()    # nothing landed in the null page


@pytest.mark.parametrize("page_dots", [0, 64])    # blocks copied contiguous / kept as pages
@pytest.mark.parametrize("key_block", [8, 128])   # 3 blocks of the 6 pages of 4; 1 block
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_paged_attend_equals_contiguous_attend(kv_dtype, key_block, page_dots, monkeypatch):
    """Attention over the pages (XLA: pages streamed block by block with an online
    softmax, each block either copied contiguous or attended page by page; Pallas decode
    kernel, interpreted) equals ftjax.numerics.attend over the contiguous cache: prefill
    queries (T > 1) and one decode query per row, ALiBi slopes on, grouped kv heads.
    XLA path: the same math with the softmax summed per block, so equal up to float32
    rounding (rtol 1e-5: a few ulps of reordered sums); the kernel: within its float32
    tolerance."""
    monkeypatch.setattr(numerics, "KEY_BLOCK", key_block)
    monkeypatch.setattr(paged_kv, "PAGE_DOT_QUERIES", page_dots)
    cfg, table, slots, writes, s, ps = _kv_case(kv_dtype, seed=3)
    b, n, h = slots.shape[0], cfg.n_heads, cfg.head_dim
    pool = paged_kv.zeros(cfg, 4 * 6, ps, jnp.float32, kv_dtype)
    cache = KVCache.zeros(cfg, b, s, jnp.float32, kv_dtype)
    for pos, k, v in writes:
        pool = paged_kv.write(pool, 1, table, slots, pos, k, v)
        cache = cache.update(1, k, v, pos)
    rng = np.random.default_rng(5)
    slopes = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
    scales = (None, None) if kv_dtype is None else (cache.k_scale[1], cache.v_scale[1])
    for pos, _, _ in writes:
        q_pos = jnp.maximum(pos, 0)
        q = _rand(rng, (b, pos.shape[1], n, h))
        want = attend(q, cache.k[1], cache.v[1], q_pos, jnp.arange(s), slopes,
                      heads_first=True, k_scale=scales[0], v_scale=scales[1])
        got = paged_kv.attend(pool, 1, q, q_pos, table[slots], slopes, max_len=s)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    got = paged_kv.attend(pool, jnp.int32(1), q, q_pos, table[slots], slopes, max_len=s,
                          kernels="pallas")
    assert float(jnp.abs(got - want).max()) <= ATTN_TOL[jnp.float32]


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_ragged_decode_attention_visits_each_rows_own_blocks(kv_dtype, monkeypatch):
    """Decode over rows of very different lengths (blocks of 2 pages of 4 keys: 1, 6,
    0 and 3 blocks, one padding row): the packed (row, block) pairs put one row up to
    three times in a loop step; equals ftjax.numerics.attend over the contiguous cache
    (ALiBi, grouped kv heads; rtol 1e-5 as above), zeros for the padding row, and the
    loop runs ceil(10 pairs / 4 rows) = 3 steps, not 4 x 6."""
    monkeypatch.setattr(numerics, "KEY_BLOCK", 8)
    cfg = tiny_config(n_heads=4, n_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(7)
    ps, m, b = 4, 12, 4
    lens = np.array([3, 47, 0, 20])                  # tokens before the decode query
    pool = paged_kv.zeros(cfg, b * m + 1, ps, jnp.float32, kv_dtype)
    cache = KVCache.zeros(cfg, b, m * ps, jnp.float32, kv_dtype)
    table = np.zeros((b, m), np.int32)
    free = list(rng.permutation(np.arange(1, b * m + 1)))
    for row, n in enumerate(lens + 1):
        table[row, :-(-n // ps)] = [free.pop() for _ in range(-(-n // ps))]
    table = jnp.asarray(table)
    t = m * ps
    pos = np.where(np.arange(t)[None, :] <= lens[:, None], np.arange(t)[None, :], -1)
    k, v = (_rand(rng, (b, t, cfg.n_kv_heads, cfg.head_dim)) for _ in range(2))
    pool = paged_kv.write(pool, 0, table, None, jnp.asarray(pos, jnp.int32), k, v)
    cache = cache.update(0, k, v, jnp.asarray(pos, jnp.int32))
    q = _rand(rng, (b, 1, cfg.n_heads, cfg.head_dim))
    q_pos = jnp.asarray(np.where(np.arange(b) == 2, -1, lens)[:, None], jnp.int32)
    slopes = jnp.asarray(rng.uniform(0.05, 0.5, cfg.n_heads), jnp.float32)
    scales = (None, None) if kv_dtype is None else (cache.k_scale[0], cache.v_scale[0])
    want = attend(q, cache.k[0], cache.v[0], q_pos, jnp.arange(t), slopes, heads_first=True,
                  k_scale=scales[0], v_scale=scales[1])
    calls = []
    ragged = numerics.attend_ragged

    def counted(*a, **kw):
        calls.append(a[2])                          # the per-pair block function
        return ragged(*a, **kw)

    monkeypatch.setattr(numerics, "attend_ragged", counted)
    got = paged_kv.attend(pool, 0, q, q_pos, table, slopes, max_len=t)
    assert len(calls) == 1                          # decode takes the ragged path
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.asarray(got[2]).any()
    # trip count: the loop visits ceil(pairs / rows) steps (pairs 1 + 6 + 0 + 3)
    seen = []
    monkeypatch.setattr(numerics, "attend_ragged", ragged)

    def spy(rows, blocks):
        jax.debug.callback(lambda r, bl: seen.append((r.tolist(), bl.tolist())), rows, blocks)
        return calls[0](rows, blocks)

    numerics.attend_ragged(q, q_pos, spy, 8, m // 2, slopes)
    pairs = [(r, bl) for rows, blocks in seen for r, bl in zip(rows, blocks)]
    assert len(seen) == 3 and pairs[:10] == [(0, 0)] + [(1, i) for i in range(6)] + [
        (3, 0), (3, 1), (3, 2)], seen             # then 2 dead pairs (masked, dropped)


def test_copy_pages_and_pool_sizing():
    cfg = tiny_config(n_kv_heads=2)
    rng = np.random.default_rng(6)
    pool = paged_kv.zeros(cfg, 8, 4, jnp.float32, "int8")
    k = _rand(rng, (2, 3, cfg.n_kv_heads, cfg.head_dim))
    table = jnp.asarray([[3, 5, 0], [6, 0, 0]], jnp.int32)
    for layer in range(cfg.n_layers):
        # Row 1's position 5 falls in an unallocated page (entry 0): dropped.
        pool = paged_kv.write(pool, layer, table, None, jnp.asarray([[0, 4, 5], [1, 5, -1]]),
                              k, -k)
    for a in jax.tree_util.tree_leaves(pool):
        assert not np.asarray(a[:, 0]).any()
    # (3 -> 7), a padding pair (dst 0), (6 -> 2): every layer, scales too.
    new = paged_kv.copy_pages(pool, jnp.asarray([3, 5, 6]), jnp.asarray([7, 0, 2]))
    for old_a, a in zip(jax.tree_util.tree_leaves(pool), jax.tree_util.tree_leaves(new)):
        old_a, a = np.asarray(old_a), np.asarray(a)
        np.testing.assert_array_equal(a[:, 7], old_a[:, 3])
        np.testing.assert_array_equal(a[:, 2], old_a[:, 6])
        np.testing.assert_array_equal(a[:, [0, 1, 3, 4, 5, 6]], old_a[:, [0, 1, 3, 4, 5, 6]])
    assert np.asarray(pool.k[:, 3]).any()

    # Sizing: a pool of n pages occupies exactly n * page_bytes (scales included).
    for kv_dtype, dtype in ((None, jnp.float32), (None, jnp.bfloat16), ("int8", jnp.bfloat16)):
        per_page = paged_kv.page_bytes(cfg, 16, dtype, kv_dtype)
        n = paged_kv.pages_for_budget(cfg, 10 * per_page + per_page - 1, 16, dtype, kv_dtype)
        assert n == 10
        z = jax.eval_shape(lambda: paged_kv.zeros(cfg, n, 16, dtype, kv_dtype))
        assert sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(z)) == \
            n * per_page
    # L=2, K=2, H=8, 16 tokens, keys + values: fp32 4 bytes each; int8 1 + a 4-byte scale.
    assert paged_kv.page_bytes(cfg, 16, jnp.float32) == 2 * 2 * 2 * 16 * 8 * 4
    assert paged_kv.page_bytes(cfg, 16, jnp.float32, "int8") == 2 * 2 * 2 * 16 * (8 + 4)
    with pytest.raises(ValueError, match="kv_memory=100 bytes holds 0 page"):
        paged_kv.pages_for_budget(cfg, 100, 16, jnp.float32)
    with pytest.raises(ValueError, match="kv_dtype"):
        paged_kv.zeros(cfg, 8, 4, jnp.float32, "fp8")
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        paged_kv.zeros(cfg, 8, 6, jnp.float32)


# -- host block manager (ftjax.blocks) ---------------------------------------------

def _state(bm):
    live = sorted(bm._seqs, key=str)
    return bm.stats(), {s: bm.pages(s) for s in live}, {s: bm.num_tokens(s) for s in live}


class _Sim:
    """A stand-in for the device pool: page -> token ids written, to prove the pages a
    manager hands out hold what each sequence wrote (hits, forks, copy-on-write)."""

    def __init__(self, bm):
        self.bm, self.pool, self.want = bm, {}, {}

    def holders(self, page):
        return sum(self.bm.pages(s).count(page) for s in self.want)

    def write(self, seq, start, tokens):
        ps, pages = self.bm.page_size, self.bm.pages(seq)
        for t, tok in enumerate(tokens, start):
            page = pages[t // ps]
            assert page != 0 and self.holders(page) == 1, "write into a shared page"
            self.pool.setdefault(page, [None] * ps)[t % ps] = tok
        self.want[seq][start:start + len(tokens)] = list(tokens)

    def copy(self, pairs):
        for src, dst in pairs:
            self.pool[dst] = list(self.pool[src])

    def verify(self):
        ps = self.bm.page_size
        for seq, toks in self.want.items():
            pages = self.bm.pages(seq)
            assert 0 not in pages
            assert [self.pool[pages[t // ps]][t % ps] for t in range(len(toks))] == toks


@pytest.mark.parametrize("seed", range(6))
def test_block_manager_random_workload(seed):
    """Random allocate (prompts sharing prefixes) / append / fork / free / abort with a
    small pool: after every call the invariants hold, every sequence reads back exactly
    the tokens it wrote (so prefix hits, forks and copy-on-write are right), nothing is
    written into a shared page, a refused call changes nothing, and freeing everything
    leaves 0 pages in use."""
    rng = np.random.default_rng(seed)
    bm = BlockManager(num_pages=24, page_size=4, max_pages_per_seq=8)
    sim = _Sim(bm)
    stems = [list(rng.integers(0, 50, 20)) for _ in range(3)]
    next_id = 0
    for _ in range(300):
        op = rng.choice(["alloc", "append", "fork", "free"], p=[0.3, 0.4, 0.15, 0.15])
        seqs = list(sim.want)
        if op == "alloc" or not seqs:
            n = int(rng.integers(1, 34))
            prompt = (stems[rng.integers(3)][:int(rng.integers(0, 21))]
                      + list(rng.integers(0, 50, 34)))[:n]
            before = _state(bm)
            if not bm.can_allocate(n, prompt):
                err = ValueError if n > bm.max_tokens else OutOfPages
                with pytest.raises(err):
                    bm.allocate(next_id, n, prompt)
                assert _state(bm) == before
                continue
            cached = bm.allocate(next_id, n, prompt)
            assert cached % 4 == 0 and cached < n
            sim.want[next_id] = list(prompt[:cached]) + [None] * (n - cached)
            sim.write(next_id, cached, prompt[cached:])   # the engine's prefill
            bm.mark_computed(next_id, n)
            next_id += 1
        elif op == "append":
            seq = seqs[rng.integers(len(seqs))]
            k = int(rng.integers(1, 4))
            before = _state(bm)
            if not bm.can_append(seq, k):
                with pytest.raises((OutOfPages, ValueError)):
                    bm.append_slots(seq, k)
                assert _state(bm) == before
                continue
            start = bm.num_tokens(seq)
            sim.copy(bm.append_slots(seq, k))
            sim.want[seq] += [None] * k
            sim.write(seq, start, list(rng.integers(0, 50, k)))
        elif op == "fork":
            parent = seqs[rng.integers(len(seqs))]
            bm.fork(parent, next_id)
            sim.want[next_id] = list(sim.want[parent])
            next_id += 1
        else:
            seq = seqs[rng.integers(len(seqs))]
            bm.free(seq)
            del sim.want[seq]
        bm.check()
        sim.verify()
    for seq in list(sim.want):
        bm.free(seq)
    bm.check()
    st = bm.stats()
    assert st["pages_in_use"] == 0 and st["sequences"] == 0
    assert st["pages_free"] == st["pages_total"] == 23
    assert st["prefix_hits"] > 0     # the shared stems were found


def test_prefix_cache_hits_eviction_and_copy_on_write():
    bm = BlockManager(num_pages=9, page_size=4, max_pages_per_seq=6)
    stem = list(range(100, 108))                        # two aligned blocks
    a, b = stem + [1, 2, 3], stem + [7, 8]
    assert bm.allocate("a", len(a), a) == 0
    # Not yet computed: no hit (the pages hold nothing yet).
    assert bm.allocate("b0", len(b), b) == 0
    bm.free("b0")
    bm.mark_computed("a", len(a))
    assert bm.allocate("b", len(b), b) == 8
    assert bm.pages("b")[:2] == bm.pages("a")[:2] and bm.pages("b")[2] != bm.pages("a")[2]
    st = bm.stats()
    assert (st["prefix_hits"], st["cached_tokens"], st["pages_in_use"]) == (2, 8, 4)
    # A prompt equal to the stem reuses only its first block: the last token's block
    # must be computed (its logits), and is not written into a shared page.
    assert bm.allocate("c", 8, stem) == 4
    bm.free("a"), bm.free("b"), bm.free("c")
    assert bm.stats()["pages_in_use"] == 0 and bm.stats()["pages_cached"] == 2
    # Freed but cached: still found.
    assert bm.allocate("d", len(a), a) == 8
    bm.free("d")
    # Filling the pool evicts the cached blocks (8 usable pages, 2 cached).
    bm.allocate("big", 6 * 4)
    assert bm.stats()["pages_cached"] == 2            # never-cached free pages go first
    bm.allocate("big2", 2 * 4)
    assert bm.stats()["pages_cached"] == 0
    bm.free("big"), bm.free("big2")
    assert bm.allocate("e", len(a), a) == 0
    bm.free("e")

    # Fork + copy-on-write: the first writer into the shared partial page copies it.
    bm.allocate("p", 6)
    bm.fork("p", "q")
    shared = bm.pages("p")
    assert bm.append_slot("p") == (shared[1], bm.pages("p")[1]) and bm.pages("p")[1] != shared[1]
    assert bm.append_slot("q") is None and bm.pages("q") == shared
    # A full shared last page needs no copy: both get fresh pages.
    bm.allocate("r", 8)
    bm.fork("r", "s")
    assert bm.append_slots("r", 1) == [] and bm.append_slots("s", 1) == []
    assert bm.pages("r")[:2] == bm.pages("s")[:2] and bm.pages("r")[2] != bm.pages("s")[2]
    bm.check()


def test_block_manager_refuses_without_changing_state():
    bm = BlockManager(num_pages=5, page_size=4, max_pages_per_seq=3)
    bm.allocate("a", 9)                                  # 3 of the 4 usable pages
    before = _state(bm)
    assert not bm.can_allocate(5)
    with pytest.raises(OutOfPages, match="needs 2 free pages, 1 are free"):
        bm.allocate("b", 5)
    with pytest.raises(ValueError, match="max_pages_per_seq=3 x page_size=4 = 12"):
        bm.allocate("b", 13)
    assert not bm.can_append("a", 4)
    with pytest.raises(ValueError, match="max_pages_per_seq=3"):
        bm.append_slots("a", 4)
    bm.allocate("b", 4)
    assert not bm.can_append("b", 1)
    with pytest.raises(OutOfPages):
        bm.append_slots("b", 1)
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate("a", 1)
    with pytest.raises(KeyError, match="'zz'"):
        bm.free("zz")
    with pytest.raises(KeyError, match="'zz'"):
        bm.append_slot("zz")
    bm.free("b")
    assert _state(bm) == before
    assert bm.table(["a", None]).tolist() == [bm.pages("a"), [0, 0, 0]]
    bm.check()
    with pytest.raises(ValueError, match="null page"):
        BlockManager(1, 4, 3)
