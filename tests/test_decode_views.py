"""The `generate` decode loop runs in segments whose attention reads a static view of
the cache's first slots (`KVCache.views`, issue 19): the tokens and log-probs it gives
across a view boundary are the teacher-forced model's, for float and int8 KV caches."""

import jax
import numpy as np
import pytest

import ftjax
import ftjax.cache
from ftjax.cache import MIN_VIEW, view_sizes
from ftjax.api import Model
from tiny import tiny_config, tiny_params


def test_view_sizes():
    assert view_sizes(MIN_VIEW) == (MIN_VIEW,)
    assert view_sizes(4 * MIN_VIEW) == (MIN_VIEW, 2 * MIN_VIEW, 4 * MIN_VIEW)
    assert view_sizes(3 * MIN_VIEW) == (MIN_VIEW, 2 * MIN_VIEW, 3 * MIN_VIEW)
    assert view_sizes(64) == (64,)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_generate_across_a_view_boundary_matches_forward(monkeypatch, kv_dtype):
    read = set()  # slot counts decode attention read, recorded while tracing
    attend_first = ftjax.cache._attend_first

    def spy(n, q, *args):
        if q.shape[1] == 1:
            read.add(n)
        return attend_first(n, q, *args)

    monkeypatch.setattr(ftjax.cache, "_attend_first", spy)
    cfg = tiny_config(max_positions=2 * MIN_VIEW)
    model = Model(cfg, tiny_params(cfg), "float32", kv_cache_dtype=kv_dtype)
    # rows of different lengths; positions 230..269 and 200..239 + the next chunk
    # cross slot MIN_VIEW = 256 (the cache has more slots)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (230, 200)]
    greedy = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])
    out = model.generate(prompts, max_new_tokens=40, sampling=greedy)
    # two segments: the first read MIN_VIEW slots, the second the whole cache
    assert len(read) == 2 and min(read) == MIN_VIEW, read

    for prompt, toks, lps in zip(prompts, out.tokens, out.log_probs):
        assert len(toks) == 40
        seq = np.asarray([prompt + toks])
        logp = np.asarray(jax.nn.log_softmax(model.forward(seq)[0], axis=-1))
        want = logp[len(prompt) - 1:-1]  # the distribution each new token came from
        np.testing.assert_array_equal(toks, want.argmax(-1))
        # float32 sums in another order (decode vs one causal pass) and, for int8, the
        # same per-token quantization of K/V computed by another matmul shape: 1e-4
        # absolute is well above that and far below a wrong-token or wrong-slot error.
        np.testing.assert_allclose(lps, want[np.arange(40), toks], atol=1e-4)
