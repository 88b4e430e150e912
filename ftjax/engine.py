"""Prefill and the decode loop: pure jitted functions over an explicit state.

The model is only ever called through `Transformer.apply`; the loop never sees
its internals. Shapes are bucketed by the caller (`ftjax.api`) so that repeated
calls inside a bucket reuse the compiled functions; `Engine.trace_counts`
counts how often each function was traced (= compiled) so tests can assert it.

Per row, the state holds the token to feed next (`last`) and its position
(`pos`). Prompts are right-padded: row b's token t sits at position t, and the
first generated token of row b sits at position `length[b]`. Every decode step
writes the new key/value at the row's own position before attending, so the
padding slots a short prompt left in the cache are overwritten before anyone
can attend to them.
"""

from __future__ import annotations

import collections
import functools

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax.model import KVCache, Transformer
from ftjax.sampling import SamplingArrays, sample

FINISH_NONE, FINISH_STOP, FINISH_LENGTH = 0, 1, 2


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens: jax.Array     # i32 [B, W] generated tokens (W >= the step budget)
    log_probs: jax.Array  # f32 [B, W]
    last: jax.Array       # i32 [B] the token to feed next
    pos: jax.Array        # i32 [B] its position
    n_gen: jax.Array      # i32 [B] tokens generated so far
    finish: jax.Array     # i32 [B] FINISH_* reason, 0 while running
    step: jax.Array       # i32 [] steps taken


class Engine:
    """Jitted prefill / decode functions for one model config and dtype."""

    def __init__(self, cfg: ModelConfig, dtype, scan_layers: bool = True, kv_dtype=None):
        self.cfg = cfg
        self.dtype = dtype
        self.kv_dtype = kv_dtype  # None (the model dtype) or "int8"
        self.model = Transformer(cfg, dtype, scan_layers=scan_layers)
        self.trace_counts = collections.Counter()
        self.prefill = jax.jit(self._prefill, static_argnames=("max_len", "width", "greedy_only"))
        self.decode = jax.jit(self._decode, static_argnames=("greedy_only", "chunk"),
                              donate_argnames=("state",))
        self.decode_chunk = jax.jit(self._decode_chunk, static_argnames=("greedy_only", "chunk"),
                                    donate_argnames=("state",))
        self.forward = jax.jit(self._forward)

    def _forward(self, params, tokens):
        self.trace_counts["forward"] += 1
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cache = None
        if self.kv_dtype is not None:
            # Attend through a cache of the chosen dtype, so teacher-forced logits
            # (e.g. `ftjax eval` perplexity) see the same rounding generation sees.
            cache = KVCache.zeros(self.cfg, tokens.shape[0], tokens.shape[1], self.dtype,
                                  self.kv_dtype)
        logits, _ = self.model.apply({"params": params}, tokens, positions, cache)
        return logits

    def _finish(self, tokens, pos, n_gen, finish, sp: SamplingArrays):
        """Marks rows that just produced a stop token or reached their length limit."""
        stopped = jnp.any(tokens[:, None] == sp.stop_ids, axis=-1)
        # A row ends at its token budget, or when the token just made (at `pos`)
        # fills the model's positions: prompt + generated <= max_positions.
        full = (n_gen >= sp.max_new) | (pos + 1 >= self.cfg.max_positions)
        new = jnp.where(stopped, FINISH_STOP, jnp.where(full, FINISH_LENGTH, FINISH_NONE))
        return jnp.where(finish == FINISH_NONE, new, finish)

    def _prefill(self, params, tokens, lengths, sp: SamplingArrays, *, max_len: int, width: int,
                 greedy_only: bool) -> DecodeState:
        """Runs the padded prompts, fills the cache, samples each row's first token.

        Args:
          tokens: i32 `[B, T]` right-padded prompts; lengths: i32 `[B]` (>= 1).
          max_len: static cache length S (>= T); width: static token buffer W.
        """
        self.trace_counts["prefill"] += 1
        b, t = tokens.shape
        cache = KVCache.zeros(self.cfg, b, max_len, self.dtype, self.kv_dtype)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        logits, cache = self.model.apply({"params": params}, tokens, positions, cache,
                                         last_index=lengths - 1)
        first, logp = sample(logits[:, 0], sp, 0, greedy_only)
        n_gen = jnp.ones((b,), jnp.int32)
        finish = self._finish(first, lengths, n_gen, jnp.zeros((b,), jnp.int32), sp)
        # Rows with no budget at all (max_new == 0) produce nothing.
        finish = jnp.where(sp.max_new <= 0, FINISH_LENGTH, finish)
        n_gen = jnp.where(sp.max_new <= 0, 0, n_gen)
        out = jnp.zeros((b, width), jnp.int32).at[:, 0].set(first)
        lp = jnp.zeros((b, width), jnp.float32).at[:, 0].set(logp)
        return DecodeState(cache=cache, tokens=out, log_probs=lp, last=first, pos=lengths,
                           n_gen=n_gen, finish=finish, step=jnp.ones((), jnp.int32))

    def _step(self, params, state: DecodeState, sp: SamplingArrays, greedy_only: bool):
        running = state.finish == FINISH_NONE
        logits, cache = self.model.apply({"params": params}, state.last[:, None],
                                         state.pos[:, None], state.cache)
        tok, logp = sample(logits[:, 0], sp, state.step, greedy_only)
        tok = jnp.where(running, tok, 0)
        idx = jnp.minimum(state.step, state.tokens.shape[1] - 1)
        tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, idx))
        log_probs = jax.lax.dynamic_update_slice(state.log_probs, logp[:, None], (0, idx))
        pos = state.pos + running
        n_gen = state.n_gen + running
        finish = jnp.where(running, self._finish(tok, pos, n_gen, state.finish, sp), state.finish)
        return DecodeState(cache=cache, tokens=tokens, log_probs=log_probs,
                           last=jnp.where(running, tok, state.last), pos=pos, n_gen=n_gen,
                           finish=finish, step=state.step + 1)

    def _scan(self, params, state, sp, greedy_only, chunk):
        def body(s, _):
            return self._step(params, s, sp, greedy_only), None
        return jax.lax.scan(body, state, None, length=chunk)[0]

    def _decode_chunk(self, params, state: DecodeState, sp: SamplingArrays, *,
                      greedy_only: bool, chunk: int) -> DecodeState:
        """`chunk` decode steps (for streaming: Python sees tokens between chunks)."""
        self.trace_counts["decode_chunk"] += 1
        return self._scan(params, state, sp, greedy_only, chunk)

    def _decode(self, params, state: DecodeState, sp: SamplingArrays, *,
                greedy_only: bool, chunk: int) -> DecodeState:
        """Decodes until every row has finished: chunks of `chunk` scanned steps
        inside a while loop that exits as soon as all rows are done."""
        self.trace_counts["decode"] += 1
        width = state.tokens.shape[1]

        def cond(s):
            return jnp.any(s.finish == FINISH_NONE) & (s.step < width)

        return jax.lax.while_loop(
            cond, functools.partial(self._scan, params, sp=sp, greedy_only=greedy_only,
                                    chunk=chunk), state)
