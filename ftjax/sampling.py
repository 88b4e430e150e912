"""Per-request sampling options and the jitted token sampler.

`SamplingParams` is what a user writes, one per request. `SamplingArrays` is
the same for a whole batch as per-row arrays, so every row of a batch can carry
its own options without a Python branch (or a recompile) inside the decode step.
The logits processors that read the generated history (penalties, n-gram and
bad-word bans, min_new_tokens) live in `ftjax.processors`.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from typing import Mapping, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.buckets import next_pow2
from ftjax.numerics import NEG_INF, argmax

MAX_LOGPROBS = 20  # the most alternatives `logprobs` / `prompt_logprobs` may ask for


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _id_sequences(value, field: str) -> Optional[Tuple[Tuple[int, ...], ...]]:
    if value is None:
        return None
    try:
        seqs = tuple(tuple(s) for s in value)
    except TypeError:
        raise ValueError(f"SamplingParams.{field} must be a list of token-id lists, "
                         f"got {value!r}") from None
    for s in seqs:
        if not s or not all(_is_int(t) and t >= 0 for t in s):
            raise ValueError(f"SamplingParams.{field} entries must be non-empty lists of "
                             f"non-negative token ids, got {list(s)!r}")
    return tuple(tuple(int(t) for t in s) for s in seqs)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate one request (the defaults are greedy decoding).

    Processors, applied in HuggingFace `generate()`'s order before any sampling:
      repetition_penalty: HF's multiplicative penalty (> 0, 1 = off) on every token
        already in the prompt or the output: a positive logit is divided by it,
        a negative one multiplied.
      presence_penalty, frequency_penalty: OpenAI's additive penalties over the
        tokens generated so far: logit -= presence * (count > 0) + frequency * count.
      no_repeat_ngram_size: never produce an n-gram (over prompt + output) twice (0 = off).
      bad_words: token sequences never produced (the last token of a sequence is
        banned whenever the output ends with the rest of it).
      min_new_tokens: stop tokens are banned until this many tokens were generated.
      logit_bias: {token id: bias} added to those tokens' logits before every other
        processor (OpenAI's logit_bias; a bias in [-100, 100], -100 bans in effect).
    Sampling (temperature 0 is greedy and ignores the rest):
      temperature, top_k (0 = off), top_p (1 = off), min_p (0 = off: keep tokens
      whose probability is >= min_p x the top token's), seed (None draws one per call).
    Stopping:
      max_new_tokens: overrides the `generate` call's budget for this request.
      stop_token_ids: None means the model's eos ids; these tokens end the request
        (and are returned). ignore_eos: the eos ids do not stop (explicit
        stop_token_ids still do). stop_sequences: token sequences that end the
        request when the output ends with one. stop_strings: texts that end the
        request when the decoded output contains one (needs a tokenizer).
    Returned extras:
      logprobs: the N most likely alternatives (and their log-probabilities) for
        each generated token (0 = off, at most 20). prompt_logprobs: the same for
        every prompt token after the first (None = off).
    Several sequences:
      n: independent samples of this prompt (one shared prefill), or with beams
        the number of beams returned. num_beams > 1: beam search as HF
        `generate(num_beams=...)`, with length_penalty and early_stopping
        (True, False or "never").
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    max_new_tokens: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None
    stop_sequences: Optional[Sequence[Sequence[int]]] = None
    stop_strings: Optional[Sequence[str]] = None
    bad_words: Optional[Sequence[Sequence[int]]] = None
    seed: Optional[int] = None
    logprobs: int = 0
    prompt_logprobs: Optional[int] = None
    ignore_eos: bool = False
    n: int = 1
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: object = False
    logit_bias: Optional[Mapping[int, float]] = None

    def __post_init__(self):
        def fail(field, rule):
            raise ValueError(f"SamplingParams.{field} {rule}, got {getattr(self, field)!r}")

        for f in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "length_penalty"):
            # NaN passes no comparison test and Inf passes "> 0": refuse both first.
            if _is_num(getattr(self, f)) and not np.isfinite(getattr(self, f)):
                fail(f, "must be a finite number")
        if not _is_num(self.temperature) or not self.temperature >= 0:
            fail("temperature", "must be >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an int >= 0 (0 = off)")
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not _is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not _is_num(self.repetition_penalty) or not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be > 0 (1 = off)")
        for f in ("presence_penalty", "frequency_penalty"):
            if not _is_num(getattr(self, f)) or not -2 <= getattr(self, f) <= 2:
                fail(f, "must be in [-2, 2] (0 = off)")
        for f in ("no_repeat_ngram_size", "min_new_tokens", "logprobs"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 0:
                fail(f, "must be an int >= 0")
        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens)
                                                or self.max_new_tokens < 0):
            fail("max_new_tokens", "must be an int >= 0 or None")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            fail("min_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})")
        if self.logprobs > MAX_LOGPROBS:
            fail("logprobs", f"must be <= {MAX_LOGPROBS}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            fail("prompt_logprobs", f"must be None or an int in [0, {MAX_LOGPROBS}]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            fail("seed", "must be an int in [0, 2**32)")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a bool")
        if not _is_int(self.n) or self.n < 1:
            fail("n", "must be an int >= 1")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            fail("num_beams", "must be an int >= 1")
        if self.num_beams > 1 and self.n > self.num_beams:
            fail("n", f"(sequences returned) must be <= num_beams ({self.num_beams})")
        if self.num_beams > 1 and self.temperature != 0:
            fail("temperature", "must be 0 with num_beams > 1 (beam sampling is not supported)")
        if not _is_num(self.length_penalty):
            fail("length_penalty", "must be a number")
        if self.early_stopping not in (True, False, "never"):
            fail("early_stopping", 'must be True, False or "never"')
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(_is_int(i) and i >= 0 for i in ids):
                fail("stop_token_ids", "must be non-negative ints")
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        object.__setattr__(self, "stop_sequences",
                           _id_sequences(self.stop_sequences, "stop_sequences"))
        object.__setattr__(self, "bad_words", _id_sequences(self.bad_words, "bad_words"))
        if self.stop_strings is not None:
            if isinstance(self.stop_strings, str) or not all(
                    isinstance(s, str) and s for s in self.stop_strings):
                fail("stop_strings", "must be a list of non-empty strings")
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_processors(self) -> bool:
        """True when a logits processor (anything that reads the history) is on."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or self.no_repeat_ngram_size > 0
                or self.min_new_tokens > 0 or bool(self.bad_words) or bool(self.logit_bias))


MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit_bias value


def _bias_pairs(value) -> Tuple[Tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs (a frozen, hashable value)."""
    try:
        items = list(value.items())
    except AttributeError:
        raise ValueError(f"SamplingParams.logit_bias must be a mapping token id -> bias, "
                         f"got {value!r}") from None
    out = {}
    for t, b in items:
        if not _is_int(t) or t < 0:
            raise ValueError(f"SamplingParams.logit_bias keys must be token ids >= 0, got {t!r}")
        if not _is_num(b) or not np.isfinite(b) or abs(b) > MAX_LOGIT_BIAS:
            raise ValueError(f"SamplingParams.logit_bias[{t}] must be a number in "
                             f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {b!r}")
        out[int(t)] = float(b)
    return tuple(sorted(out.items()))


def _pack_sequences(rows: Sequence[Tuple[Tuple[int, ...], ...]], batch: int):
    """Ragged lists of token sequences -> (ids i32 [B, W, L] padded with -1, lengths [B, W])."""
    width = next_pow2(max([0] + [len(r) for r in rows]), 2)
    length = next_pow2(max([0] + [len(s) for r in rows for s in r]), 4)
    ids = np.full((batch, width, length), -1, np.int32)
    lens = np.zeros((batch, width), np.int32)
    for b, r in enumerate(rows):
        for w, s in enumerate(r):
            ids[b, w, :len(s)] = s
            lens[b, w] = len(s)
    return jax.device_put(ids), jax.device_put(lens)


@flax.struct.dataclass
class SamplingArrays:
    """A batch's options, one row per sequence (padding rows are greedy, budget 0)."""

    temperature: jax.Array   # f32 [B]
    top_k: jax.Array         # i32 [B], 0 = off
    top_p: jax.Array         # f32 [B]
    min_p: jax.Array         # f32 [B]
    seed: jax.Array          # u32 [B]
    stop_ids: jax.Array      # i32 [B, S], -1 = unused slot
    max_new: jax.Array       # i32 [B], tokens this row may generate
    min_new: jax.Array       # i32 [B]
    rep_penalty: jax.Array   # f32 [B]
    presence: jax.Array      # f32 [B]
    frequency: jax.Array     # f32 [B]
    ngram: jax.Array         # i32 [B], 0 = off
    bad_ids: jax.Array       # i32 [B, W, L] banned sequences, -1 padded
    bad_len: jax.Array       # i32 [B, W]
    stop_seq_ids: jax.Array  # i32 [B, W, L] stop sequences, -1 padded
    stop_seq_len: jax.Array  # i32 [B, W]
    bias: jax.Array          # f32 [B, V] logit_bias (dense: one compiled shape for any mix)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], batch: int, vocab_size: int,
              eos_token_ids: Sequence[int], max_new: Sequence[int],
              sample_index: Optional[Sequence[int]] = None) -> "SamplingArrays":
        """Packs one SamplingParams per row (rows past len(params) are padding).

        Args:
          sample_index: per row, which of its request's `n` samples it is: folded
            into the seed so the samples of one request differ.
        """
        n = len(params)
        stops = []
        for i, p in enumerate(params):
            ids = p.stop_token_ids
            if ids is None:
                # The model's eos ids; one outside the vocabulary can never be produced.
                ids = () if p.ignore_eos else tuple(t for t in eos_token_ids if t < vocab_size)
            stops.append(ids)
            for field, values in (("stop_token_ids", ids),
                                  ("logit_bias", [t for t, _ in p.logit_bias or ()]),
                                  ("bad_words", [t for s in p.bad_words or () for t in s]),
                                  ("stop_sequences", [t for s in p.stop_sequences or () for t in s])):
                bad = sorted({t for t in values if t >= vocab_size})
                if bad:
                    raise ValueError(f"sampling[{i}].{field} has token ids {bad[:5]} outside "
                                     f"the vocabulary (size {vocab_size})")
        width = next_pow2(max([0] + [len(s) for s in stops]), 1)
        stop_ids = np.full((batch, width), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s

        def col(values, pad, dtype):
            arr = np.full((batch,), pad, dtype)
            arr[:n] = values
            return jax.device_put(arr)   # jnp.asarray would compile per shape

        seeds = []
        for i, p in enumerate(params):
            seed = p.seed if p.seed is not None else secrets.randbits(32)
            j = 0 if sample_index is None else sample_index[i]
            seeds.append((seed + j * 0x9E3779B1) % 2**32)  # a distinct stream per sample
        bad_ids, bad_len = _pack_sequences([p.bad_words or () for p in params], batch)
        seq_ids, seq_len = _pack_sequences([p.stop_sequences or () for p in params], batch)
        bias = np.zeros((batch, vocab_size), np.float32)
        for i, p in enumerate(params):
            for t, b in p.logit_bias or ():
                bias[i, t] = b
        return cls(
            temperature=col([p.temperature for p in params], 0.0, np.float32),
            top_k=col([p.top_k for p in params], 0, np.int32),
            top_p=col([p.top_p for p in params], 1.0, np.float32),
            min_p=col([p.min_p for p in params], 0.0, np.float32),
            seed=col(seeds, 0, np.uint32),
            stop_ids=jax.device_put(stop_ids),
            max_new=col(list(max_new), 0, np.int32),
            min_new=col([p.min_new_tokens for p in params], 0, np.int32),
            rep_penalty=col([p.repetition_penalty for p in params], 1.0, np.float32),
            presence=col([p.presence_penalty for p in params], 0.0, np.float32),
            frequency=col([p.frequency_penalty for p in params], 0.0, np.float32),
            ngram=col([p.no_repeat_ngram_size for p in params], 0, np.int32),
            bad_ids=bad_ids, bad_len=bad_len, stop_seq_ids=seq_ids, stop_seq_len=seq_len,
            bias=jax.device_put(bias))

    def take(self, rows) -> "SamplingArrays":
        """The options of the given rows (e.g. to follow beams or expand samples)."""
        return jax.tree_util.tree_map(lambda a: a[rows], self)


# The head of the sorted vocabulary that `lax.top_k` finds without a full sort (XLA:CPU
# sorts 8 x 50,257 logits in ~87 ms; the top 64 take ~0.7 ms). A row whose filters keep
# only head tokens (top_k <= HEAD, or a top-p / min-p cut inside the head) is drawn
# from it; a row without filters draws from the whole vocabulary with no sort at all.
HEAD = 64


def _scale(logits, temperature):
    return logits / jnp.maximum(temperature, 1e-6)


def _head_rules(vals, full_lse, top_k, top_p, min_p):
    """The filters on the `HEAD` best scaled logits `vals` `[k]` (descending).

    Probabilities are normalised over the top-k survivors: the head itself when
    top_k in [1, k], else `full_lse` (their logsumexp, computed by the caller). Both
    sampling paths call this on the same values, so they keep the same head tokens.

    Returns (keep `[k]`, the kept mass of the head (for top-p), the min-p threshold).
    """
    k = vals.shape[-1]
    rank = jnp.arange(k)
    keep = (top_k <= 0) | (rank < top_k)
    in_head = (top_k > 0) & (top_k <= k)
    lse = jnp.where(in_head, jax.nn.logsumexp(jnp.where(keep, vals, NEG_INF)), full_lse)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.where(keep, jnp.exp(vals - lse), 0.0)
    mass = jnp.cumsum(probs)
    # top-p: keep a token if the mass before it is below top_p (the first always stays);
    # top_p >= 1 is off, as in HF (no float sum reaching 1.0 cuts the tail).
    keep = keep & ((top_p >= 1) | (mass - probs < top_p))
    floor = vals[0] + jnp.log(min_p)          # min-p: p >= min_p x the top p
    keep = keep & ((vals >= floor) | (rank == 0))
    return keep, mass[-1], floor


def warp(logits, temperature, top_k, top_p, min_p):
    """Temperature, top-k, top-p and min-p (HF's order) on one row's logits `[V]`.

    Returns (filtered scaled logits in sorted order `[V]`, the sort order `[V]`);
    removed tokens are -inf.
    """
    vocab = logits.shape[-1]
    k = min(HEAD, vocab)
    scaled = _scale(logits, temperature)
    order = jnp.argsort(-scaled)
    ranked = scaled[order]
    # top-k survivors' logsumexp (the whole vocabulary's when top_k is off)
    lse = jax.nn.logsumexp(scaled)
    lse = jnp.where((top_k > 0) & (top_k < vocab), jax.nn.logsumexp(
        jnp.where(jnp.arange(vocab) < top_k, ranked, NEG_INF)), lse)
    head, mass, floor = _head_rules(ranked[:k], lse, top_k, top_p, min_p)
    # The tail (ranks >= k): top-k, then top-p continuing the head's mass, then min-p.
    tail = ranked[k:]
    rank = jnp.arange(k, vocab)
    keep = (top_k <= 0) | (rank < top_k)
    probs = jnp.where(keep, jnp.exp(tail - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
    before = mass + jnp.cumsum(probs) - probs
    keep = keep & ((top_p >= 1) | ((mass < top_p) & (before < top_p))) & (tail >= floor)
    keep = jnp.concatenate([head, keep])
    return jnp.where(keep, ranked, NEG_INF), order


def _noise(key, vocab):
    """Gumbel noise of every token id: a draw is argmax(kept scaled logit + noise),
    `jax.random.categorical`'s rule, the same token whichever path finds it."""
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def _sample_row(logits, temperature, top_k, top_p, min_p, key):
    """One row's draw through a full sort of the vocabulary (any filters)."""
    filtered, order = warp(logits, temperature, top_k, top_p, min_p)
    return order[argmax(filtered + _noise(key, logits.shape[-1])[order])]


def _head(logits, temperature):
    """The batch's scaled logits `[B, V]`, their top `HEAD` (values, ids) and logsumexp.

    Computed once, outside every branch of `sample`: XLA:CPU runs `lax.top_k` as its
    TopK library call only in some program positions (inside `sample`'s branches it
    became a full sort of the vocabulary, measured), so the branches get its result."""
    scaled = _scale(logits, temperature[:, None])
    vals, idx = jax.lax.top_k(scaled, min(HEAD, logits.shape[-1]))
    return scaled, vals, idx, jax.nn.logsumexp(scaled, axis=-1)


def _covered(vals, lse, top_k, top_p, min_p, vocab: int):
    """Whether a row's draw needs no full sort: no filters, or filters that keep only
    `HEAD` tokens (top_k in [1, HEAD], or a top-p or min-p cut inside the head)."""
    k = vals.shape[-1]
    _, mass, floor = _head_rules(vals, lse, top_k, top_p, min_p)
    plain = (top_k <= 0) & (top_p >= 1) & (min_p <= 0)
    cut = (top_k <= 0) & (((top_p < 1) & (mass >= top_p)) | (vals[-1] < floor))
    return plain | ((top_k > 0) & (top_k <= k)) | cut | (k == vocab)


def _sample_row_fast(scaled, vals, idx, lse, top_k, top_p, min_p, key):
    """`_sample_row` for a `_covered` row, without a sort: the same token."""
    noise = _noise(key, scaled.shape[-1])
    keep = _head_rules(vals, lse, top_k, top_p, min_p)[0]
    head = idx[argmax(jnp.where(keep, vals, NEG_INF) + noise[idx])]
    plain = (top_k <= 0) & (top_p >= 1) & (min_p <= 0)
    return jnp.where(plain, argmax(scaled + noise), head)


def row_keys(seed, step):
    """Per-row PRNG keys: a row's draw depends only on its seed and its own counter.

    step: int or int32 `[B]` (per row: the index of the token being generated)."""
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), seed.shape)
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seed, step)


def sample(logits, sp: SamplingArrays, step, greedy_only: bool, live=None):
    """Picks the next token of every row from (already processed) logits.

    Args:
      logits: float32 `[B, V]`, after the logits processors.
      sp: the batch's options.
      step: int or int32 `[B]`, per row the index of the token being generated
        (folds into the row's key, so a row's sample depends only on its seed and
        its own token count, never on its batch mates or when it joined the batch).
      greedy_only: static; when every row is greedy the sort and draw are skipped.
      live: optional bool `[B]`, the rows whose token is used (the others' options
        do not decide which path runs).
    Returns:
      tokens int32 `[B]`.

    Which rows sample is known only at run time, so the paths are chosen per call
    (`lax.cond`): no draw when no live row samples; no sort when every sampling row
    is `_covered` (no filters, or filters inside the top `HEAD`); else a full sort.
    All give the same tokens for the same seeds.
    """
    greedy = argmax(logits, axis=-1)
    if greedy_only:
        return greedy
    hot = sp.temperature > 0
    if live is not None:
        hot = hot & live
    keys = row_keys(sp.seed, step)
    scaled, vals, idx, lse = _head(logits, sp.temperature)
    filters = (sp.top_k, sp.top_p, sp.min_p)

    def drawn(_):
        covered = jax.vmap(functools.partial(_covered, vocab=logits.shape[-1]))(
            vals, lse, *filters)
        short = jnp.all(~hot | covered)
        tok = jax.lax.cond(
            short, lambda: jax.vmap(_sample_row_fast)(scaled, vals, idx, lse, *filters, keys),
            lambda: jax.vmap(_sample_row)(logits, sp.temperature, *filters, keys))
        return jnp.where(hot, tok.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(hot), drawn, lambda _: greedy, None)
