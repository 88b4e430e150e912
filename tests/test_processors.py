"""Each logits processor / warper against HuggingFace's on random logits and histories.

Tolerance: the processors are elementwise float32 arithmetic on the same inputs
as HF's (float32 torch), so values agree to 1e-6 relative; masks (which tokens
are -inf) must be identical.
"""

import numpy as np
import pytest

import ftjax
from ftjax import processors
from ftjax.sampling import SamplingArrays, warp

pytestmark = pytest.mark.torch

V = 40
B = 4


def _setup(seed=0, length=14):
    """Random logits `[B, V]` and histories of ragged length over a small alphabet
    (so repeats, n-gram matches and bad-word prefixes actually occur)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    lengths = np.array([length, length - 3, 5, 1])
    hist = np.full((B, length + 4), -1, np.int32)
    for b, n in enumerate(lengths):
        hist[b, :n] = rng.integers(0, 6, n)
    return logits, hist, lengths


def _arrays(**kw):
    return SamplingArrays.build([ftjax.SamplingParams(**kw)] * B, B, V, (3,), [8] * B)


def _hf(processor, hist, lengths, logits):
    """HF processors take equal-length input_ids: apply row by row."""
    import torch

    out = []
    for b, n in enumerate(lengths):
        ids = torch.tensor(hist[b:b + 1, :n], dtype=torch.long)
        out.append(processor(ids, torch.tensor(logits[b:b + 1])).numpy()[0])
    return np.stack(out)


def _same(ours, ref):
    ours = np.asarray(ours)
    assert np.array_equal(np.isneginf(ours), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits, hist, lengths = _setup()
    sp = _arrays(repetition_penalty=penalty)
    seen = np.asarray(processors.token_counts(hist, np.zeros(B, np.int32), lengths, V)) > 0
    ours = processors.penalties(logits, sp, seen, np.zeros((B, V), np.int32))
    _same(ours, _hf(RepetitionPenaltyLogitsProcessor(penalty), hist, lengths, logits))


def test_presence_and_frequency_penalties_follow_openai():
    """OpenAI: logit -= presence * (count > 0) + frequency * count, over output tokens."""
    logits, hist, lengths = _setup()
    start = np.array([4, 2, 0, 0], np.int32)  # output begins after the prompt
    counts = np.asarray(processors.token_counts(hist, start, lengths, V))
    sp = _arrays(presence_penalty=0.5, frequency_penalty=0.25)
    ours = processors.penalties(logits, sp, np.zeros((B, V), bool), counts)
    ref = logits.copy()
    for b in range(B):
        for t in hist[b, start[b]:lengths[b]]:
            ref[b, t] -= 0.25
        for t in set(hist[b, start[b]:lengths[b]].tolist()):
            ref[b, t] -= 0.5
    _same(ours, ref)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    logits, hist, lengths = _setup(seed=n)
    ours = processors.ban_repeated_ngrams(logits, hist, lengths, np.full((B,), n, np.int32))
    ref = _hf(NoRepeatNGramLogitsProcessor(n), hist, lengths, logits)
    assert np.isneginf(ref).any()  # the case is not vacuous
    _same(ours, ref)


def test_bad_words():
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    logits, hist, lengths = _setup(seed=5)
    # single tokens, and sequences whose prefixes end some histories
    words = [[7], [hist[0, lengths[0] - 1], 9], [hist[1, lengths[1] - 2], hist[1, lengths[1] - 1], 11],
             [1, 2, 3, 4, 12]]
    words = [[int(t) for t in w] for w in words]
    sp = _arrays(bad_words=words)
    ours = processors.ban_bad_words(logits, hist, lengths, sp)
    ref = _hf(NoBadWordsLogitsProcessor(words, eos_token_id=39), hist, lengths, logits)
    assert np.isneginf(ref[0, 9]) and np.isneginf(ref[1, 11])
    _same(ours, ref)


def test_min_new_tokens():
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    logits, hist, lengths = _setup()
    n_gen = np.array([0, 2, 3, 9], np.int32)
    ours = processors.ban_early_stop(logits, n_gen, _arrays(min_new_tokens=3))
    ref = []
    for b in range(B):
        # HF counts new tokens as input length - prompt length.
        proc = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=10, min_new_tokens=3,
                                                 eos_token_id=3)
        import torch
        ids = torch.zeros((1, 10 + int(n_gen[b])), dtype=torch.long)
        ref.append(proc(ids, torch.tensor(logits[b:b + 1])).numpy()[0])
    _same(ours, np.stack(ref))


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.05),
])
def test_warpers_keep_the_same_tokens_as_hf(kw):
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits, _, _ = _setup(seed=3)
    chain = [TemperatureLogitsWarper(kw["temperature"])]
    if kw.get("top_k"):
        chain.append(TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        chain.append(TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        chain.append(MinPLogitsWarper(kw["min_p"]))
    ref = LogitsProcessorList(chain)(None, torch.tensor(logits)).numpy()
    sp = ftjax.SamplingParams(**kw)
    for b in range(B):
        filtered, order = warp(logits[b], sp.temperature, sp.top_k, sp.top_p, sp.min_p)
        ours = np.full(V, -np.inf, np.float32)
        ours[np.asarray(order)] = np.asarray(filtered)
        _same(ours, ref[b])


def test_sort_free_paths_draw_the_full_sorts_token():
    """Rows whose filters keep only the top HEAD tokens (top_k <= HEAD, a top-p or
    min-p cut inside the head) are drawn from a lax.top_k head, rows without filters
    from the whole vocabulary, neither sorting: the same token as the full-sort path
    for every seed, step and filter mix; a batch with any other sampling row takes the
    full sort; all-greedy batches draw nothing. A row without filters draws what
    `jax.random.categorical` draws from its scaled logits with its key."""
    import jax
    import jax.numpy as jnp

    from ftjax import sampling
    from ftjax.sampling import SamplingArrays, SamplingParams

    vocab, rows = 300, 8
    base = jax.random.normal(jax.random.PRNGKey(1), (rows, vocab)) * 3
    # rows 6 and 7 peaked, so their top-p / min-p cut falls inside the head of 64
    logits = base.at[6:, :5].add(12.0)
    sps = [SamplingParams(temperature=0.7, top_k=50, seed=1),
           SamplingParams(temperature=1.3, top_k=5, top_p=0.8, seed=2),
           SamplingParams(temperature=1.0, top_k=64, min_p=0.05, seed=3),
           SamplingParams(temperature=0.5, top_k=1, seed=4),
           SamplingParams(),                                 # greedy
           SamplingParams(temperature=0.9, seed=6),          # no filters: no sort
           SamplingParams(temperature=1.0, top_p=0.9, seed=7),
           SamplingParams(temperature=1.0, min_p=0.1, seed=8)]
    sp = SamplingArrays.build(sps, rows, vocab, (), [8] * rows)

    def full_sort(sp):
        return jax.jit(lambda lg, st: jnp.where(
            sp.temperature > 0,
            jax.vmap(sampling._sample_row)(lg, sp.temperature, sp.top_k, sp.top_p, sp.min_p,
                                           sampling.row_keys(sp.seed, st)),
            jnp.argmax(lg, -1)))

    def covered_rows(lg, sp):
        _, vals, _, lse = sampling._head(lg, sp.temperature)
        return jax.vmap(lambda *a: sampling._covered(*a, vocab=vocab))(
            vals, lse, sp.top_k, sp.top_p, sp.min_p)

    covered = covered_rows(logits, sp)
    assert bool(jnp.all(covered)), covered   # the fixture exercises the sort-free path
    full, fast = full_sort(sp), jax.jit(lambda lg, st: sampling.sample(lg, sp, st, False))
    for step in range(40):
        lg = logits + step * 0.01
        assert fast(lg, step).tolist() == full(lg, step).tolist(), step
        key = sampling.row_keys(sp.seed, step)[5]
        assert int(fast(lg, step)[5]) == int(jax.random.categorical(key, lg[5] / 0.9))
    # a row whose top-p nucleus leaves the head: the whole batch takes the full sort
    sps2 = sps[:7] + [SamplingParams(temperature=0.9, top_p=0.9, seed=9)]
    sp2 = SamplingArrays.build(sps2, rows, vocab, (), [8] * rows)
    flat = logits.at[7].set(base[7] * 0.1)
    assert not bool(covered_rows(flat, sp2)[7])
    for step in range(5):
        assert (sampling.sample(flat, sp2, step, False).tolist()
                == full_sort(sp2)(flat, step).tolist())
    # all greedy (or the sampling rows not live): argmax
    live = jnp.asarray([False] * 4 + [True] + [False] * 3)
    assert sampling.sample(logits, sp, 0, False, live)[4] == int(jnp.argmax(logits[4]))


def test_numerics_argmax_is_jnp_argmax():
    """The decode step's argmax (two plain reductions) picks what jnp.argmax picks:
    the first maximum, a NaN as the maximum, index 0 of an all -inf row; any axis."""
    import jax.numpy as jnp

    from ftjax.numerics import argmax

    rng = np.random.default_rng(0)
    cases = [np.array([[1.0, 3, 3, 2], [np.nan, 1, np.nan, 5], [-np.inf] * 4, [0.0] * 4]),
             rng.standard_normal((5, 300)).astype(np.float32),
             rng.integers(0, 3, (6, 9)).astype(np.float32)]     # many ties
    for x in cases:
        for axis in (-1, 0):
            assert (argmax(jnp.asarray(x), axis).tolist()
                    == jnp.argmax(jnp.asarray(x), axis).tolist())
