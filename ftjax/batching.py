"""Host side of a generate call: requests -> padded device arrays -> per-request results.

A request may ask for `n` samples (or `num_beams` beams): it becomes that many
rows of the batch. Rows whose prompt (and soft prompt) are identical share one
prefill row: the engine runs the distinct prompts and gathers each row's cache.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from ftjax import buckets
from ftjax.sharding import fetch
from ftjax.config import ModelConfig
from ftjax.engine import FINISH_NONE, FINISH_STOP, Features
from ftjax.sampling import SamplingArrays, SamplingParams


def check_ids(cfg: ModelConfig, ids, what: str, limit: int) -> List[int]:
    """Token ids as a list of ints, checked: not empty, at most `limit` long, inside the
    vocabulary. Raises ValueError naming `what` and the limit."""
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ValueError(f"{what} must be a string or a list of token ids, got "
                         f"{type(ids).__name__} {ids!r:.60}")
    for j, t in enumerate(ids):
        # Exact ints only: int() would truncate 1.9 to 1 and read "2" or True as ids.
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"{what}[{j}] = {t!r:.40} is a {type(t).__name__}, not an int "
                             "token id")
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError(f"{what} is empty; it needs at least one token")
    if len(ids) > limit:
        raise ValueError(f"{what} has {len(ids)} tokens; the limit is {limit} "
                         f"(model max_positions={cfg.max_positions})")
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids {bad[:5]} outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    return ids


@dataclasses.dataclass
class Request:
    """One prompt of a call: its ids, options, token budget and optional soft prompt `[P, E]`."""

    ids: List[int]
    sp: SamplingParams
    max_new: int
    soft: Optional[np.ndarray] = None

    @property
    def length(self) -> int:
        return len(self.ids) + (0 if self.soft is None else len(self.soft))


@dataclasses.dataclass
class Batch:
    """Everything `Engine.prefill` needs, plus the map from rows back to requests."""

    rows: List[Tuple[int, int]]      # per live row: (request number, sample number)
    unique_of_request: List[int]     # per request: its distinct-prompt row
    prefill_args: dict               # device arrays (tokens, start, lengths, rows, hist, ...)
    sp: SamplingArrays
    feat: Features
    max_len: int
    width: int


def features(sps: Sequence[SamplingParams], vocab: int) -> Features:
    top = max(s.logprobs for s in sps)
    prompt = [s.prompt_logprobs for s in sps if s.prompt_logprobs is not None]
    return Features(
        greedy_only=all(s.greedy for s in sps),
        processors=any(s.uses_processors for s in sps),
        top_n=min(buckets.next_pow2(top), vocab) if top else 0,
        prompt_top_n=min(buckets.next_pow2(max(prompt)), vocab) if max(prompt, default=0)
        else (0 if prompt else -1))


def build(requests: Sequence[Request], copies: Sequence[int], cfg: ModelConfig, chunk: int,
          batch_size: Optional[int] = None,
          layout=None) -> Batch:
    """Pads a group of requests into one batch.

    Args:
      copies: rows per request (its n samples, or its beams).
      batch_size: the padded row count (default: the next power of two).
      layout: an `ftjax.sharding.Layout`: rows are padded to a multiple of the data
        size and the arrays placed batch-sharded (the distinct-prompt arrays stay
        replicated when their count does not divide).
    """
    rows = [(i, j) for i, c in enumerate(copies) for j in range(c)]
    keys: Dict[tuple, int] = {}
    unique_of_request = []
    for r in requests:
        key = (tuple(r.ids), None if r.soft is None else id(r.soft))
        unique_of_request.append(keys.setdefault(key, len(keys)))
    max_new = max(r.max_new for r in requests)
    longest = max(r.length for r in requests)
    plan = buckets.plan(len(rows), longest, max_new, cfg.max_positions, chunk)
    start = 0
    if batch_size is not None:
        plan = dataclasses.replace(plan, batch=batch_size)
    if layout is not None:  # every data shard gets whole rows
        plan = dataclasses.replace(plan, batch=layout.batch_size(plan.batch))
    n_unique = buckets.next_pow2(len(keys))
    t = plan.prompt_len
    tokens = np.zeros((n_unique, t), np.int32)
    lengths = np.ones((n_unique,), np.int32)
    soft_any = any(r.soft is not None for r in requests)
    embeds = np.zeros((n_unique, t, cfg.embed_dim), np.float32) if soft_any else None
    mask = np.zeros((n_unique, t), bool)
    for r, u in zip(requests, unique_of_request):
        p = 0 if r.soft is None else len(r.soft)
        tokens[u, p:p + len(r.ids)] = r.ids
        lengths[u] = r.length
        if p:
            embeds[u, :p] = r.soft
            mask[u, :p] = True
    hist_width = start + t + plan.width
    hist = np.full((plan.batch, hist_width), -1, np.int32)
    row_unique = np.zeros((plan.batch,), np.int32)
    for b, (i, _) in enumerate(rows):
        r = requests[i]
        p = 0 if r.soft is None else len(r.soft)
        hist[b, start + p:start + r.length] = r.ids
        row_unique[b] = unique_of_request[i]
    sp = SamplingArrays.build([requests[i].sp for i, _ in rows], plan.batch, cfg.vocab_size,
                              cfg.eos_token_ids, [requests[i].max_new for i, _ in rows],
                              sample_index=[j for _, j in rows])
    args = dict(tokens=jnp.asarray(tokens), start=jnp.full((n_unique,), start, jnp.int32),
                lengths=jnp.asarray(lengths), rows=jnp.asarray(row_unique),
                hist=jnp.asarray(hist),
                soft=(jnp.asarray(embeds), jnp.asarray(mask)) if soft_any else None)
    if layout is not None:
        args, sp = layout.shard_batch((args, sp))
    return Batch(rows=rows, unique_of_request=unique_of_request, prefill_args=args, sp=sp,
                 feat=features([r.sp for r in requests], cfg.vocab_size),
                 max_len=plan.cache_len, width=plan.width)


@dataclasses.dataclass
class Sequences:
    """The output of one request: one entry per sample (or returned beam)."""

    tokens: List[List[int]]
    finish_reasons: List[str]
    log_probs: List[List[float]]
    cum_log_probs: List[float]
    top_logprobs: Optional[List[List[Dict[int, float]]]] = None
    prompt_logprobs: Optional[List[Optional[Dict[int, float]]]] = None


def _alternatives(chosen: int, chosen_lp: float, ids, lps, n: int) -> Dict[int, float]:
    """The chosen token and the n most likely ones, as {token: log-prob}."""
    out = {int(chosen): float(chosen_lp)}
    for t, lp in zip(ids[:n], lps[:n]):
        out.setdefault(int(t), float(lp))
    return out


def collect(batch: Batch, requests: Sequence[Request], state, prompt_lp,
            cut: Optional[Dict[int, int]] = None) -> List[Sequences]:
    """Device state -> per-request `Sequences` (`cut`: row -> tokens kept, for stop strings)."""
    tokens, log_probs, top_ids, top_lps, n_gen, finish = fetch(
        (state.tokens, state.log_probs, state.top_ids, state.top_lps, state.n_gen, state.finish))
    cut = cut or {}
    out = [Sequences([], [], [], []) for _ in requests]
    for b, (i, _) in enumerate(batch.rows):
        k = cut.get(b, int(n_gen[b]))
        seq = out[i]
        seq.tokens.append(tokens[b, :k].tolist())
        seq.finish_reasons.append("stop" if finish[b] == FINISH_STOP or b in cut else "length")
        seq.log_probs.append(log_probs[b, :k].tolist())
        seq.cum_log_probs.append(float(np.sum(log_probs[b, :k], dtype=np.float64)))
        n_top = requests[i].sp.logprobs
        if n_top:
            seq.top_logprobs = (seq.top_logprobs or []) + [[
                _alternatives(tokens[b, j], log_probs[b, j], top_ids[b, j], top_lps[b, j], n_top)
                for j in range(k)]]
    if prompt_lp is not None:
        lps, ids, alts = fetch((prompt_lp.log_probs, prompt_lp.top_ids, prompt_lp.top_lps))
        for i, r in enumerate(requests):
            n = r.sp.prompt_logprobs
            if n is None:
                continue
            u = batch.unique_of_request[i]
            p = r.length - len(r.ids)
            entries: List[Optional[Dict[int, float]]] = [None]
            for k in range(1, len(r.ids)):
                t = p + k  # slot of prompt token k; its log-prob comes from slot t - 1
                entries.append(_alternatives(r.ids[k], lps[u, t - 1], ids[u, t - 1],
                                             alts[u, t - 1], n))
            out[i].prompt_logprobs = entries
    return out


def first_stop_hit(tokenizer, toks: List[int], strings) -> Optional[int]:
    """The length of the shortest prefix of `toks` whose decoded text contains one of
    `strings`, or None (the decoded whole has none)."""
    text = tokenizer.decode(toks)
    if not any(s in text for s in strings):
        return None
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(toks[:mid]) for s in strings):
            hi = mid
        else:
            lo = mid + 1
    return lo


class StopStrings:
    """Finds where decoded outputs first contain a stop string (checked between chunks)."""

    def __init__(self, batch: Batch, requests: Sequence[Request], tokenizer):
        self.watch = {b: requests[i].sp.stop_strings for b, (i, _) in enumerate(batch.rows)
                      if requests[i].sp.stop_strings}
        if self.watch and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer, and this model has none; "
                             "use stop_sequences (token ids)")
        self.tokenizer = tokenizer
        self.cut: Dict[int, int] = {}

    def __bool__(self):
        return bool(self.watch)

    def check(self, state) -> List[int]:
        """Rows whose output now contains a stop string (newly found; their cut is kept
        in `self.cut`). The caller marks them stopped through the engine."""
        if not self.watch:
            return []
        tokens, n_gen = fetch((state.tokens, state.n_gen))
        hits = []
        for b, strings in self.watch.items():
            if b in self.cut:
                continue
            k = self._first_hit(tokens[b, :n_gen[b]].tolist(), strings)
            if k is not None:
                self.cut[b] = k
                hits.append(b)
        return hits

    def _first_hit(self, toks: List[int], strings) -> Optional[int]:
        return first_stop_hit(self.tokenizer, toks, strings)

    def running(self, state) -> bool:
        return bool(np.any(fetch(state.finish) == FINISH_NONE))
