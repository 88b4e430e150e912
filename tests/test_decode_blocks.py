"""Long-context decode through `generate` on the contiguous cache (issue 19): attention
streams the cache block by block as far as the furthest query (`numerics.attend_blocks`);
the tokens and log-probs it gives while positions cross block boundaries are the
teacher-forced model's (`Model.forward`), for float and int8 KV caches."""

import jax
import numpy as np
import pytest

import ftjax
from ftjax import numerics
from ftjax.api import Model
from tiny import tiny_config, tiny_params


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_generate_across_key_blocks_matches_forward(monkeypatch, kv_dtype):
    # blocks of 32 slots (traced with the patched size: a fresh model, a fresh jit);
    # rows of different lengths, 40 new tokens: positions 70..109 and 45..84 cross
    # block boundaries 96 and 64 in the middle of a decode chunk
    monkeypatch.setattr(numerics, "KEY_BLOCK", 32)
    cfg = tiny_config(max_positions=128)
    model = Model(cfg, tiny_params(cfg), "float32", kv_cache_dtype=kv_dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (70, 45)]
    greedy = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])
    out = model.generate(prompts, max_new_tokens=40, sampling=greedy)

    for prompt, toks, lps in zip(prompts, out.tokens, out.log_probs):
        assert len(toks) == 40
        seq = np.asarray([prompt + toks])
        logp = np.asarray(jax.nn.log_softmax(model.forward(seq)[0], axis=-1))
        want = logp[len(prompt) - 1:-1]  # the distribution each new token came from
        np.testing.assert_array_equal(toks, want.argmax(-1))
        # float32 sums in another order (one query per step, online softmax per block
        # vs one causal pass) and, for int8, the same per-token quantization of K/V
        # from another matmul shape: 1e-4 absolute is well above that; a skipped last
        # block already changes a greedy token here (checked by breaking the trip count).
        np.testing.assert_allclose(lps, want[np.arange(40), toks], atol=1e-4)
