"""The native CPU paged-attention kernel (pallas_kernels/cpu_paged_attention.cc): built
on first use with the machine's C++ compiler (with the other CPU kernels,
pallas_kernels/cpu_native.py), called through XLA's FFI.

Numerics against ftjax.numerics.attend over the same keys laid out contiguously (an
independent path: einsum + softmax); pages a row does not own hold NaN, so any read past
a row's keys shows. Tolerance: float32 with the sums reordered (per-page online softmax,
vector dots) and a polynomial exp (relative error ~1e-7): rtol 1e-5, atol 1e-6, as the
XLA paged path's test.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from ftjax import paged_kv
from ftjax.cache import KVCache
from ftjax.numerics import attend
from pallas_kernels import cpu_native
from pallas_kernels import cpu_paged_attention as cpu

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel")


def _case(n, kv, h, ps, lens, kv_dtype, t, seed=0):
    """Pools with rows of `lens` tokens on shuffled pages (every other page NaN), the
    same keys in a contiguous cache, and `t` queries per row ending at its last token."""
    cfg = tiny_config(n_heads=n, n_kv_heads=kv, head_dim=h, max_positions=128)
    rng = np.random.default_rng(seed)
    b, m = len(lens), -(-max(lens) // ps) + 1
    num = b * m + 4
    dtype = jnp.bfloat16 if kv_dtype == "bfloat16" else jnp.float32   # bf16 pools
    kv_dtype = None if kv_dtype == "bfloat16" else kv_dtype
    pool = paged_kv.zeros(cfg, num, ps, dtype, kv_dtype)
    nan = jnp.float32(jnp.nan)
    if kv_dtype is None:
        pool = pool.replace(k=jnp.full_like(pool.k, nan), v=jnp.full_like(pool.v, nan))
    else:
        pool = pool.replace(k_scale=jnp.full_like(pool.k_scale, nan),
                            v_scale=jnp.full_like(pool.v_scale, nan))
    s = m * ps
    cache = KVCache.zeros(cfg, b, s, dtype, kv_dtype)
    table = rng.integers(0, num, (b, m))       # entries past a row's pages: never read
    free = list(rng.permutation(np.arange(1, num)))
    for row, n_tok in enumerate(lens):
        table[row, :-(-n_tok // ps)] = [free.pop() for _ in range(-(-n_tok // ps))]
    table = jnp.asarray(table, jnp.int32)
    pos = np.where(np.arange(s)[None] < np.asarray(lens)[:, None], np.arange(s)[None], -1)
    pos = jnp.asarray(pos, jnp.int32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype) for _ in range(2))
    for layer in range(cfg.n_layers):
        pool = paged_kv.write(pool, layer, table, None, pos, k, v)
        cache = cache.update(layer, k, v, pos)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    q_pos = np.asarray(lens)[:, None] - t + np.arange(t)[None]
    q_pos = jnp.asarray(np.where(q_pos >= 0, q_pos, -1), jnp.int32)
    slopes = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
    return cfg, pool, cache, table, q, q_pos, slopes, s


@pytest.mark.parametrize("n,kv,h,ps,kv_dtype,t,alibi", [
    # < 4 queries per kv head: scored one query at a time
    (4, 4, 64, 16, None, 1, False),    # MHA decode, gpt2's head width: whole AVX-512 vectors
    (4, 4, 24, 4, "int8", 1, True),    # a width with a vector tail, int8 pages, ALiBi
    # >= 4: four queries at a time against transposed keys (GQA decode, prefill chunks)
    (8, 2, 24, 4, None, 1, True),      # GQA decode (G = 4), tail, ALiBi
    (4, 1, 8, 8, "int8", 1, True),     # MQA decode, int8 pages with scales
    (4, 2, 80, 16, "int8", 3, False),  # 6 queries per kv head: a partial tile
    (6, 2, 24, 16, None, 5, True),     # 15 per kv head: tiles of 4, 4, 4, 3; tail; ALiBi
    (4, 4, 64, 16, None, 20, False),   # a prefill chunk crossing pages, causal inside
    (4, 4, 24, 4, "bfloat16", 1, True),   # bf16 pages (a bf16 model's), decode, tail
    (8, 2, 64, 16, "bfloat16", 5, False),  # bf16 pages, GQA prefill tiles
])
def test_cpu_paged_attention_matches_contiguous_attend(n, kv, h, ps, kv_dtype, t, alibi):
    """Rows of 1, 37, 0 (padding: zeros out) and 70 tokens (queries before a row's first
    token are padding too); the layer index traced."""
    assert cpu.available()
    lens = [1, 37, 0, 70]
    cfg, pool, cache, table, q, q_pos, slopes, s = _case(n, kv, h, ps, lens, kv_dtype, t)
    slopes = slopes if alibi else None
    layer = cfg.n_layers - 1
    scales = (None, None) if cache.k_scale is None else (cache.k_scale[layer], cache.v_scale[layer])
    # bf16 pages: the reference attends over their exact float32 values
    want = attend(q, cache.k[layer].astype(jnp.float32), cache.v[layer].astype(jnp.float32),
                  q_pos, jnp.arange(s), slopes, heads_first=True, k_scale=scales[0],
                  v_scale=scales[1])
    got = jax.jit(lambda pool, layer: paged_kv.attend(
        pool, layer, q, q_pos, table, slopes, max_len=s, kernels="cpu"))(pool, jnp.int32(layer))
    assert np.isfinite(np.asarray(got)).all()   # no NaN page was read
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.asarray(got[2]).any()


def test_attend_takes_the_kernel_for_float32_and_bf16():
    """paged_kv.attend(kernels="cpu") lowers to the FFI call for decode and prefill
    chunks alike, bf16 queries too (taken in float32, the result cast back); float16
    queries take the XLA path (and the kernel refuses them)."""
    assert cpu.available()
    cfg, pool, _, table, q, q_pos, slopes, s = _case(4, 2, 16, 4, [5, 9], None, 1)

    def hlo(q, q_pos):
        f = jax.jit(lambda q: paged_kv.attend(pool, 0, q, q_pos, table, slopes, max_len=s,
                                              kernels="cpu"))
        return f.lower(q).as_text()

    assert cpu.TARGETS["float32"] in hlo(q, q_pos)
    long_q = jnp.zeros((2, 16, 4, 16), jnp.float32)
    long_pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    assert cpu.TARGETS["float32"] in hlo(long_q, long_pos)
    assert cpu.TARGETS["float32"] in hlo(q.astype(jnp.bfloat16), q_pos)
    assert cpu.TARGETS["float32"] not in hlo(q.astype(jnp.float16), q_pos)
    assert "float16" in cpu.supported(q.astype(jnp.float16), pool.k)
    with pytest.raises(ValueError, match="float16"):
        cpu.paged_attention(q.astype(jnp.float16), pool.k, pool.v, table, q_pos, 0)


def test_kernels_for_picks_the_kernel_on_one_cpu_device(monkeypatch):
    assert paged_kv.kernels_for("xla", sharded=False) == "cpu"
    assert paged_kv.kernels_for("xla", sharded=True) == "xla"     # no partitioning rule
    assert paged_kv.kernels_for("pallas", sharded=False) == "pallas"
    monkeypatch.setenv("FTJAX_CPU_KERNELS", "0")
    assert paged_kv.kernels_for("xla", sharded=False) == "xla"


def test_a_failed_build_warns_and_leaves_the_xla_path(monkeypatch, tmp_path):
    """No working compiler: available() is False with one warning naming the failure
    (the compiler's command), and the engine's attention stays on XLA. The build writes
    nothing half-made into the cache."""
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("FTJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*false"):
        assert not cpu.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # decided once: no second warning
        assert not cpu.available()
        assert paged_kv.kernels_for("xla", sharded=False) == "xla"
    assert list(tmp_path.iterdir()) == []


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    """The library's name keys every source and header, jax's version and the CPU: a
    changed source or header builds anew instead of loading a stale library."""
    monkeypatch.setenv("FTJAX_CACHE_DIR", str(tmp_path))
    first = cpu_native.library_path()
    assert first.startswith(str(tmp_path)) and first == cpu_native.library_path()
    for name in ("SOURCES", "HEADERS"):
        files = getattr(cpu_native, name)
        assert files
        changed = tmp_path / os.path.basename(files[0])
        changed.write_text(open(files[0]).read() + "\n// changed\n")
        monkeypatch.setattr(cpu_native, name, [str(changed), *files[1:]])
        assert cpu_native.library_path() != first
        monkeypatch.setattr(cpu_native, name, files)
    assert cpu_native.library_path() == first


def test_bf16_kv_kept_as_bits_where_xla_would_upcast_its_writes():
    """jax < 0.11 on CPU: a bf16 cache the kernels read is stored as its uint16 bits
    (XLA:CPU upcasts a bf16 scatter, and a bitcast around each write copies the cache
    whole). Written through `update` / `paged_kv.write` and read by the kernel (bits
    taken as bf16) or by XLA's path (bitcast back), attention equals the bf16 cache's."""
    if not cpu.available():
        pytest.skip("the kernel is not built here")
    cfg = tiny_config(n_heads=4, n_kv_heads=2, head_dim=16, max_positions=64)
    old = tuple(int(x) for x in jax.__version__.split(".")[:2]) < (0, 11)
    want = jnp.uint16 if old else jnp.bfloat16
    rng = np.random.default_rng(3)
    b, s, ps = 2, 32, 8
    k, v = (jnp.asarray(rng.standard_normal((b, s, 2, 16)), jnp.bfloat16) for _ in range(2))
    pos = jnp.asarray(np.where(np.arange(s)[None] < np.array([[20], [32]]),
                               np.arange(s)[None], -1), jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, 1, 4, 16)), jnp.float32)
    q_pos = jnp.array([[19], [31]], jnp.int32)
    ref_cache = KVCache.zeros(cfg, b, s, jnp.float32, kernels="xla")   # the bf16 values
    bf16_cache = KVCache.zeros(cfg, b, s, jnp.bfloat16, kernels="xla")
    cache = KVCache.zeros(cfg, b, s, jnp.bfloat16, kernels="cpu")
    pool = paged_kv.zeros(cfg, b * s // ps + 1, ps, jnp.bfloat16, kernels="cpu")
    assert cache.k.dtype == want and pool.k.dtype == want
    table = jnp.arange(1, b * s // ps + 1, dtype=jnp.int32).reshape(b, s // ps)
    for layer in range(cfg.n_layers):
        ref_cache = ref_cache.update(layer, k, v, pos)
        bf16_cache = bf16_cache.update(layer, k, v, pos)
        cache = cache.update(layer, k, v, pos)
        pool = paged_kv.write(pool, layer, table, None, pos, k, v)
    for layer in range(cfg.n_layers):
        ref = ref_cache.attend(layer, q, q_pos)
        for got in (cache.attend(layer, q, q_pos),
                    paged_kv.attend(pool, layer, q, q_pos, table, max_len=s, kernels="cpu")):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        # XLA's path over the bits (bitcast back) = over a bf16 cache: both compute in
        # bf16 (products rounded to 8 bits: 2e-2 covers it; wrong bits are O(1) off).
        np.testing.assert_allclose(
            paged_kv.attend(pool, layer, q, q_pos, table, max_len=s, kernels="xla"),
            bf16_cache.attend(layer, q, q_pos).astype(jnp.float32), rtol=0, atol=2e-2)
