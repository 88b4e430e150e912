"""Beam search on device, step for step HuggingFace `generate(num_beams=...)`'s algorithm.

R requests x nb beams are the rows of the batch. Each step: log-softmax, the
logits processors (on log-probabilities, as HF does), accumulate the beams'
scores, keep the top `(1 + stop ids) x nb` continuations of each request, move
those that end (stop token or length) into the finished set (score / length **
length_penalty), continue with the best nb that did not end, and reorder the
KV cache rows to follow their parent beams. Early stopping (True / False /
"never") uses HF's heuristics, so sequences and scores match HF's.
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



@flax.struct.dataclass
class BeamState:
    cache: KVCache
    logits: jax.Array       # f32 [R*nb, V] next-token logits of the running beams
    hist: jax.Array         # i32 [R*nb, P] tokens by position
    seen: jax.Array         # bool [R*nb, V] (or [R*nb, 0] without processors)
    counts: jax.Array       # i32 [R*nb, V]
    pos: jax.Array          # i32 [R*nb] position of the next token
    gen: jax.Array          # i32 [R, nb, W] running beams' tokens
    gen_lp: jax.Array       # f32 [R, nb, W] their log-probabilities (unmodified model)
    scores: jax.Array       # f32 [R, nb] running beams' summed log-probs
    fin: jax.Array          # i32 [R, nb, W] finished hypotheses
    fin_lp: jax.Array       # f32 [R, nb, W]
    fin_len: jax.Array      # i32 [R, nb]
    fin_stop: jax.Array     # bool [R, nb] ended by a stop token
    fin_scores: jax.Array   # f32 [R, nb] length-penalized scores
    is_fin: jax.Array       # bool [R, nb]
    unsat: jax.Array        # bool [R] HF's "early-stop heuristic unsatisfied"
    go_on: jax.Array        # bool [] any valid continuation left
    step: jax.Array         # i32 [] tokens generated so far


def _gather(x, idx):
    """x `[R, k, ...]`, idx `[R, m]` -> `[R, m, ...]`."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class BeamSearch:
    """Jitted beam search over an `Engine`'s model."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.run = jax.jit(self._run, static_argnames=(
            "num_beams", "max_new", "early_stopping", "length_penalty", "max_len", "width", "feat"))

    def _step(self, params, s: BeamState, sp: SamplingArrays, live, *, num_beams, max_new,
              early_stopping, length_penalty, feat):
        cfg = self.engine.cfg
        rb, v = s.logits.shape
        r, nb = rb // num_beams, num_beams
        raw = jax.nn.log_softmax(s.logits, axis=-1)
        lp = raw
        if feat.processors:
            lp = processors.process(raw, sp, s.hist, s.pos, s.seen, s.counts,
                                    jnp.full((rb,), s.step))
        acc = (lp.reshape(r, nb, v) + s.scores[:, :, None]).reshape(r, nb * v)
        k = max(2, 1 + sp.stop_ids.shape[1]) * nb
        top_lp, top_idx = jax.lax.top_k(acc, k)                           # [R, k]
        parent, tok = top_idx // v, (top_idx % v).astype(jnp.int32)
        stop_ids = sp.stop_ids.reshape(r, nb, -1)[:, 0]                   # [R, S]
        ends_stop = jnp.any(tok[:, :, None] == stop_ids[:, None, :], axis=-1)
        pos = s.pos.reshape(r, nb)
        at_limit = ((s.step + 1 >= max_new)
                    | (_gather(pos, parent) + 1 >= cfg.max_positions))
        hits = ends_stop | at_limit                                        # [R, k]
        tok_raw_lp = _gather(raw.reshape(r, nb, v), parent)
        tok_raw_lp = jnp.take_along_axis(tok_raw_lp, tok[..., None], axis=-1)[..., 0]
        cand = _gather(s.gen, parent).at[:, :, s.step].set(tok)            # [R, k, W]
        cand_lp = _gather(s.gen_lp, parent).at[:, :, s.step].set(tok_raw_lp)

        # The nb best continuations that did not end keep running.
        run_lp = top_lp + hits * MASK
        run_scores, nxt = jax.lax.top_k(run_lp, nb)                        # [R, nb]
        new_parent = _gather(parent, nxt)
        new_tok = _gather(tok, nxt)

        # Finished: only the top nb candidates may enter, with the length penalty.
        did = hits & (jnp.arange(k) < nb)[None, :]
        fin_cand = top_lp / ((s.step + 1.0) ** length_penalty)
        full = jnp.all(s.is_fin, axis=-1, keepdims=True) & (early_stopping is True)
        fin_cand = fin_cand + full * MASK + (~s.unsat)[:, None] * MASK + (~did) * MASK
        merged = jnp.concatenate([s.fin_scores, fin_cand], axis=1)
        fin_scores, pick = jax.lax.top_k(merged, nb)
        fin = _gather(jnp.concatenate([s.fin, cand], 1), pick)
        fin_lp = _gather(jnp.concatenate([s.fin_lp, cand_lp], 1), pick)
        fin_len = _gather(jnp.concatenate([s.fin_len, jnp.full((r, k), s.step + 1)], 1), pick)
        fin_stop = _gather(jnp.concatenate([s.fin_stop, ends_stop], 1), pick)
        is_fin = _gather(jnp.concatenate([s.is_fin, did], 1), pick)

        # Reorder the running beams' rows (cache, history) to follow their parents.
        flat = (new_parent + jnp.arange(r)[:, None] * nb).reshape(-1)
        cache = s.cache.take_rows(flat)
        new_pos = s.pos[flat]
        tok_flat = new_tok.reshape(-1)
        rows = jnp.arange(rb)
        hist = s.hist[flat].at[rows, new_pos].set(tok_flat, mode="drop")
        seen, counts = s.seen[flat], s.counts[flat]
        if feat.processors:
            seen = seen.at[rows, tok_flat].set(True)
            counts = counts.at[rows, tok_flat].add(1)
        gen = _gather(cand, nxt)
        gen_lp = _gather(cand_lp, nxt)

        # HF's early-stop heuristic and loop condition.
        step = s.step + 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = jnp.float32(max_new)
        else:
            best_len = step.astype(jnp.float32)
        best = run_scores[:, 0] / best_len ** length_penalty
        worst = jnp.where(is_fin, jnp.min(fin_scores, axis=-1, keepdims=True), MASK)
        unsat = s.unsat & jnp.any(best[:, None] > worst, axis=-1)
        open_beam = ~(jnp.all(is_fin) & (early_stopping is True))
        go_on = jnp.any(unsat & live) & open_beam & ~jnp.all(hits | ~live[:, None])

        logits, cache = self.engine.step_logits(params, tok_flat[:, None], new_pos[:, None],
                                                cache)
        return BeamState(cache=cache, logits=logits[:, 0], hist=hist, seen=seen, counts=counts,
                         pos=new_pos + 1, gen=gen, gen_lp=gen_lp, scores=run_scores, fin=fin,
                         fin_lp=fin_lp, fin_len=fin_len, fin_stop=fin_stop,
                         fin_scores=fin_scores, is_fin=is_fin, unsat=unsat, go_on=go_on,
                         step=step)

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
        zeros = jnp.zeros((r, num_beams, width), jnp.int32)
        init = BeamState(
            cache=cache, logits=logits, hist=hist, seen=seen,
            counts=jnp.zeros((rb, vocab), jnp.int32), pos=pos, gen=zeros,
            gen_lp=zeros.astype(jnp.float32),
            scores=jnp.zeros((r, num_beams)).at[:, 1:].set(MASK), fin=zeros,
            fin_lp=zeros.astype(jnp.float32), fin_len=jnp.zeros((r, num_beams), jnp.int32),
            fin_stop=jnp.zeros((r, num_beams), bool),
            fin_scores=jnp.full((r, num_beams), MASK), is_fin=jnp.zeros((r, num_beams), bool),
            unsat=jnp.ones((r,), bool), go_on=jnp.asarray(max_new > 0),
            step=jnp.zeros((), jnp.int32))
        body = functools.partial(self._step, params, sp=sp, live=live, num_beams=num_beams,
                                 max_new=max_new, early_stopping=early_stopping,
                                 length_penalty=length_penalty, feat=feat)
        return jax.lax.while_loop(lambda s: s.go_on & (s.step < max_new), body, init)
