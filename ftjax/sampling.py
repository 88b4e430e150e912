"""Per-request sampling options and the jitted token sampler.

`SamplingParams` is what a user writes, one per request. `SamplingArrays` is
the same for a whole batch as per-row arrays, so every row of a batch can carry
its own options without a Python branch (or a recompile) inside the decode step.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request.

    Attributes:
      temperature: 0 picks the most likely token (greedy); > 0 samples from
        softmax(logits / temperature).
      top_k: keep only the k most likely tokens (0: no limit).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1: no limit).
      seed: the same seed gives the same sample; None draws a fresh seed per call.
      stop_token_ids: generation of one of these ends the request (the token is
        returned); None means the model's eos token, [] means none.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Optional[Sequence[int]] = None

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ValueError(f"SamplingParams.seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
                raise ValueError(
                    f"SamplingParams.stop_token_ids must be non-negative ints, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@flax.struct.dataclass
class SamplingArrays:
    """A batch's sampling options, one row per request (padding rows are greedy)."""

    temperature: jax.Array  # f32 [B]
    top_k: jax.Array        # i32 [B], 0 = off
    top_p: jax.Array        # f32 [B]
    seed: jax.Array         # u32 [B]
    stop_ids: jax.Array     # i32 [B, S], -1 = unused slot
    max_new: jax.Array      # i32 [B], tokens this request may generate

    @classmethod
    def build(cls, params: Sequence[SamplingParams], batch: int, vocab_size: int,
              eos_token_ids: Sequence[int], max_new: Sequence[int]) -> "SamplingArrays":
        n = len(params)
        stops = []
        for i, p in enumerate(params):
            ids = p.stop_token_ids
            if ids is None:
                # The model's eos ids; one outside the vocabulary can never be produced.
                ids = tuple(t for t in eos_token_ids if t < vocab_size)
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"sampling[{i}].stop_token_ids {bad} are outside the "
                                 f"vocabulary (size {vocab_size})")
            stops.append(ids)
        width = max([1] + [len(s) for s in stops])
        # Round the stop-id width to a power of two so it rarely changes shapes.
        width = 1 << (width - 1).bit_length()
        stop_ids = np.full((batch, width), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s

        def col(values, pad, dtype):
            arr = np.full((batch,), pad, dtype)
            arr[:n] = values
            return jnp.asarray(arr)

        seeds = [p.seed if p.seed is not None else secrets.randbits(32) for p in params]
        return cls(
            temperature=col([p.temperature for p in params], 0.0, np.float32),
            top_k=col([p.top_k for p in params], 0, np.int32),
            top_p=col([p.top_p for p in params], 1.0, np.float32),
            seed=col(seeds, 0, np.uint32),
            stop_ids=jnp.asarray(stop_ids),
            max_new=col(list(max_new), 0, np.int32))


def _sample_row(logits, temperature, top_k, top_p, key):
    """One row: temperature, then top-k and top-p filtering, then a categorical draw."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    sorted_logits = scaled[order]
    rank = jnp.arange(vocab)
    keep = rank < jnp.where(top_k > 0, top_k, vocab)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    # Keep a token if the mass before it is below top_p (the first token always stays).
    before = jnp.cumsum(probs) - probs
    keep = keep & (before < top_p)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice]


def sample(logits, sp: SamplingArrays, step, greedy_only: bool):
    """Picks the next token of every row.

    Args:
      logits: float32 `[B, V]`.
      sp: the batch's options.
      step: int, index of the token being generated (folds into each row's key,
        so a row's sample depends only on its seed, never on its batch mates).
      greedy_only: static; when every row is greedy the sort and draw are skipped.
    Returns:
      (tokens int32 `[B]`, log-probabilities of those tokens under the model `[B]`)
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy_only:
        tokens = greedy
    else:
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(sp.seed)
        drawn = jax.vmap(_sample_row)(logits, sp.temperature, sp.top_k, sp.top_p, keys)
        tokens = jnp.where(sp.temperature > 0, drawn.astype(jnp.int32), greedy)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
