"""XLA attention over a cache streams its keys block by block (`numerics.attend_blocks`,
online softmax) and visits only the blocks some query can see: equal to attention over
the whole cache at once, float32 up to rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import numerics
from ftjax.cache import KVCache
from ftjax.numerics import attend
from tiny import tiny_config


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("slots", [96, 100])     # 3 whole blocks of 32; a partial last one
def test_blocked_cache_attention_equals_attention_over_the_whole_cache(
        monkeypatch, kv_dtype, slots):
    monkeypatch.setattr(numerics, "KEY_BLOCK", 32)
    cfg = tiny_config(n_heads=4, n_kv_heads=2, max_positions=128)
    rng = np.random.default_rng(0)
    b, kvh, h = 3, cfg.n_kv_heads, cfg.head_dim
    cache = KVCache.zeros(cfg, b, slots, jnp.float32, kv_dtype)
    shape = (b, slots, kvh, h)
    # every slot written, also those after the queries: the mask alone must hide them
    cache = cache.update(1, jnp.asarray(rng.standard_normal(shape), jnp.float32),
                         jnp.asarray(rng.standard_normal(shape), jnp.float32),
                         jnp.broadcast_to(jnp.arange(slots), (b, slots)))
    slopes = jnp.asarray(rng.uniform(0.05, 0.5, cfg.n_heads), jnp.float32)
    scales = (None, None) if kv_dtype is None else (cache.k_scale[1], cache.v_scale[1])
    # decode rows ending in the first, a middle and the last block; a prefill of 7
    # queries per row incl. padding (-1: sees nothing, gives zeros)
    cases = [[[5], [40], [slots - 1]], [[0], [31], [32]],
             [[p - 6 + i if i < 6 else -1 for i in range(7)] for p in (6, 50, slots - 1)]]
    for pos in cases:
        pos = jnp.asarray(pos, jnp.int32)
        q = jnp.asarray(rng.standard_normal((b, pos.shape[1], cfg.n_heads, h)), jnp.float32)
        for sl in (None, slopes):
            got = jax.jit(lambda c, q, p, s: c.attend(1, q, p, s))(cache, q, pos, sl)
            want = attend(q, cache.k[1], cache.v[1], pos, jnp.arange(slots), sl,
                          heads_first=True, k_scale=scales[0], v_scale=scales[1])
            # same terms; the softmax is summed per block (a few ulps apart)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
            assert not np.asarray(got)[pos < 0].any()


def test_blocks_past_every_query_are_not_visited():
    """The loop's trip count is set at run time by the furthest query: blocks no query
    can see are never read (the step's cost follows the tokens in use)."""
    seen = []
    k = jnp.ones((1, 1, 16, 4), jnp.float32)

    def block(i):
        jax.debug.callback(lambda i: seen.append(int(i)), i)
        return i * 16, k, k, None, None

    q = jnp.ones((1, 1, 1, 4), jnp.float32)
    f = jax.jit(lambda p: numerics.attend_blocks(q, p, block, 16, 64))
    for last, blocks in ((40, [0, 1, 2]), (15, [0]), (16, [0, 1]), (-1, [])):
        seen.clear()
        jax.block_until_ready(f(jnp.asarray([[last]], jnp.int32)))
        assert seen == blocks, (last, seen)
