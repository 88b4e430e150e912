"""Logits processors that read a row's history, as per-row array code.

Every function takes the whole batch: float32 logits `[B, V]`, the history
`hist` int32 `[B, S]` (row b's tokens by position, prompt then output; -1
where there is no token, e.g. soft-prompt slots), `hist_len` `[B]` (tokens in
the history) and the per-row options in `SamplingArrays`. A row whose option is
off passes through unchanged, so one compiled step serves every mix of options.

Order: OpenAI's logit_bias first (added to the model's logits), then HuggingFace
`generate()`'s order: repetition penalty (then OpenAI's presence /
frequency penalties), no-repeat n-gram, bad words, min_new_tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.numerics import NEG_INF
from ftjax.sampling import SamplingArrays



def token_counts(hist, start, end, vocab: int):
    """How often each token occurs in `hist[b, start[b]:end[b]]`: int32 `[B, V]`."""
    b, s = hist.shape
    slot = jnp.arange(s)[None, :]
    inside = (slot >= start[:, None]) & (slot < end[:, None]) & (hist >= 0)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    counts = jnp.zeros((b, vocab), jnp.int32)
    return counts.at[rows, jnp.where(inside, hist, vocab)].add(1, mode="drop")


def _ban(logits, tokens, banned):
    """Sets logits[b, tokens[b, i]] = -inf where banned[b, i]."""
    b, v = logits.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], tokens.shape)
    idx = jnp.where(banned & (tokens >= 0), tokens, v)
    return jnp.asarray(logits).at[rows, idx].set(NEG_INF, mode="drop")


def tail_matches(hist, hist_len, seqs, n_match):
    """Whether each row's history ends with the first `n_match` tokens of each sequence.

    Args:
      seqs: int32 `[B, W, L]`; n_match: int32 `[B, W]` (0 matches always).
    Returns:
      bool `[B, W]`.
    """
    b, w, length = seqs.shape
    i = jnp.arange(length)[None, None, :]
    idx = hist_len[:, None, None] - n_match[:, :, None] + i            # [B, W, L]
    got = jnp.take_along_axis(hist, jnp.clip(idx, 0, hist.shape[1] - 1).reshape(b, -1),
                              axis=1).reshape(b, w, length)
    ok = (i >= n_match[:, :, None]) | ((got == seqs) & (idx >= 0))
    return jnp.all(ok, axis=-1)


def penalties(logits, sp: SamplingArrays, seen, counts):
    """HF's repetition penalty over `seen` tokens, then OpenAI's presence/frequency
    penalties over the output `counts` `[B, V]`."""
    r = sp.rep_penalty[:, None]
    penalized = jnp.where(logits < 0, logits * r, logits / r)
    logits = jnp.where(seen, penalized, logits)
    c = counts.astype(jnp.float32)
    return logits - sp.presence[:, None] * (c > 0) - sp.frequency[:, None] * c


def ban_repeated_ngrams(logits, hist, hist_len, n):
    """HF's no_repeat_ngram_size: bans every token that would repeat an n-gram.

    For each start j with j + n - 1 < hist_len whose first n - 1 tokens equal the
    history's last n - 1 tokens, the token at j + n - 1 is banned. n: `[B]`, 0 = off.
    """
    b, s = hist.shape
    j = jnp.arange(s)[None, :]
    prefix_start = hist_len - n + 1                                      # [B]

    def body(i, match):
        here = jnp.take_along_axis(hist, jnp.clip(j + i, 0, s - 1), axis=1)
        tail = jnp.take_along_axis(hist, jnp.clip(prefix_start + i, 0, s - 1)[:, None], axis=1)
        return match & ((here == tail) | (i >= n[:, None] - 1))

    match = jax.lax.fori_loop(0, jnp.maximum(jnp.max(n) - 1, 0), body,
                              jnp.ones((b, s), jnp.bool_))
    valid = (n[:, None] > 0) & (j + n[:, None] - 1 < hist_len[:, None])
    follower = jnp.take_along_axis(hist, jnp.clip(j + n[:, None] - 1, 0, s - 1), axis=1)
    return _ban(logits, follower, match & valid)


def ban_bad_words(logits, hist, hist_len, sp: SamplingArrays):
    """Bans the last token of every bad word whose other tokens end the history."""
    n = jnp.maximum(sp.bad_len - 1, 0)
    hit = tail_matches(hist, hist_len, sp.bad_ids, n) & (sp.bad_len > 0)
    last = jnp.take_along_axis(sp.bad_ids, n[..., None], axis=-1)[..., 0]
    return _ban(logits, last, hit)


def ban_early_stop(logits, n_gen, sp: SamplingArrays):
    """min_new_tokens: stop tokens cannot be produced before `min_new` tokens exist."""
    early = (n_gen < sp.min_new)[:, None]
    return _ban(logits, sp.stop_ids, jnp.broadcast_to(early, sp.stop_ids.shape))


def process(logits, sp: SamplingArrays, hist, hist_len, seen, counts, n_gen):
    """logit_bias, then all history-dependent processors in HF's order.

    Args:
      logits: float32 `[B, V]` (or log-probabilities, for beam search as HF does).
      seen: bool `[B, V]` tokens in prompt or output; counts: int32 `[B, V]` output counts.
      n_gen: int32 `[B]` tokens generated so far.
    """
    logits = logits + sp.bias
    logits = penalties(logits, sp, seen, counts)
    logits = ban_repeated_ngrams(logits, hist, hist_len, sp.ngram)
    logits = ban_bad_words(logits, hist, hist_len, sp)
    return ban_early_stop(logits, n_gen, sp)


def hit_stop_sequence(hist, hist_len, sp: SamplingArrays):
    """bool `[B]`: the history now ends with one of the row's stop sequences."""
    hit = tail_matches(hist, hist_len, sp.stop_seq_ids, sp.stop_seq_len) & (sp.stop_seq_len > 0)
    return jnp.any(hit, axis=-1)
