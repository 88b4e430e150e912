"""Prefill and the decode loop: pure jitted functions over an explicit state.

The model is only ever called as `Transformer(params, tokens, positions, cache)`;
the loop never sees its internals, and the cache (`ftjax.cache`) decides how
attention reads it. Shapes are bucketed by the caller (`ftjax.batching`, driven by
`ftjax.generation`) so that repeated calls inside a bucket reuse the compiled
functions; `Engine.trace_counts` counts how often each function was traced
(= compiled) so tests can assert it. Callers (generation, beams, sessions) use only
the public methods below; the host never writes device state itself (`stop_rows`
marks rows a host-side stop string ended).

Per row, the state holds the token to feed next (`last`) and its position
(`pos`). Prompts are right-padded: row b's token t sits at position start + t.
Every decode step writes the new key/value at the row's own position before
attending, so the padding slots a short prompt left in the cache are
overwritten before anyone can attend to them.

Shared contexts: prefill runs over the distinct prompts only (`U` rows) and
then gathers each output row's cache from its prompt (`rows` `[B]`), so n
samples of one prompt cost one prefill, as FasterTransformer's shared_contexts.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ftjax import processors
from ftjax import paged_kv
from ftjax.cache import KERNELS, KVCache
from ftjax.config import ModelConfig
from ftjax.model import Transformer
from ftjax.sampling import SamplingArrays, sample
from ftjax.sharding import RULES
from pallas_kernels import sharded

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2
DECODE_CHUNK = 8  # decode steps per while-loop iteration


@dataclasses.dataclass(frozen=True)
class Features:
    """Static switches of one compiled decode (each value compiles once).

    greedy_only: every row is greedy (no sort, no draw).
    processors: some row uses a history-dependent logits processor.
    top_n: alternatives recorded per generated token (0 = none).
    prompt_top_n: alternatives per prompt token (-1 = no prompt log-probs).
    """

    greedy_only: bool = True
    processors: bool = False
    top_n: int = 0
    prompt_top_n: int = -1


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array     # i32 [B, W] generated tokens (W >= the step budget)
    log_probs: jax.Array  # f32 [B, W] under the unmodified distribution
    top_ids: jax.Array    # i32 [B, W, top_n] most likely alternatives
    top_lps: jax.Array    # f32 [B, W, top_n] their log-probabilities
    hist: jax.Array       # i32 [B, P] every token by position (prompt, output); -1 = none
    seen: jax.Array       # bool [B, V] tokens in prompt or output ([B, 0] without processors)
    counts: jax.Array     # i32 [B, V] output token counts ([B, 0] without processors)
    last: jax.Array       # i32 [B] the token to feed next
    pos: jax.Array        # i32 [B] its position
    n_gen: jax.Array      # i32 [B] tokens generated so far
    finish: jax.Array     # i32 [B] FINISH_* reason, 0 while running
    step: jax.Array       # i32 [] steps taken


@flax.struct.dataclass
class PromptLogprobs:
    """Per distinct prompt: log p(token t+1 | tokens <= t) `[U, T]` and the top alternatives."""

    log_probs: jax.Array
    top_ids: jax.Array
    top_lps: jax.Array


def log_probs_and_top(logits, tokens, top_n: int):
    """log-softmax of `logits [..., V]`: the value at `tokens [...]` and the top_n."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    if top_n == 0:
        empty = logp[..., :0]
        return chosen, empty.astype(jnp.int32), empty
    top_lps, top_ids = jax.lax.top_k(logp, top_n)
    return chosen, top_ids.astype(jnp.int32), top_lps


class Engine:
    """Jitted prefill / decode functions for one model config and dtype."""

    def __init__(self, cfg: ModelConfig, dtype, kernels: str = "xla", layout=None,
                 kv_dtype=None):
        """kernels: "xla", "pallas" or "mosaic" (attention over the cache and int8 weight
        matmuls through pallas_kernels, interpreted off GPU). layout: an optional
        `ftjax.sharding.Layout`; params and inputs then arrive sharded, and the KV cache
        is pinned to its sharding where it is made. kv_dtype: None (the model dtype)
        or "int8" (an int8 KV cache with per-token, per-head scales).

        Params passed to the jitted functions are canonical, their "layers" stacked or
        split per layer (`ftjax.model.split_layers`; see `ftjax.model`)."""
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.cfg = cfg
        self.dtype = dtype
        self.layout = layout
        self.kv_dtype = kv_dtype
        self.kernels = kernels
        # On one CPU device the native kernels where they build: attention over the cache
        # and the decode step's few-row weight matmuls (`pallas_kernels.cpu_matmul`).
        self.cache_kernels = paged_kv.kernels_for(kernels, sharded=layout is not None)
        # On a mesh the kernels run per shard (shard_map); XLA partitions its own path.
        self.kernel_mesh = None
        if layout is not None and kernels != "xla":
            self.kernel_mesh = sharded.KernelMesh.of(layout.mesh, RULES)
        self.model = Transformer(cfg, dtype, kernels=self.cache_kernels,
                                 vocab=layout.padded_vocab if layout else None,
                                 mesh=self.kernel_mesh,
                                 pipe=layout.mesh if layout and layout.pipe > 1 else None)
        # Pipelined context phase: the batch splits into P micro-batches that follow each
        # other through the stages (bubble (P-1)/(2P-1) instead of (P-1)/P; see
        # `ftjax.pipeline`). Decode steps run whole batches: their micro-batch copies of
        # the cache rows would cost more than the bubble they save.
        self.context_model = self.model
        if layout is not None and layout.pipe > 1:
            self.context_model = dataclasses.replace(self.model, micro=layout.pipe)
        self.trace_counts = collections.Counter()
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len", "width", "feat"),
                               donate_argnames=("cache",))
        self.decode = jax.jit(self._decode, static_argnames=("feat", "chunk"),
                              donate_argnames=("state",))
        self.decode_chunk = jax.jit(self._decode_chunk, static_argnames=("feat", "chunk"),
                                    donate_argnames=("state",))
        self.forward = jax.jit(self._forward)
        self.stop_rows = jax.jit(self._stop_rows, donate_argnames=("state",))

    def _forward(self, params, tokens):
        self.trace_counts["forward"] += 1
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cache = None
        if self.kv_dtype is not None:
            # Attend through a cache of the chosen dtype, so teacher-forced logits
            # (e.g. `ftjax eval` perplexity) see the same rounding generation sees.
            cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        logits, _ = self.context_model(params, tokens, positions, cache)
        return logits

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of this engine's dtype, kernels and sharding."""
        return self._constrain(KVCache.zeros(self.cfg, batch, max_len, self.dtype,
                                             self.kv_dtype, self.cache_kernels,
                                             self.kernel_mesh))

    def step_logits(self, params, tokens, positions, cache):
        """One model call over a cache (traced inside callers' jitted functions, e.g.
        beam search): (logits float32 `[B, T, V]`, cache pinned to its sharding)."""
        logits, cache = self.model(params, tokens, positions, cache)
        return logits, self._constrain(cache)

    def _stop_rows(self, state: "DecodeState", hit) -> "DecodeState":
        """Marks the rows where bool `hit` `[B]` is set finished (a stop string found on
        the host)."""
        self.trace_counts["stop_rows"] += 1
        return state.replace(finish=jnp.where(hit, FINISH_STOP, state.finish))

    def _constrain(self, cache: KVCache) -> KVCache:
        return cache if self.layout is None else self.layout.constrain_cache(cache)

    def _finish(self, state: DecodeState, tok, sp: SamplingArrays):
        """FINISH_* of rows that just produced `tok` at `state.pos` (already advanced)."""
        stopped = jnp.any(tok[:, None] == sp.stop_ids, axis=-1)
        seq_hit = processors.hit_stop_sequence(state.hist, state.pos + 1, sp)
        # A stop sequence counts once it lies within the output.
        stopped = stopped | (seq_hit & jnp.any(sp.stop_seq_len <= state.n_gen[:, None], -1))
        # A row ends at its token budget, or when the token just made (at `pos`)
        # fills the model's positions: prompt + generated <= max_positions.
        full = (state.n_gen >= sp.max_new) | (state.pos + 1 >= self.cfg.max_positions)
        return jnp.where(stopped, FINISH_STOP, jnp.where(full, FINISH_LENGTH, FINISH_NONE))

    def _advance(self, state: DecodeState, logits, sp: SamplingArrays, feat: Features):
        """Picks each running row's next token from `logits [B, V]` and records it."""
        running = state.finish == FINISH_NONE
        scores = logits
        if feat.processors:
            scores = processors.process(logits, sp, state.hist, state.pos + 1, state.seen,
                                        state.counts, state.n_gen)
        # Slot-based: a row's PRNG counter and buffer index are its own token count
        # (for rows that started together this equals the global step), so rows can
        # join and leave a running batch without changing what they produce.
        tok = jnp.where(running, sample(scores, sp, state.n_gen, feat.greedy_only, running), 0)
        logp, top_ids, top_lps = log_probs_and_top(logits, tok, feat.top_n)
        b = jnp.arange(tok.shape[0])
        idx = jnp.minimum(state.n_gen, state.tokens.shape[1] - 1)

        def put(buf, x):
            return buf.at[b, idx].set(x)

        pos = state.pos + running
        hist = state.hist.at[b, jnp.where(running, pos, state.hist.shape[1])].set(tok, mode="drop")
        seen, counts = state.seen, state.counts
        if feat.processors:
            col = jnp.where(running, tok, seen.shape[1])
            seen = seen.at[b, col].set(True, mode="drop")
            counts = counts.at[b, col].add(1, mode="drop")
        new = state.replace(
            tokens=put(state.tokens, tok), log_probs=put(state.log_probs, logp),
            top_ids=put(state.top_ids, top_ids), top_lps=put(state.top_lps, top_lps),
            hist=hist, seen=seen, counts=counts, last=jnp.where(running, tok, state.last),
            pos=pos, n_gen=state.n_gen + running, step=state.step + 1)
        finish = jnp.where(running, self._finish(new, tok, sp), state.finish)
        return new.replace(finish=finish)

    def context(self, params, tokens, start, lengths, rows, cache, soft, max_len: int,
                prompt_top_n: int):
        """The context phase: runs the distinct prompts and gathers each row's share.

        Returns (last-token logits `[B, V]`, cache with B rows, PromptLogprobs or None).
        """
        if cache is None:
            cache = self.new_cache(tokens.shape[0], max_len)
        positions = start[:, None] + jnp.arange(tokens.shape[1])[None, :]
        prompt_lp = None
        if prompt_top_n >= 0:
            logits, cache = self.context_model(params, tokens, positions, cache, soft=soft)
            nxt = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
            prompt_lp = PromptLogprobs(*log_probs_and_top(logits, nxt, prompt_top_n))
            logits = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
        else:
            logits, cache = self.context_model(params, tokens, positions, cache,
                                               last_index=lengths - 1, soft=soft)
        cache = cache.take_rows(rows)
        return logits[rows, 0], self._constrain(cache), prompt_lp

    def _prefill(self, params, tokens, start, lengths, rows, hist, sp: SamplingArrays,
                 cache: Optional[KVCache] = None, soft=None, *, max_len: int, width: int,
                 feat: Features):
        """Runs the distinct prompts, fills the cache, picks each row's first token.

        Args:
          tokens: i32 `[U, T]` right-padded distinct prompts; start: i32 `[U]` position
            of their first token (0, or a session's length); lengths: i32 `[U]` (>= 1).
          rows: i32 `[B]` the prompt each output row continues.
          hist: i32 `[B, P]` each row's tokens by position (-1 past the prompt).
          cache: a session's cache to extend (`[.., U, .., max_len, ..]`), or None for a
            fresh one. soft: optional (embeddings `[U, T, E]`, mask `[U, T]`).
          max_len: static cache length S; width: static token buffer W.
        Returns:
          (DecodeState, PromptLogprobs or None)
        """
        self.trace_counts["prefill"] += 1
        logits, cache, prompt_lp = self.context(params, tokens, start, lengths, rows, cache,
                                                soft, max_len, feat.prompt_top_n)
        b = rows.shape[0]
        vocab = self.cfg.vocab_size if feat.processors else 0
        pos = (start + lengths - 1)[rows]
        seen = processors.token_counts(hist, jnp.zeros_like(pos), pos + 1, vocab) > 0
        state = DecodeState(
            cache=cache, tokens=jnp.zeros((b, width), jnp.int32),
            log_probs=jnp.zeros((b, width), jnp.float32),
            top_ids=jnp.zeros((b, width, feat.top_n), jnp.int32),
            top_lps=jnp.zeros((b, width, feat.top_n), jnp.float32),
            hist=hist, seen=seen, counts=jnp.zeros((b, vocab), jnp.int32),
            last=jnp.zeros((b,), jnp.int32), pos=pos, n_gen=jnp.zeros((b,), jnp.int32),
            # Rows with no budget at all (max_new == 0) produce nothing.
            finish=jnp.where(sp.max_new <= 0, FINISH_LENGTH, FINISH_NONE),
            step=jnp.zeros((), jnp.int32))
        return self._advance(state, logits, sp, feat), prompt_lp

    def _step(self, params, state: DecodeState, sp: SamplingArrays, feat: Features):
        logits, cache = self.step_logits(params, state.last[:, None], state.pos[:, None],
                                         state.cache)
        return self._advance(state.replace(cache=cache), logits[:, 0], sp, feat)

    def _scan(self, params, state, sp, feat, chunk):
        def body(s, _):
            return self._step(params, s, sp, feat), None
        return jax.lax.scan(body, state, None, length=chunk)[0]

    def _decode_chunk(self, params, state: DecodeState, sp: SamplingArrays, *,
                      feat: Features, chunk: int) -> DecodeState:
        """`chunk` decode steps (for streaming: Python sees tokens between chunks)."""
        self.trace_counts["decode_chunk"] += 1
        return self._scan(params, state, sp, feat, chunk)

    def _decode(self, params, state: DecodeState, sp: SamplingArrays, *,
                feat: Features, chunk: int) -> DecodeState:
        """Decodes until every row has finished: chunks of `chunk` scanned steps
        inside a while loop that exits as soon as all rows are done."""
        self.trace_counts["decode"] += 1
        width = state.tokens.shape[1]

        def cond(s):
            return jnp.any(s.finish == FINISH_NONE) & (s.step < width)

        return jax.lax.while_loop(
            cond, functools.partial(self._scan, params, sp=sp, feat=feat, chunk=chunk), state)
