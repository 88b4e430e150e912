"""Beam search, step for step HuggingFace `generate(num_beams=...)`'s algorithm.

A group (one request) has nb running beams. Each step: log-softmax, the logits
processors (on log-probabilities, as HF does), accumulate the beams' scores, keep the
top `(1 + stop ids) x nb` continuations, move those that end (stop token or length)
into the finished set (score / length ** length_penalty), continue with the best nb
that did not end, and make the beams' cache rows follow their parents. Early stopping
(True / False / "never") uses HF's heuristics, so sequences and scores match HF's.

`select` is the one implementation of a step's choice, for R groups of NB beam
columns of which each group uses its first `nb` (data, so groups with different beam
counts, lengths and options share one compiled shape). Two clients drive it:
`BeamSearch` (`Model.generate`: a batch of same-option requests in one on-device loop
over a contiguous cache whose rows are reordered) and `ftjax.LLMEngine` (one group per
request over the paged cache: the beams' page tables are forked, copy-on-write).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from ftjax import processors
from ftjax.engine import Engine, Features
from ftjax.numerics import MASK
from ftjax.cache import KVCache
from ftjax.sampling import SamplingArrays

# early_stopping as data (`Options.early`).
EARLY_CODES = {False: 0, True: 1, "never": 2}


@flax.struct.dataclass
class Groups:
    """Search state of R groups x NB beam columns (columns past a group's nb unused)."""

    gen: jax.Array          # i32 [R, NB, W] running beams' tokens
    gen_lp: jax.Array       # f32 [R, NB, W] their log-probabilities (unmodified model)
    scores: jax.Array       # f32 [R, NB] running beams' summed log-probs
    fin: jax.Array          # i32 [R, NB, W] finished hypotheses
    fin_lp: jax.Array       # f32 [R, NB, W]
    fin_len: jax.Array      # i32 [R, NB]
    fin_stop: jax.Array     # bool [R, NB] ended by a stop token
    fin_scores: jax.Array   # f32 [R, NB] length-penalized scores
    is_fin: jax.Array       # bool [R, NB]
    unsat: jax.Array        # bool [R] HF's "early-stop heuristic unsatisfied"
    step: jax.Array         # i32 [R] tokens generated so far


@flax.struct.dataclass
class Options:
    """Per-group beam options as data (python scalars broadcast)."""

    nb: jax.Array               # i32 [R] beams used (<= NB)
    max_new: jax.Array          # i32 [R]
    early: jax.Array            # i32 [R] EARLY_CODES
    length_penalty: jax.Array   # f32 [R]


def new_groups(r: int, nb_cols: int, width: int, nb) -> Groups:
    """Fresh groups: beam 0 alone is live (the others start at MASK, as HF's)."""
    valid = jnp.arange(nb_cols)[None, :] < _per_group(nb, r)
    zeros = jnp.zeros((r, nb_cols, width), jnp.int32)
    return Groups(
        gen=zeros, gen_lp=zeros.astype(jnp.float32),
        scores=jnp.zeros((r, nb_cols)).at[:, 1:].set(MASK), fin=zeros,
        fin_lp=zeros.astype(jnp.float32), fin_len=jnp.zeros((r, nb_cols), jnp.int32),
        fin_stop=jnp.zeros((r, nb_cols), bool),
        fin_scores=jnp.where(valid, MASK, -jnp.inf).astype(jnp.float32),
        is_fin=jnp.zeros((r, nb_cols), bool), unsat=jnp.ones((r,), bool),
        step=jnp.zeros((r,), jnp.int32))


def _gather(x, idx):
    """x `[R, k, ...]`, idx `[R, m]` -> `[R, m, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _per_group(x, r):
    """A python scalar or `[R]` array as `[R, 1]`."""
    return jnp.broadcast_to(jnp.asarray(x), (r,))[:, None]


def select(logits, sp: SamplingArrays, hist, pos, seen, counts, g: Groups, opt: Options,
           max_positions: int, use_processors: bool):
    """One step's choice for R groups of NB beams.

    Args:
      logits: f32 `[R*NB, V]` next-token logits of the beams' rows (group-major).
      sp, hist, seen, counts: the rows' options and processor state; pos: i32 `[R*NB]`
        position of the next token.
      g, opt: the groups' state and options. opt.length_penalty and opt.early may be
        python scalars (then they are compiled in, as `Model.generate` does).
    Returns:
      (groups', parent `[R, NB]` (beam column each new beam continues), token `[R, NB]`,
      hits `[R, k]` (every candidate ends: no continuation left when all do)).
    """
    rb, v = logits.shape
    r, nbc = g.scores.shape
    nb, max_new = _per_group(opt.nb, r), _per_group(opt.max_new, r)
    step = g.step[:, None]
    valid = jnp.arange(nbc)[None, :] < nb                                    # [R, NB]
    raw = jax.nn.log_softmax(logits, axis=-1)
    lp = raw
    if use_processors:
        lp = processors.process(raw, sp, hist, pos, seen, counts, jnp.repeat(g.step, nbc))
    acc = lp.reshape(r, nbc, v) + g.scores[:, :, None]
    acc = jnp.where(valid[:, :, None], acc, -jnp.inf).reshape(r, nbc * v)
    k = min(max(2, 1 + sp.stop_ids.shape[1]) * nbc, nbc * v)
    top_lp, top_idx = jax.lax.top_k(acc, k)                               # [R, k]
    parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
    real = parent < nb              # not a padding column's (banned tokens are -inf too)
    stop_ids = sp.stop_ids.reshape(r, nbc, -1)[:, 0]                       # [R, S]
    ends_stop = jnp.any(tok[:, :, None] == stop_ids[:, None, :], axis=-1)
    pos2 = pos.reshape(r, nbc)
    at_limit = (step + 1 >= max_new) | (_gather(pos2, parent) + 1 >= max_positions)
    hits = ends_stop | at_limit | ~real                                    # [R, k]
    tok_raw_lp = jnp.take_along_axis(raw.reshape(r, nbc * v), top_idx, axis=1)
    width = g.gen.shape[2]
    at_step = jnp.arange(width)[None, None, :] == step[:, :, None]
    cand = jnp.where(at_step, tok[:, :, None], _gather(g.gen, parent))     # [R, k, W]
    cand_lp = jnp.where(at_step, tok_raw_lp[:, :, None], _gather(g.gen_lp, parent))

    # The nb best continuations that did not end keep running.
    run_lp = top_lp + hits * MASK
    run_scores, nxt = jax.lax.top_k(run_lp, nbc)                           # [R, NB]
    new_parent = _gather(parent, nxt)
    new_tok = _gather(tok, nxt)

    # Finished: only the top nb candidates may enter, with the length penalty.
    did = hits & real & (jnp.arange(k)[None, :] < nb)
    if isinstance(opt.length_penalty, (int, float)):
        penalty = opt.length_penalty
        early_true = opt.early == EARLY_CODES[True]
        never = opt.early == EARLY_CODES["never"] and penalty > 0.0
    else:
        penalty = _per_group(opt.length_penalty, r)
        early = _per_group(opt.early, r)
        early_true = early == EARLY_CODES[True]
        never = (early == EARLY_CODES["never"]) & (penalty > 0.0)
    fin_cand = top_lp / ((step + 1.0) ** penalty)
    all_fin = jnp.all(g.is_fin | ~valid, axis=-1, keepdims=True)
    full = all_fin & early_true
    fin_cand = fin_cand + full * MASK + (~g.unsat)[:, None] * MASK + (~did) * MASK
    merged = jnp.concatenate([g.fin_scores, fin_cand], axis=1)
    fin_scores, pick = jax.lax.top_k(merged, nbc)
    fin = _gather(jnp.concatenate([g.fin, cand], 1), pick)
    fin_lp = _gather(jnp.concatenate([g.fin_lp, cand_lp], 1), pick)
    fin_len = _gather(jnp.concatenate([g.fin_len, jnp.broadcast_to(step + 1, (r, k))], 1), pick)
    fin_stop = _gather(jnp.concatenate([g.fin_stop, ends_stop], 1), pick)
    is_fin = _gather(jnp.concatenate([g.is_fin, did], 1), pick) & valid
    fin_scores = jnp.where(valid, fin_scores, -jnp.inf)

    # HF's early-stop heuristic.
    best_len = jnp.where(never, max_new, step + 1).astype(jnp.float32)
    best = run_scores[:, :1] / best_len ** penalty
    worst = jnp.where(is_fin, jnp.min(jnp.where(valid, fin_scores, jnp.inf), axis=-1,
                                      keepdims=True), MASK)
    unsat = g.unsat & jnp.any((best > worst) & valid, axis=-1)
    new = Groups(gen=_gather(cand, nxt), gen_lp=_gather(cand_lp, nxt), scores=run_scores,
                 fin=fin, fin_lp=fin_lp, fin_len=fin_len, fin_stop=fin_stop,
                 fin_scores=fin_scores, is_fin=is_fin, unsat=unsat, step=g.step + 1)
    return new, new_parent, new_tok, hits


def go_on(g: Groups, hits, early_true) -> jax.Array:
    """bool `[R]`: each group has a step left (HF's heuristic unsatisfied, not every
    hypothesis done under early_stopping=True, some continuation not ending)."""
    return g.unsat & ~(jnp.all(g.is_fin, axis=-1) & early_true) & ~jnp.all(hits, axis=-1)


def follow(parent, tok, hist, pos, seen, counts, use_processors: bool):
    """The beams' processor rows after `select`: each new beam takes its parent's row
    and records its token at the parent's next position.

    Returns (flat parent rows `[R*NB]`, hist, pos of the new token, seen, counts)."""
    r, nbc = parent.shape
    flat = (parent + jnp.arange(r)[:, None] * nbc).reshape(-1)
    new_pos = pos[flat]
    tok_flat = tok.reshape(-1)
    rows = jnp.arange(r * nbc)
    hist = hist[flat].at[rows, new_pos].set(tok_flat, mode="drop")
    seen, counts = seen[flat], counts[flat]
    if use_processors:
        seen = seen.at[rows, tok_flat].set(True)
        counts = counts.at[rows, tok_flat].add(1)
    return flat, hist, new_pos, seen, counts


@flax.struct.dataclass
class BeamState:
    cache: KVCache
    logits: jax.Array       # f32 [R*nb, V] next-token logits of the running beams
    hist: jax.Array         # i32 [R*nb, P] tokens by position
    seen: jax.Array         # bool [R*nb, V] (or [R*nb, 0] without processors)
    counts: jax.Array       # i32 [R*nb, V]
    pos: jax.Array          # i32 [R*nb] position of the next token
    groups: Groups
    go_on: jax.Array        # bool [] any valid continuation left


class BeamSearch:
    """Jitted beam search over an `Engine`'s model (a batch of requests with the same
    beam options, in one on-device loop)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.run = jax.jit(self._run, static_argnames=(
            "num_beams", "max_new", "early_stopping", "length_penalty", "max_len", "width", "feat"))

    def _step(self, params, s: BeamState, sp: SamplingArrays, live, *, opt: Options, feat):
        g, parent, tok, hits = select(s.logits, sp, s.hist, s.pos, s.seen, s.counts, s.groups,
                                      opt, self.engine.cfg.max_positions, feat.processors)
        flat, hist, new_pos, seen, counts = follow(parent, tok, s.hist, s.pos, s.seen,
                                                   s.counts, feat.processors)
        cache = s.cache.take_rows(flat)
        # One loop for the batch (HF's): on while any live request goes on.
        early_true = opt.early == EARLY_CODES[True]
        more = (jnp.any(g.unsat & live) & ~(jnp.all(g.is_fin) & early_true)
                & ~jnp.all(hits | ~live[:, None]))
        logits, cache = self.engine.step_logits(params, tok.reshape(-1)[:, None],
                                                new_pos[:, None], cache)
        return BeamState(cache=cache, logits=logits[:, 0], hist=hist, seen=seen, counts=counts,
                         pos=new_pos + 1, groups=g, go_on=more)

    def _run(self, params, tokens, start, lengths, rows, hist, sp: SamplingArrays, live,
             cache=None, soft=None, *, num_beams: int, max_new: int, early_stopping,
             length_penalty: float, max_len: int, width: int, feat: Features) -> BeamState:
        """Prefill (one row per distinct prompt, gathered to R x nb beams), then search.

        Args are `Engine._prefill`'s; live: bool `[R]` real (not padding) requests.
        """
        self.engine.trace_counts["beam"] += 1
        logits, cache, _ = self.engine.context(params, tokens, start, lengths, rows, cache,
                                               soft, max_len, -1)
        rb = rows.shape[0]
        r = rb // num_beams
        vocab = self.engine.cfg.vocab_size if feat.processors else 0
        pos = (start + lengths)[rows]
        seen = processors.token_counts(hist, jnp.zeros_like(pos), pos, vocab) > 0
        opt = Options(nb=num_beams, max_new=max_new, early=EARLY_CODES[early_stopping],
                      length_penalty=length_penalty)
        init = BeamState(
            cache=cache, logits=logits, hist=hist, seen=seen,
            counts=jnp.zeros((rb, vocab), jnp.int32), pos=pos,
            groups=new_groups(r, num_beams, width, num_beams), go_on=jnp.asarray(max_new > 0))
        body = functools.partial(self._step, params, sp=sp, live=live, opt=opt, feat=feat)
        return jax.lax.while_loop(lambda s: s.go_on & (s.groups.step[0] < max_new), body, init)
