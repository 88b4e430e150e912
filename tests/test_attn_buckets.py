"""Decode attention over length buckets (FTJAX_ATTN_BUCKETS=1, issue 19's lever): it
reads only the first bucket of slots holding every row's tokens, and its result is
attention over the whole cache's (the slots it skips are masked there anyway)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.cache import MIN_BUCKET, KVCache, bucket_sizes
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bucket_sizes():
    assert bucket_sizes(MIN_BUCKET) == (MIN_BUCKET,)
    assert bucket_sizes(4 * MIN_BUCKET) == (MIN_BUCKET, 2 * MIN_BUCKET, 4 * MIN_BUCKET)
    assert bucket_sizes(3 * MIN_BUCKET) == (MIN_BUCKET, 2 * MIN_BUCKET, 3 * MIN_BUCKET)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_bucketed_decode_attention_equals_the_full_cache(monkeypatch, kv_dtype):
    cfg = tiny_config(n_kv_heads=2, max_positions=4 * MIN_BUCKET)
    slots = 4 * MIN_BUCKET
    rng = np.random.default_rng(0)
    cache = KVCache.zeros(cfg, 3, slots, jnp.float32, kv_dtype)
    shape = (3, slots, cfg.n_kv_heads, cfg.head_dim)
    # every slot written, the unused ones too: the mask alone must hide them
    cache = cache.update(0, jnp.asarray(rng.standard_normal(shape), jnp.float32),
                         jnp.asarray(rng.standard_normal(shape), jnp.float32),
                         jnp.broadcast_to(jnp.arange(slots), (3, slots)))
    q = jnp.asarray(rng.standard_normal((3, 1, cfg.n_heads, cfg.head_dim)), jnp.float32)

    def run(flag, pos):
        monkeypatch.setenv("FTJAX_ATTN_BUCKETS", flag)
        # a fresh jit per call: the flag is read when tracing
        return np.asarray(jax.jit(lambda c, q, p: c.attend(0, q, p))(cache, q, pos))

    # rows ending in the first, second and last bucket; and all rows in the first
    for pos in ([[10], [300], [1000]], [[0], [MIN_BUCKET - 1], [5]], [[slots - 1]] * 3):
        pos = jnp.asarray(pos, jnp.int32)
        full, bucketed = run("0", pos), run("1", pos)
        # same terms; only the summation over masked (zero) probabilities differs
        np.testing.assert_allclose(bucketed, full, rtol=1e-5, atol=1e-6)


def test_bucketed_decode_attention_reads_a_bucket_not_the_cache():
    # the compiled decode attention holds one branch per bucket, each slicing its slots
    cfg = tiny_config(max_positions=4 * MIN_BUCKET)
    cache = KVCache.zeros(cfg, 1, 4 * MIN_BUCKET, jnp.float32)
    q = jnp.zeros((1, 1, cfg.n_heads, cfg.head_dim), jnp.float32)
    pos = jnp.zeros((1, 1), jnp.int32)
    os.environ["FTJAX_ATTN_BUCKETS"] = "1"
    try:
        text = jax.jit(lambda c, q, p: c.attend(0, q, p)).lower(cache, q, pos).as_text()
    finally:
        del os.environ["FTJAX_ATTN_BUCKETS"]
    assert "case" in text  # lax.switch
    for n in bucket_sizes(4 * MIN_BUCKET):
        assert f"{n}x8xf32" in text or f"x{n}x8xf32" in text


@pytest.mark.slow
def test_generate_with_buckets_gives_the_same_tokens():
    # greedy tokens through the whole engine, across a bucket boundary (prompt 240,
    # 40 new: positions 240..279 cross 256), with and without buckets
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "import numpy as np, ftjax; from tiny import tiny_model;"
        "m = tiny_model(max_positions=512);"
        "p = np.random.default_rng(0).integers(0, 97, (2, 240)).tolist();"
        "sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[]);"
        "print(m.generate(p, max_new_tokens=40, sampling=sp).tokens)")
    outs = []
    for flag in ("0", "1"):
        env = dict(os.environ, FTJAX_ATTN_BUCKETS=flag)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=False)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1] and len(outs[0]) > 100
