"""`LLMEngine`: in-flight batching over a paged KV cache (vLLM / TensorRT-LLM style).

Requests join and leave a running batch of `max_slots` rows between steps. Each
`step()` on the host:
  1. admits queued requests (FIFO) while pages are free and the requests waiting for
     a slot hold fewer than `max_slots` sequences (`ftjax.blocks` decides pages;
     prompt blocks computed before are reused: prefix caching);
  2. runs one prefill call over up to `prefill_budget` prompt tokens of the admitted
     requests (a long prompt is split over the call's rows and over steps, so running
     rows never wait behind it); a request takes its slots only for its prompt's last
     chunk, which picks its first token. A prompt is thus computed ahead while every
     slot is still decoding, and a freed slot decodes again in the step that freed it
     (a slot held through its request's whole prefill idled 1-2 steps of every
     request: 6.0 of 8 rows live on average in the serving benchmark);
  3. has each beam search choose its beams' next tokens (`ftjax.beam.select` over the
     logits its last call held); a beam's pages become a fork of its parent's (full
     pages shared, the last one copied on write);
  4. runs `chunk` decode steps on device for every running slot (a beam row: one);
  5. reads the new tokens, checks stop strings, evicts finished rows (pages returned).
When a running row needs a page and none is free, the newest running request is
preempted: its pages are freed, it goes back to the front of the queue and is later
recomputed from its prompt. Its seed and PRNG counters (per row: the token index) are
fixed, so it produces the same tokens again; only tokens not yet returned are returned.

Every device function has static shapes fixed by the engine's configuration (slots,
pool pages, page-table width, prefill rows x tokens, chunk, fixed-width sampling
options, a fixed feature set), so requests coming and going compile nothing;
`trace_counts` counts traces (tests assert it).

Equivalence with `Model.generate`: the model, the sampler and the stopping rules are
the engine's own (`ftjax.engine.Engine._advance`); a row's sample depends only on its
seed, sample index and token index, never on its batch mates.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import secrets
from typing import Dict, Iterator, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ftjax import beam, paged_kv, processors
from ftjax.batching import Sequences, _alternatives, first_stop_hit
from ftjax.blocks import BlockManager, block_hashes
from ftjax.engine import (FINISH_NONE, FINISH_STOP, DecodeState, Features,
                          log_probs_and_top)
from ftjax.paged_cache import PagedCache
from ftjax.sampling import MAX_LOGPROBS, SamplingArrays, SamplingParams

# Fixed widths of the per-slot option arrays (one compiled shape for every request mix).
MAX_STOP_IDS = 8          # stop token ids per request (incl. the model's eos ids)
MAX_SEQUENCES = 4         # stop_sequences / bad_words per request
MAX_SEQUENCE_LEN = 8      # tokens per stop sequence / bad word


@dataclasses.dataclass
class RequestOutput:
    """What one `step()` produced for one sequence of a request.

    Attributes:
      request_id: the id `add_request` returned.
      sample: which of the request's n samples (0 when n == 1).
      new_tokens: token ids produced since the last output of this sequence.
      new_log_probs: their log-probabilities (unmodified distribution, as generate).
      finished: this is the sequence's last output.
      finish_reason: "stop" or "length" once finished, else None.
      tokens: every token of the sequence so far.
      new_top_logprobs: with logprobs=N, per new token {token: log-prob} of the chosen
        one and the N most likely.
      prompt_logprobs: with prompt_logprobs=N, per prompt token {token: log-prob} of
        that token and the N most likely given the tokens before it (None for the
        first token and soft-prompt rows), as `Model.generate` returns them.
      score: with beams, the sequence's length-penalized score (HF's
        sequences_scores; `Model.generate`'s cum_log_probs for beams), else None.
    """

    request_id: str
    sample: int
    new_tokens: List[int]
    new_log_probs: List[float]
    finished: bool
    finish_reason: Optional[str]
    tokens: List[int]
    new_top_logprobs: Optional[List[Dict[int, float]]] = None
    prompt_logprobs: Optional[List[Optional[Dict[int, float]]]] = None
    score: Optional[float] = None


@dataclasses.dataclass
class _Sample:
    """Host record of one sequence (sample j of a request)."""

    j: int
    slot: int = -1
    fetched: int = 0                      # tokens read back from the device this run
    tokens: List[int] = dataclasses.field(default_factory=list)
    log_probs: List[float] = dataclasses.field(default_factory=list)
    tops: List[Dict[int, float]] = dataclasses.field(default_factory=list)
    emitted: int = 0                      # tokens returned to the caller (kept on preemption)
    done: bool = False                    # finished in this run
    reported: bool = False                # its final output was returned
    reason: Optional[str] = None
    cut: Optional[int] = None             # stop-string cut


@dataclasses.dataclass
class _Request:
    rid: str
    ids: List[int]                        # token per prompt position (0 at soft-prompt rows)
    sp: SamplingParams
    max_new: int
    samples: List[_Sample]
    sp_rows: SamplingArrays               # [n] rows, fixed widths
    soft: Optional[np.ndarray] = None     # [P, E] soft-prompt rows before the tokens
    session: Optional[str] = None         # the session whose held pages it may continue
    prompt_lp: Optional[list] = None      # prompt_logprobs entries, filled by prefill
    phase: str = "waiting"                # waiting | prefill | decode
    prefilled: int = 0                    # prompt tokens in the cache
    order: int = 0                        # admission order (preemption picks the newest)
    hashes: List[bytes] = dataclasses.field(default_factory=list)   # prompt block hashes
    groups: Optional[beam.Groups] = None  # beam search state (num_beams > 1), on device
    beam_steps: int = 0                   # beam tokens chosen (and fed) this run

    @property
    def beams(self) -> bool:
        return self.sp.num_beams > 1

    def key(self, j: int = 0):
        return (self.rid, j)

    @property
    def n_soft(self) -> int:
        return 0 if self.soft is None else len(self.soft)

    @property
    def shareable(self) -> bool:
        """Whether its prompt may take (and give) prefix-cache pages: not with a soft
        prompt (positions are not token ids) or prompt log-probs (every position's
        logits must be computed)."""
        return self.soft is None and self.sp.prompt_logprobs is None


# DecodeState fields with one row per slot (the decode gathers the running slots' rows).
_ROW_FIELDS = ("tokens", "log_probs", "top_ids", "top_lps", "hist", "seen", "counts", "last",
               "pos", "n_gen", "finish")


def sequences(outputs: List[RequestOutput], n: int) -> Sequences:
    """One request's final `Sequences` (what `Model.generate` returns for it) from the
    `RequestOutput`s the engine gave it, in order."""
    last: Dict[int, RequestOutput] = {}
    lps: Dict[int, List[float]] = collections.defaultdict(list)
    tops: Dict[int, list] = collections.defaultdict(list)
    for o in outputs:
        last[o.sample] = o
        lps[o.sample] += o.new_log_probs
        tops[o.sample] += o.new_top_logprobs or []
    if sorted(last) != list(range(n)) or not all(o.finished for o in last.values()):
        raise RuntimeError("the request has not finished")
    seq = Sequences([], [], [], [])
    for j in range(n):
        o = last[j]
        seq.tokens.append(o.tokens)
        seq.finish_reasons.append(o.finish_reason)
        seq.log_probs.append(lps[j])
        seq.cum_log_probs.append(float(np.sum(lps[j], dtype=np.float64)) if o.score is None
                                 else o.score)
        if o.new_top_logprobs is not None:
            seq.top_logprobs = (seq.top_logprobs or []) + [tops[j]]
        seq.prompt_logprobs = o.prompt_logprobs
    return seq


def _pad_last(a: np.ndarray, width: int, fill) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[-1] = (0, width - a.shape[-1])
    return np.pad(a, pad, constant_values=fill)


class LLMEngine:
    """A serving engine over one loaded `ftjax.Model` (see the module docstring).

    Args:
      model: an `ftjax.Model` (on a mesh: kv heads of the pools split on "tensor").
      max_slots: rows of the running batch (sequences decoded at once).
      page_size: tokens per KV page (a power of two).
      num_pages: pool pages incl. the null page; None sizes it from `kv_memory`, or
        else to hold every slot at the model's full length.
      prefix_caching: reuse computed prompt blocks across requests.
      kv_memory: bytes of KV cache to size the pool by (when num_pages is None).
      chunk: decode steps per `step()`.
      prefill_budget: prompt tokens computed per `step()` (static shape: prefill_rows
        rows of prefill_budget // prefill_rows tokens).
      prefill_rows: rows of the prefill call.
      max_logprobs: the most `logprobs` a request may ask for (fixed feature).
      processors: compile the history-dependent logits processors in (fixed feature;
        off rejects requests that use them).
    """

    def __init__(self, model, max_slots: int = 16, page_size: int = 16,
                 num_pages: Optional[int] = None, prefix_caching: bool = True,
                 kv_memory: Optional[int] = None, chunk: int = 8, prefill_budget: int = 256,
                 prefill_rows: int = 4, max_logprobs: int = MAX_LOGPROBS,
                 processors: bool = True):
        for name, v, lo in (("max_slots", max_slots, 1), ("chunk", chunk, 1),
                            ("prefill_rows", prefill_rows, 1),
                            ("prefill_budget", prefill_budget, prefill_rows)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not 0 <= max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {max_logprobs}")
        self.model = model
        self.cfg = cfg = model.config
        self.engine = model.engine
        self.params = model.generator.params
        self.tokenizer = model.tokenizer
        self.max_slots = max_slots
        self.page_size = page_size
        self.chunk = chunk
        self.prefill_rows = prefill_rows
        self.prefill_len = prefill_budget // prefill_rows
        self.max_logprobs = max_logprobs
        self.width = cfg.max_positions       # per-row token buffer and history width
        self.pages_per_seq = -(-cfg.max_positions // page_size)
        self.max_len = self.pages_per_seq * page_size
        # Decode runs only the running slots, gathered into the smallest of these row
        # counts (a step's cost grows with its rows, busy or not); its attention visits
        # only the pages the furthest row has reached (a run-time loop bound, no width
        # to compile for).
        self.row_buckets = sorted({min(2 ** i, max_slots)
                                   for i in range(max_slots.bit_length() + 1)})
        dtype, kv_dtype = self.engine.dtype, self.engine.kv_dtype
        if num_pages is None:
            if kv_memory is not None:
                num_pages = paged_kv.pages_for_budget(cfg, kv_memory, page_size, dtype, kv_dtype)
            else:
                num_pages = max_slots * self.pages_per_seq + 1
        self.num_pages = int(num_pages)
        self.blocks = BlockManager(self.num_pages, page_size, self.pages_per_seq, prefix_caching)
        vocab = cfg.vocab_size
        self.feat = Features(greedy_only=False, processors=processors,
                             top_n=min(max_logprobs, vocab), prompt_top_n=-1)
        self.trace_counts = collections.Counter()
        self.layout = getattr(model, "layout", None)
        # Attention over the pages: the engine's choice (`Engine.cache_kernels`).
        self.attn_kernels = self.engine.cache_kernels
        self._jit()
        # One jitted program fills the whole state (eager zeros compile one per shape).
        # The state, and the beam rows' next-token logits held from the call that fed
        # them to the beam step (`_beam_dev`) that chooses from them.
        self.state, self.held = jax.jit(self._empty_state)()
        self.sp = self._pin(self._pad_rows(SamplingArrays.build([], max_slots, vocab, (), [])),
                            put=True)
        self._requests: Dict[str, _Request] = {}
        self._queue: collections.deque = collections.deque()
        self._ready: List[RequestOutput] = []
        self._free_slots = list(range(max_slots))
        self._ids = itertools.count()
        self._order = itertools.count()
        self.prefill_tokens = 0               # prompt tokens computed (prefix hits excluded)
        self.preemptions = 0
        self._async_queues: Dict[str, asyncio.Queue] = {}
        self._driver: Optional[asyncio.Task] = None
        # Sessions: pages of a conversation's last turn kept for its next one.
        # session id -> (block-manager sequence, the tokens its pages hold), LRU order.
        self._holds: "collections.OrderedDict[str, tuple]" = collections.OrderedDict()
        self._sessions = set()
        self._session_ids = itertools.count()

    # -- device functions (each traced once) ------------------------------------

    def _jit(self):
        self._admit_fn = jax.jit(self._admit_dev, donate_argnames=("state", "sp"))
        self._prefill_fn = jax.jit(self._prefill_dev, donate_argnames=("state", "held"),
                                   static_argnames=("prompt_lp",))
        self._decode_fn = jax.jit(self._decode_dev, donate_argnames=("state", "held"))
        self._beam_fn = jax.jit(self._beam_dev, donate_argnames=("state", "groups"))
        self._groups_fn = jax.jit(lambda nb: self._pin(
            beam.new_groups(1, self.max_slots, self.width, nb)))
        self._copy_fn = jax.jit(self._copy_dev, donate_argnames=("state",))
        self._window_fn = jax.jit(self._window_dev)

    def warmup(self):
        """Compiles every device function now, with inputs that change nothing (no
        position written, no slot advanced), so no request waits for a compile."""
        s, m = self.max_slots, self.pages_per_seq
        for lp in (False, True):
            self.state, self.held, _ = self._prefill_fn(
                self.params, self.state, self.held, self.sp, **self._prefill_inputs(),
                prompt_lp=lp)
        for r in self.row_buckets:
            self.state, self.held = self._decode_fn(
                self.params, self.state, self.held, self.sp, np.arange(r, dtype=np.int32),
                np.zeros((r, m), np.int32), np.zeros((r,), bool), np.zeros((r,), bool))
        self.state = self._beam_fn(self.state, self.held, self.sp, self._new_groups(1),
                                   *self._beam_inputs(None))[0]
        self.state = self._copy_fn(self.state, np.zeros((s,), np.int32), np.zeros((s,), np.int32))
        jax.block_until_ready(self._window_fn(self.state, np.zeros((s,), np.int32)))
        slot = self._free_slots[-1]
        row = jax.tree_util.tree_map(lambda a: a[slot], jax.device_get(self.sp))
        hist = np.asarray(jax.device_get(self.state.hist[slot]))
        self.state, self.sp = self._admit_fn(self.state, self.sp, np.int32(slot), hist, row,
                                             np.int32(1))

    def _pin(self, tree, put: bool = False):
        """On a mesh: the pools' kv heads on "tensor" (when they divide), all else
        replicated, so every function keeps one sharding (no retrace). The pools are
        shared by all slots, so the data axis replicates the engine (no DP split)."""
        if self.layout is None:
            return tree
        mesh = self.layout.mesh
        heads = "tensor" if self.cfg.n_kv_heads % self.layout.tensor == 0 else None
        layers = "pipe" if self.layout.pipe > 1 else None   # each stage its layers' pages

        def spec(path, x):
            pool = any(getattr(k, "name", None) == "cache" for k in path)
            return NamedSharding(mesh, PartitionSpec(layers, None, heads)
                                 if pool and x.ndim >= 3 else PartitionSpec())

        shardings = jax.tree_util.tree_map_with_path(spec, tree)
        if put:
            return jax.device_put(tree, shardings)
        return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, tree, shardings)

    def _empty_state(self):
        e = self.engine
        held = jnp.zeros((self.max_slots, self.cfg.vocab_size), jnp.float32)
        return self._pin((self._init_state(
            paged_kv.zeros(self.cfg, self.num_pages, self.page_size, e.dtype, e.kv_dtype,
                           self.attn_kernels)), held))

    def _init_state(self, kv) -> DecodeState:
        s, w, v = self.max_slots, self.width, self.cfg.vocab_size if self.feat.processors else 0
        top = self.feat.top_n
        return DecodeState(
            cache=kv, tokens=jnp.zeros((s, w), jnp.int32),
            log_probs=jnp.zeros((s, w), jnp.float32),
            top_ids=jnp.zeros((s, w, top), jnp.int32),
            top_lps=jnp.zeros((s, w, top), jnp.float32),
            hist=jnp.full((s, w), -1, jnp.int32), seen=jnp.zeros((s, v), bool),
            counts=jnp.zeros((s, v), jnp.int32), last=jnp.zeros((s,), jnp.int32),
            pos=jnp.zeros((s,), jnp.int32), n_gen=jnp.zeros((s,), jnp.int32),
            finish=jnp.zeros((s,), jnp.int32), step=jnp.zeros((), jnp.int32))

    def _admit_dev(self, state: DecodeState, sp: SamplingArrays, slot, hist_row, sp_row,
                   prompt_len):
        """Resets slot `slot` for a new sequence: its history (the prompt), processor
        counts, token buffers and options."""
        self.trace_counts["admit"] += 1
        vocab = state.seen.shape[1]
        seen = processors.token_counts(hist_row[None], jnp.zeros((1,), jnp.int32),
                                       jnp.full((1,), hist_row.shape[0]), vocab)[0] > 0
        state = state.replace(
            tokens=state.tokens.at[slot].set(0), log_probs=state.log_probs.at[slot].set(0),
            top_ids=state.top_ids.at[slot].set(0), top_lps=state.top_lps.at[slot].set(0),
            hist=state.hist.at[slot].set(hist_row), seen=state.seen.at[slot].set(seen),
            counts=state.counts.at[slot].set(0), last=state.last.at[slot].set(0),
            pos=state.pos.at[slot].set(prompt_len - 1), n_gen=state.n_gen.at[slot].set(0),
            finish=state.finish.at[slot].set(FINISH_NONE))
        sp = jax.tree_util.tree_map(lambda a, r: a.at[slot].set(r), sp, sp_row)
        return self._pin(state), self._pin(sp)

    def _advance(self, state: DecodeState, logits, sp, mask):
        """The engine's token step for the rows in `mask` `[S]` only (the others are
        shown as finished to it, and keep their state)."""
        shown = state.replace(finish=jnp.where(mask, state.finish, FINISH_STOP))
        new = self.engine._advance(shown, logits, sp, self.feat)
        return new.replace(finish=jnp.where(mask, new.finish, state.finish))

    def _prefill_inputs(self) -> dict:
        """Host arrays of one prefill call that computes nothing (every row padding)."""
        rows, t, e = self.prefill_rows, self.prefill_len, self.cfg.embed_dim
        return dict(tokens=np.zeros((rows, t), np.int32),
                    positions=np.full((rows, t), -1, np.int32),
                    table=np.zeros((rows, self.pages_per_seq), np.int32),
                    last_index=np.zeros((rows,), np.int32),
                    src=np.full((self.max_slots,), -1, np.int32),
                    embeds=np.zeros((rows, t, e), np.float32), soft=np.zeros((rows, t), bool),
                    nxt=np.zeros((rows, t), np.int32), hold=np.zeros((self.max_slots,), bool))

    def _prefill_dev(self, params, state: DecodeState, held, sp, tokens, positions, table,
                     last_index, src, embeds, soft, nxt, hold, *, prompt_lp: bool = False):
        """Prompt chunks `[R, T]` (positions -1 = padding) written into their pages;
        slots with `src[s] >= 0` take their first token from row src[s]'s last logits,
        or, where `hold[s]` (beams), keep those logits in `held` for the beam step.

        embeds / soft: `[R, T, E]` / bool `[R, T]`: soft-prompt rows replace the token's
        embedding where set. prompt_lp (static): also return, per position, the
        log-prob of the next prompt token `nxt [R, T]` and the top alternatives (the
        logits of every position are computed; otherwise only the last one's).
        """
        self.trace_counts["prefill_lp" if prompt_lp else "prefill"] += 1
        cache = PagedCache(state.cache, table, self.max_len, self.attn_kernels)
        if prompt_lp:
            logits, cache = self.engine.model(params, tokens, positions, cache,
                                              soft=(embeds, soft))
            lps = log_probs_and_top(logits, nxt, self.feat.top_n)
            logits = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)
        else:
            logits, cache = self.engine.model(params, tokens, positions, cache,
                                              last_index=last_index, soft=(embeds, soft))
            lps = None
        state = state.replace(cache=cache.kv)
        first = logits[jnp.maximum(src, 0), 0]
        state = self._advance(state, first, sp, (src >= 0) & ~hold)
        held = jnp.where(((src >= 0) & hold)[:, None], first, held)
        return self._pin(state), self._pin(held), lps

    def _decode_dev(self, params, state: DecodeState, held, sp, slots, table, active,
                    beam_rows):
        """Up to `chunk` decode steps of the slots `slots` `[R]` (distinct) where `active`
        `[R]` is set (the others write nothing); table: `[R, M]` their page tables. A
        beam row (`beam_rows`) takes one step: it is fed its token and its logits are
        kept in `held` for the beam step, not sampled. The loop ends early when no row
        has a step left (every row finished, or only beam rows)."""
        self.trace_counts["decode"] += 1
        rows = state.replace(**{f: getattr(state, f)[slots] for f in _ROW_FIELDS})
        sp_rows = jax.tree_util.tree_map(lambda a: a[slots], sp)
        steps = jnp.where(beam_rows, 1, self.chunk)

        def live(i, s):
            return active & (s.finish == FINISH_NONE) & (i < steps)

        def body(carry):
            i, s, kept = carry
            now = live(i, s)
            pos = jnp.where(now, s.pos, -1)
            cache = PagedCache(s.cache, table, self.max_len, self.attn_kernels)
            logits, cache = self.engine.model(params, s.last[:, None], pos[:, None], cache)
            kept = jnp.where((now & beam_rows)[:, None], logits[:, 0], kept)
            s = self._advance(s.replace(cache=cache.kv), logits[:, 0], sp_rows,
                              now & ~beam_rows)
            return i + 1, s, kept

        def more(carry):
            i, s, _ = carry
            return (i < self.chunk) & jnp.any(live(i, s))

        _, rows, kept = jax.lax.while_loop(more, body, (jnp.int32(0), rows, held[slots]))
        state = rows.replace(**{f: getattr(state, f).at[slots].set(getattr(rows, f))
                                for f in _ROW_FIELDS})
        return self._pin(state), self._pin(held.at[slots].set(kept))

    def _beam_dev(self, state: DecodeState, held, sp, groups: beam.Groups, slots, nb,
                  max_new, early, length_penalty):
        """One beam step of one request (`ftjax.beam.select` over its beams' held
        logits): its beam slots `slots` `[NB]` (max_slots; unused columns hold
        max_slots, out of range) take their parents' processor rows, their new token
        (`last`) and its position. Returns (state, groups, parent `[NB]`, go on)."""
        self.trace_counts["beam"] += 1
        at = jnp.minimum(slots, self.max_slots - 1)
        sp_rows = jax.tree_util.tree_map(lambda a: a[at], sp)
        opt = beam.Options(nb=nb, max_new=max_new, early=early, length_penalty=length_penalty)
        use = self.feat.processors
        nxt = state.pos[at] + 1
        hist, seen, counts = state.hist[at], state.seen[at], state.counts[at]
        groups, parent, tok, hits = beam.select(held[at], sp_rows, hist, nxt, seen, counts,
                                                groups, opt, self.cfg.max_positions, use)
        _, hist, new_pos, seen, counts = beam.follow(parent, tok, hist, nxt, seen, counts, use)
        more = beam.go_on(groups, hits, early == beam.EARLY_CODES[True])

        def put(a, x):
            return a.at[slots].set(x, mode="drop")

        state = state.replace(hist=put(state.hist, hist), seen=put(state.seen, seen),
                              counts=put(state.counts, counts),
                              last=put(state.last, tok.reshape(-1)), pos=put(state.pos, new_pos))
        return self._pin(state), self._pin(groups), parent[0], more[0]

    def _new_groups(self, nb: int) -> beam.Groups:
        return self._groups_fn(np.int32(nb))

    def _beam_inputs(self, r: Optional[_Request]):
        """Host arrays of `_beam_dev` for request r (None: a call that changes nothing)."""
        slots = np.full((self.max_slots,), self.max_slots, np.int32)
        if r is None:
            return slots, *(np.zeros((1,), t) for t in (np.int32, np.int32, np.int32,
                                                         np.float32))
        slots[:len(r.samples)] = [s.slot for s in r.samples]
        sp = r.sp
        return (slots, np.array([sp.num_beams], np.int32), np.array([r.max_new], np.int32),
                np.array([beam.EARLY_CODES[sp.early_stopping]], np.int32),
                np.array([sp.length_penalty], np.float32))

    def _copy_dev(self, state: DecodeState, src, dst):
        self.trace_counts["copy"] += 1
        return self._pin(state.replace(cache=paged_kv.copy_pages(state.cache, src, dst)))

    def _window_dev(self, state: DecodeState, start):
        """Per slot the tokens from index `start` (chunk + 1 of them), and the counters."""
        self.trace_counts["window"] += 1
        idx = jnp.minimum(start[:, None] + jnp.arange(self.chunk + 1)[None, :], self.width - 1)

        def take(a):
            return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

        return (take(state.tokens), take(state.log_probs), take(state.top_ids),
                take(state.top_lps), state.n_gen, state.finish)

    # -- requests -----------------------------------------------------------------

    def _pad_rows(self, sp: SamplingArrays) -> SamplingArrays:
        """Options padded to the engine's fixed widths (ValueError past them)."""
        def fit(a, width, fill, what):
            a = np.asarray(a)
            shape = a.shape[:1] + width
            out = np.full(shape, fill, a.dtype)
            keep = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, shape))
            rest = a.copy()
            rest[keep] = fill
            if (rest != fill).any():
                raise ValueError(f"{what} exceeds the engine's limit "
                                 f"({' x '.join(map(str, width))})")
            out[keep] = a[keep]
            return jax.device_put(out)   # not jnp.asarray: that compiles per shape

        seqs = (MAX_SEQUENCES, MAX_SEQUENCE_LEN)
        return sp.replace(
            stop_ids=fit(sp.stop_ids, (MAX_STOP_IDS,), -1, "stop_token_ids (with eos ids)"),
            bad_ids=fit(sp.bad_ids, seqs, -1, "bad_words (entries x tokens)"),
            bad_len=fit(sp.bad_len, seqs[:1], 0, "bad_words"),
            stop_seq_ids=fit(sp.stop_seq_ids, seqs, -1, "stop_sequences (entries x tokens)"),
            stop_seq_len=fit(sp.stop_seq_len, seqs[:1], 0, "stop_sequences"))

    def add_request(self, prompt, sampling: Optional[SamplingParams] = None,
                    max_new_tokens: int = 64, soft_prompt: Optional[np.ndarray] = None,
                    session: Optional[str] = None) -> str:
        """Queues one request; returns its id.

        Args:
          prompt: a string (needs a tokenizer) or a list of token ids.
          sampling: its options (None: greedy). `sampling.max_new_tokens` overrides
            `max_new_tokens`; `n` > 1 decodes n samples sharing the prompt's pages.
          soft_prompt: optional float `[P, E]` embedding rows before the prompt's tokens
            (prompt tuning, as `Model.generate(soft_prompts=)`).
          session: an id from `open_session()`: the request continues that
            conversation (its prompt is the whole conversation so far), reusing the
            pages its previous turn left, and leaves its own for the next turn.
        Raises:
          ValueError: bad input (checked as `Model.generate` checks it), an option the
            engine does not serve (beams, more logprobs than `max_logprobs`,
            processors when compiled without), more samples than slots, or a request
            needing more pages than the whole pool.
          KeyError: an unknown or closed session.
        """
        sp = sampling or SamplingParams()
        req = self.model.requests([prompt], max_new_tokens, sp,
                                  None if soft_prompt is None else [soft_prompt])[0]
        if sp.num_beams > 1 and (sp.stop_strings or sp.stop_sequences or sp.logprobs
                                 or sp.prompt_logprobs is not None or session is not None):
            raise ValueError("num_beams > 1 does not support stop_strings, stop_sequences, "
                             "logprobs, prompt_logprobs or sessions")
        for what, n in (("logprobs", sp.logprobs), ("prompt_logprobs", sp.prompt_logprobs or 0)):
            if n > self.max_logprobs:
                raise ValueError(f"sampling.{what}={n} exceeds the engine's "
                                 f"max_logprobs={self.max_logprobs}")
        if session is not None:
            if session not in self._sessions:
                raise KeyError(f"unknown session {session!r} (not opened, or closed)")
            if sp.n != 1:
                raise ValueError("a session's request takes n=1 (one conversation)")
        rows_n = max(sp.n, sp.num_beams)     # slots: its samples, or its beams
        if sp.uses_processors and not self.feat.processors:
            raise ValueError("this engine was built with processors=False; the request uses "
                             "a logits processor (penalties, n-gram or bad-word bans, "
                             "min_new_tokens)")
        if sp.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer, and this model has none; "
                             "use stop_sequences (token ids)")
        if rows_n > self.max_slots:
            what = "num_beams" if sp.num_beams > 1 else "n"
            raise ValueError(f"sampling.{what}={rows_n} exceeds the engine's "
                             f"max_slots={self.max_slots}")
        total = min(req.length + req.max_new, self.cfg.max_positions)
        need = rows_n * -(-total // self.page_size)
        if need > self.num_pages - 1:
            raise ValueError(f"the request needs up to {need} pages of {self.page_size} tokens "
                             f"({rows_n} x {total} tokens); the pool has {self.num_pages - 1} "
                             f"usable pages (num_pages={self.num_pages})")
        if sp.seed is None and not sp.greedy:
            # Drawn once, so a preempted request recomputes the same samples.
            sp = dataclasses.replace(sp, seed=secrets.randbits(32))
        rows = SamplingArrays.build([sp] * rows_n, rows_n, self.cfg.vocab_size,
                                    self.cfg.eos_token_ids, [req.max_new] * rows_n,
                                    sample_index=list(range(rows_n)))
        rows = jax.device_get(self._pad_rows(rows))
        rid = f"req-{next(self._ids)}"
        soft = req.soft
        ids = [0] * (0 if soft is None else len(soft)) + list(req.ids)
        r = _Request(rid, ids, sp, req.max_new, [_Sample(j) for j in range(rows_n)], rows,
                     soft=soft, session=session)
        if sp.prompt_logprobs is not None:
            r.prompt_lp = [None] * len(req.ids)
        if self.blocks.prefix_caching and r.shareable:
            r.hashes = block_hashes(r.ids, self.page_size)
        self._requests[rid] = r
        if req.max_new == 0:
            r.samples = r.samples[:sp.n]
            for s in r.samples:
                s.done, s.reason = True, "length"
            self._ready += self._outputs(r)
            del self._requests[rid]
        else:
            self._queue.append(r)
        return rid

    def abort(self, rid: str):
        """Cancels a queued or running request; its slots and pages are freed now.

        Raises:
          KeyError: `rid` is not a queued or running request.
        """
        r = self._requests.get(rid)
        if r is None:
            raise KeyError(f"unknown request id {rid!r} (not queued or running)")
        if r.phase == "waiting":
            self._queue.remove(r)
        else:
            self._release(r)
        del self._requests[rid]

    def has_unfinished(self) -> bool:
        return bool(self._requests) or bool(self._ready)

    def stats(self) -> dict:
        """running / waiting requests, busy slots, pages in use / total, prefix-cache use."""
        b = self.blocks.stats()
        return dict(running=sum(r.phase != "waiting" for r in self._requests.values()),
                    waiting=len(self._queue),
                    slots_busy=self.max_slots - len(self._free_slots),
                    pages_in_use=b["pages_in_use"], pages_total=b["pages_total"],
                    prefix_queries=b["prefix_queries"], prefix_hits=b["prefix_hits"],
                    prefix_cached_tokens=b["cached_tokens"],
                    prefill_tokens=self.prefill_tokens, preemptions=self.preemptions,
                    sessions_kept=len(self._holds))

    # -- scheduling ---------------------------------------------------------------

    def _release(self, r: _Request):
        """Frees a request's pages and slots (eviction, abort, preemption)."""
        for s in r.samples:
            if r.key(s.j) in self.blocks:
                self.blocks.free(r.key(s.j))
            if s.slot >= 0:
                self._free_slots.append(s.slot)
                s.slot = -1

    def _preempt(self, r: _Request):
        """Back to the front of the queue, to be recomputed from its prompt."""
        self._release(r)
        self.preemptions += 1
        r.phase, r.prefilled = "waiting", 0
        r.groups, r.beam_steps = None, 0
        for s in r.samples:
            s.fetched, s.tokens, s.log_probs, s.tops = 0, [], [], []
            s.done, s.reason, s.cut = False, None, None
        self._queue.appendleft(r)

    def _admit(self):
        headroom = self._next_chunk_pages()
        ahead = sum(len(q.samples) for q in self._requests.values()
                    if q.phase == "prefill" and q.samples[0].slot < 0)
        while self._queue:
            r = self._queue[0]
            n = len(r.samples)
            # Prompts computed ahead of a free slot: at most max_slots sequences' worth.
            if ahead + n > self.max_slots:
                return
            cached = self._continue(r) if r.session in self._holds else None
            if cached is None:
                tokens = r.ids if r.shareable else None
                # Kept session pages are a cache: given up before a request waits.
                while self._holds and not self.blocks.can_allocate(len(r.ids), tokens):
                    self._drop_hold(next(iter(self._holds)))
                if (not self.blocks.can_allocate(len(r.ids), tokens)
                        or self._prefix_in_flight(r)):
                    return
                # Leave the pages the running sequences' next decode chunk takes, so
                # admitting does not force a preemption at once.
                if self.blocks.num_free - -(-len(r.ids) // self.page_size) < headroom:
                    return
                cached = self.blocks.allocate(r.key(0), len(r.ids), tokens)
            self._queue.popleft()
            r.prefilled = cached
            r.phase, r.order = "prefill", next(self._order)
            ahead += n

    def _take_slots(self, r: _Request) -> bool:
        """Slots for a request's samples, set up for its prompt (before the prefill
        call that completes the prompt samples their first tokens); False if too few
        are free."""
        if r.samples[0].slot >= 0:
            return True
        if len(r.samples) > len(self._free_slots):
            return False
        hist = np.full((self.width,), -1, np.int32)
        hist[r.n_soft:len(r.ids)] = r.ids[r.n_soft:]
        for s in r.samples:
            s.slot = self._free_slots.pop(0)
            row = jax.tree_util.tree_map(lambda a, j=s.j: a[j], r.sp_rows)
            self.state, self.sp = self._admit_fn(self.state, self.sp, np.int32(s.slot),
                                                 hist, row, np.int32(len(r.ids)))
        return True

    # -- sessions ---------------------------------------------------------------

    def open_session(self) -> str:
        """A new conversation id for `add_request(session=)`: each of its requests
        leaves its pages (prompt + reply) for the next one, whose prompt then only
        needs the new tokens computed. Kept pages are a cache: under memory pressure
        they are given up (least recently used first) and the next turn recomputes."""
        sid = f"session-{next(self._session_ids)}"
        self._sessions.add(sid)
        return sid

    def close_session(self, sid: str):
        """Frees the session's kept pages. KeyError: unknown or closed session."""
        if sid not in self._sessions:
            raise KeyError(f"unknown session {sid!r} (not opened, or closed)")
        self._sessions.discard(sid)
        if sid in self._holds:
            self._drop_hold(sid)

    def _drop_hold(self, sid: str):
        seq, _ = self._holds.pop(sid)
        self.blocks.free(seq)

    def _keep(self, r: _Request, s: _Sample):
        """A finished session turn: its pages stay, as the session's, holding the
        prompt and every reply token but the last (sampled, never fed)."""
        key = r.key(s.j)
        end = len(s.tokens) if s.cut is None else s.cut
        if r.session in self._sessions and r.shareable and end >= 1:
            if r.session in self._holds:
                self._drop_hold(r.session)
            hold = ("session", r.session)
            self.blocks.fork(key, hold)
            self._holds[r.session] = (hold, r.ids + s.tokens[:end - 1])
        self.blocks.free(key)

    def _continue(self, r: _Request) -> Optional[int]:
        """Admits a session's request onto its kept pages: returns the tokens already
        computed, or None (the pages do not fit the prompt, or growing them needs
        pages there are not; they are then freed)."""
        seq, held = self._holds.pop(r.session)
        n = len(held)
        if not r.shareable or n >= len(r.ids) or r.ids[:n] != held:
            self.blocks.free(seq)
            return None
        key = r.key(0)
        self.blocks.fork(seq, key)
        self.blocks.free(seq)
        grow = len(r.ids) - self.blocks.num_tokens(key)
        if grow > 0:
            if not self.blocks.can_append(key, grow):
                self.blocks.free(key)
                return None
            self._copy(self.blocks.append_slots(key, grow))
        return n

    def _copy(self, copies):
        """Copy-on-write page copies `[(src, dst)]`, in fixed-size calls."""
        n = self.max_slots
        for i in range(0, len(copies), n):
            part = np.zeros((2, n), np.int32)
            part[:, :len(copies[i:i + n])] = np.asarray(copies[i:i + n]).T
            self.state = self._copy_fn(self.state, part[0], part[1])

    def _need(self, r: _Request, s: _Sample) -> int:
        """Tokens sequence `s` must hold for its next decode chunk: the positions the
        chunk writes (its current one on; the last token, never fed, needs none). A
        beam feeds its one chosen token."""
        if r.beams:
            return len(r.ids) + r.beam_steps
        return min(len(r.ids) + max(s.fetched, 1) - 1 + self.chunk,
                   len(r.ids) + r.max_new - 1, self.cfg.max_positions)

    def _next_chunk_pages(self) -> int:
        """New pages the next decode chunk of every admitted sequence will take."""
        ps, total = self.page_size, 0
        for r in self._requests.values():
            if r.phase == "waiting":
                continue
            for s in r.samples:
                key = r.key(s.j)
                if s.done or key not in self.blocks:
                    continue
                have = self.blocks.num_tokens(key)
                total += max(0, -(-self._need(r, s) // ps) - -(-have // ps))
        return total

    def _prefix_in_flight(self, r: _Request) -> bool:
        """A request now in prefill is computing blocks this prompt could reuse: wait for
        them (so n requests arriving together with one prefix compute it once)."""
        usable = set(r.hashes[:(len(r.ids) - 1) // self.page_size])
        return bool(usable) and any(
            usable.intersection(q.hashes[q.prefilled // self.page_size:])
            for q in self._requests.values() if q.phase == "prefill")

    def _prefill(self):
        rows, t = self.prefill_rows, self.prefill_len
        a = self._prefill_inputs()
        tokens, positions, table, last, src = (a["tokens"], a["positions"], a["table"],
                                               a["last_index"], a["src"])
        row, work, spans, slots_wait = 0, [], [], False
        for r in sorted((r for r in self._requests.values() if r.phase == "prefill"),
                        key=lambda r: r.order):
            start = r.prefilled
            page_row = self.blocks.table([r.key(0)])[0]
            while row < rows and start < len(r.ids):
                end = min(start + t, len(r.ids))
                if end == len(r.ids):
                    # Slots go first come, first served: a request waiting for n of
                    # them is not overtaken by a later one needing fewer.
                    slots_wait = slots_wait or not self._take_slots(r)
                    if slots_wait:
                        break      # its last chunk waits for a slot
                tokens[row, :end - start] = r.ids[start:end]
                positions[row, :end - start] = np.arange(start, end)
                table[row] = page_row
                if start < r.n_soft:
                    k = min(end, r.n_soft) - start
                    a["embeds"][row, :k] = r.soft[start:start + k]
                    a["soft"][row, :k] = True
                if r.prompt_lp is not None:
                    nxt = r.ids[start + 1:end + 1]
                    a["nxt"][row, :len(nxt)] = nxt
                    spans.append((r, row, start, end))
                if end == len(r.ids):
                    last[row] = end - start - 1
                    for s in r.samples:
                        src[s.slot] = row
                        a["hold"][s.slot] = r.beams
                row, start = row + 1, end
            if start > r.prefilled:
                work.append((r, start))
            if row == rows:
                break
        if not work:
            return
        self.state, self.held, lps = self._prefill_fn(self.params, self.state, self.held,
                                                      self.sp, **a, prompt_lp=bool(spans))
        if spans:
            chosen, top_ids, top_lps = jax.device_get(lps)
            for r, row, start, end in spans:
                # Position q's logits give prompt token q + 1 (entry q + 1 - n_soft).
                for q in range(max(start, r.n_soft), min(end, len(r.ids) - 1)):
                    r.prompt_lp[q + 1 - r.n_soft] = _alternatives(
                        r.ids[q + 1], chosen[row, q - start], top_ids[row, q - start],
                        top_lps[row, q - start], r.sp.prompt_logprobs)
        for r, done in work:
            self.prefill_tokens += done - r.prefilled
            r.prefilled = done
            self.blocks.mark_computed(r.key(0), done)
            if done == len(r.ids):
                r.phase = "decode"
                for s in r.samples[1:]:
                    self.blocks.fork(r.key(0), r.key(s.j))
                if r.beams:
                    r.groups = self._new_groups(r.sp.num_beams)

    def _reserve(self) -> List[_Request]:
        """Pages for the next decode chunk of every decoding sequence; preempts the
        newest requests when the pool runs out. Returns the decoding requests."""
        copies = []
        while True:
            running = sorted((r for r in self._requests.values() if r.phase == "decode"),
                             key=lambda r: r.order)
            for r in running:
                for s in r.samples:
                    if s.done:
                        continue
                    key = r.key(s.j)
                    need = self._need(r, s)
                    grow = max(0, need - self.blocks.num_tokens(key))
                    if grow and not self.blocks.can_append(key, grow) and self._holds:
                        self._drop_hold(next(iter(self._holds)))
                        break
                    if grow and not self.blocks.can_append(key, grow):
                        victim = max((q for q in self._requests.values()
                                      if q.phase != "waiting"), key=lambda q: q.order)
                        # Its pending copy-on-write copies die with its pages (a freed
                        # page may be handed out again in this same loop).
                        dead = {p for q in victim.samples if victim.key(q.j) in self.blocks
                                for p in self.blocks.pages(victim.key(q.j))}
                        copies = [c for c in copies if c[1] not in dead]
                        self._preempt(victim)
                        break
                    if grow:
                        copies += self.blocks.append_slots(key, grow)
                else:
                    continue
                break
            else:
                break
        self._copy(copies)
        return [r for r in self._requests.values() if r.phase == "decode"]

    def step(self) -> List[RequestOutput]:
        """One scheduling step: admit, prefill a budget of prompt tokens, decode a chunk.

        Returns:
          One `RequestOutput` per sequence that produced tokens or finished.
        """
        out, self._ready = self._ready, []
        self._admit()
        self._prefill()
        out += self._beam_step()
        running = self._reserve()
        decoding = [(r, s) for r in running for s in r.samples if not s.done and s.slot >= 0]
        if decoding:
            n = next(b for b in self.row_buckets if b >= len(decoding))
            busy = [s.slot for _, s in decoding]
            taken = set(busy)
            idle = [i for i in range(self.max_slots) if i not in taken]
            slots = np.asarray(busy + idle[:n - len(busy)], np.int32)
            table = np.zeros((n, self.pages_per_seq), np.int32)
            active = np.arange(n) < len(decoding)
            beam_rows = np.zeros((n,), bool)
            for i, (r, s) in enumerate(decoding):
                table[i] = self.blocks.table([r.key(s.j)])[0]
                beam_rows[i] = r.beams
            self.state, self.held = self._decode_fn(self.params, self.state, self.held,
                                                    self.sp, slots, table, active, beam_rows)
        if not decoding:
            return out
        start = np.zeros((self.max_slots,), np.int32)
        for r, s in decoding:
            start[s.slot] = s.fetched
        toks, lps, top_ids, top_lps, n_gen, finish = jax.device_get(
            self._window_fn(self.state, start))
        for r in running:
            if r.beams:
                continue          # a beam request's output comes when its search ends
            for s in r.samples:
                if s.done or s.slot < 0:
                    continue
                b, k = s.slot, int(n_gen[s.slot]) - s.fetched
                s.tokens += toks[b, :k].tolist()
                s.log_probs += lps[b, :k].tolist()
                if r.sp.logprobs:
                    s.tops += [_alternatives(toks[b, i], lps[b, i], top_ids[b, i],
                                             top_lps[b, i], r.sp.logprobs) for i in range(k)]
                s.fetched += k
                if r.sp.stop_strings and k:
                    s.cut = first_stop_hit(self.tokenizer, s.tokens, r.sp.stop_strings)
                if s.cut is not None:
                    s.done, s.reason = True, "stop"
                elif finish[b] != FINISH_NONE:
                    s.done, s.reason = True, "stop" if finish[b] == FINISH_STOP else "length"
                if s.done:
                    self._keep(r, s)
                    self._free_slots.append(s.slot)
                    s.slot = -1
            out += self._outputs(r)
            if all(s.done for s in r.samples):
                del self._requests[r.rid]
        return out

    def _beam_step(self) -> List[RequestOutput]:
        """Each decoding beam request chooses its beams' next tokens from the logits its
        last call held (`_beam_dev`); its beams' page tables then follow their parents
        (forks: full pages shared, the partly filled last page copied on write by the
        next `_reserve`). A request whose search ended returns its sequences."""
        out = []
        for r in sorted((r for r in self._requests.values()
                         if r.phase == "decode" and r.beams), key=lambda r: r.order):
            self.state, r.groups, parent, more = self._beam_fn(
                self.state, self.held, self.sp, r.groups, *self._beam_inputs(r))
            parent, more = jax.device_get((parent, more))
            r.beam_steps += 1
            if not more or r.beam_steps >= r.max_new:
                out += self._beam_outputs(r)
                continue
            nb = r.sp.num_beams
            for j in range(nb):
                self.blocks.fork(r.key(int(parent[j])), ("beam", r.rid, j))
            for j in range(nb):
                self.blocks.free(r.key(j))
            for j in range(nb):
                self.blocks.fork(("beam", r.rid, j), r.key(j))
                self.blocks.free(("beam", r.rid, j))
        return out

    def _beam_outputs(self, r: _Request) -> List[RequestOutput]:
        """A finished beam search's best `n` hypotheses (as `Model.generate`'s); its
        slots and pages are freed."""
        g = r.groups
        fin, fin_lp, fin_len, fin_stop, scores = jax.device_get(
            (g.fin[0], g.fin_lp[0], g.fin_len[0], g.fin_stop[0], g.fin_scores[0]))
        self._release(r)
        del self._requests[r.rid]
        out = []
        for j in range(r.sp.n):
            toks = fin[j, :fin_len[j]].tolist()
            out.append(RequestOutput(
                request_id=r.rid, sample=j, new_tokens=toks,
                new_log_probs=fin_lp[j, :fin_len[j]].tolist(), finished=True,
                finish_reason="stop" if fin_stop[j] else "length", tokens=toks,
                score=float(scores[j])))
        return out

    def _outputs(self, r: _Request) -> List[RequestOutput]:
        """New tokens (past what was returned before a preemption) and final outputs."""
        out = []
        for s in r.samples:
            end = len(s.tokens) if s.cut is None else s.cut
            fin = s.done and not s.reported
            if end <= s.emitted and not fin:
                continue
            new = slice(s.emitted, max(end, s.emitted))
            out.append(RequestOutput(
                request_id=r.rid, sample=s.j, new_tokens=s.tokens[new],
                new_log_probs=s.log_probs[new], finished=fin,
                finish_reason=s.reason if fin else None, tokens=s.tokens[:end],
                new_top_logprobs=s.tops[new] if r.sp.logprobs else None,
                prompt_logprobs=r.prompt_lp))
            s.emitted = max(end, s.emitted)
            s.reported = s.reported or fin
        return out

    def iterate(self, rids: List[str]) -> Iterator[RequestOutput]:
        """Steps the engine until the requests `rids` have finished, yielding their
        outputs as steps produce them (for synchronous clients: `Model.stream`,
        sessions). Outputs of other requests made meanwhile are kept for the next
        `step()`. Closing the iterator early aborts the requests still running."""
        want, other = set(rids), []
        try:
            while True:
                for o in self.step():
                    if o.request_id in want:
                        yield o
                    else:
                        other.append(o)
                if not (any(r in self._requests for r in want)
                        or any(o.request_id in want for o in self._ready)):
                    return
        finally:
            self._ready = other + self._ready
            for rid in want:
                if rid in self._requests:
                    self.abort(rid)

    # -- async --------------------------------------------------------------------

    async def generate_async(self, prompt, sampling: Optional[SamplingParams] = None,
                             max_new_tokens: int = 64):
        """Yields this request's `RequestOutput`s as steps produce them (for servers).

        All requests of one engine must then go through `generate_async` (one driver
        task steps the engine while any is waiting). Cancelling the consumer aborts
        the request.
        """
        rid = self.add_request(prompt, sampling, max_new_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        self._async_queues[rid] = queue
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        n = (sampling or SamplingParams()).n
        finished = 0
        try:
            while finished < n:
                o = await queue.get()
                finished += o.finished
                yield o
        finally:
            self._async_queues.pop(rid, None)
            if finished < n and rid in self._requests:
                self.abort(rid)

    async def _drive(self):
        while self._async_queues:
            for o in self.step():
                q = self._async_queues.get(o.request_id)
                if q is not None:
                    q.put_nowait(o)
            await asyncio.sleep(0)
