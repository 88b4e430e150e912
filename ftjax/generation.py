"""Runs validated requests through the engine: greedy / sampled batches and beams.

This is the host side of one `generate` call: it builds the
batch (`ftjax.batching`), drives the engine's jitted prefill and decode, checks stop
strings between decode chunks, and turns device state into per-request outputs. It
uses only the engine's public methods and never writes device state itself.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import jax.numpy as jnp
import numpy as np

from ftjax import batching, buckets, sharding
from ftjax.batching import Request, Sequences
from ftjax.beam import BeamSearch
from ftjax.engine import DECODE_CHUNK, Engine


@dataclasses.dataclass
class GenerateOutput:
    """Result of `Model.generate`, one entry per prompt, in prompt order.

    A request with n > 1 samples (or beams returning n > 1 sequences) has a list
    of n values in every per-request field below instead of one value.

    Attributes:
      tokens: generated token ids (the prompt excluded; a stop token that ended
        the request is included, as HuggingFace `generate` does).
      finish_reasons: "stop" (a stop token, sequence or string) or "length" (the
        max_new_tokens budget or the model's positions ran out).
      log_probs: log-probability of each generated token under the model's
        unmodified distribution (before penalties, temperature, top-k / top-p).
      texts: the decoded continuations when the model has a tokenizer, else None.
      cum_log_probs: the sum of log_probs (FasterTransformer's cum_log_probs); for
        beam search, the beam's length-penalized score (HF's sequences_scores).
      top_logprobs: for requests with logprobs=N: per generated token a dict
        {token: log-prob} of the chosen token and the N most likely (else None).
      prompt_logprobs: for requests with prompt_logprobs=N: per prompt token a
        dict {token: log-prob} of that token and the N most likely given the
        tokens before it (None for the first token and soft-prompt rows).
    """

    tokens: List
    finish_reasons: List
    log_probs: List
    texts: Optional[List] = None
    cum_log_probs: Optional[List] = None
    top_logprobs: Optional[List] = None
    prompt_logprobs: Optional[List] = None


@dataclasses.dataclass
class StreamEvent:
    """One generated token of request `index` (sample `sample` when n > 1).

    `text` is its newly decoded text, if a tokenizer exists; `finish_reason` is
    set on a sequence's last event.
    """

    index: int
    token: int
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    sample: int = 0


class Generator:
    """Generation over one engine and one set of (placed) params.

    Args:
      engine: the `ftjax.engine.Engine`.
      params: the params the engine's functions take (placed, layers stacked or split).
      tokenizer: the model's tokenizer or None (stop strings and texts need one).
    """

    def __init__(self, engine: Engine, params, tokenizer=None):
        self.engine = engine
        self.params = params
        self.tokenizer = tokenizer
        self.beams = BeamSearch(engine)

    @property
    def cfg(self):
        return self.engine.cfg

    def generate(self, reqs: List[Request]) -> List[Sequences]:
        """Every request's sequences; beam requests run grouped by their beam options."""
        results: List[Optional[Sequences]] = [None] * len(reqs)
        groups: dict = {}
        for i, r in enumerate(reqs):
            sp = r.sp
            key = None if sp.num_beams == 1 else (sp.num_beams, sp.length_penalty,
                                                  sp.early_stopping, r.max_new)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            group = [reqs[i] for i in idx]
            done = self.run_sampling(group)[0] if key is None else self.run_beams(group)
            for i, seqs in zip(idx, done):
                results[i] = seqs
        return results

    def run_sampling(self, reqs: List[Request]):
        """Prefill + decode of sampled / greedy requests.

        Returns:
          (Sequences per request, the final decode state)
        """
        batch = batching.build(reqs, [r.sp.n for r in reqs], self.cfg, DECODE_CHUNK,
                               layout=self.engine.layout)
        state, prompt_lp = self.engine.prefill(
            self.params, **batch.prefill_args, sp=batch.sp,
            max_len=batch.max_len, width=batch.width, feat=batch.feat)
        stops = batching.StopStrings(batch, reqs, self.tokenizer)
        if stops:
            # Text is only known on the host: decode chunk by chunk and check between chunks.
            state = self._check_stops(stops, state)
            while stops.running(state) and int(state.step) < batch.width:
                state = self.engine.decode_chunk(self.params, state, batch.sp,
                                                 feat=batch.feat, chunk=DECODE_CHUNK)
                state = self._check_stops(stops, state)
        else:
            state = self.engine.decode(self.params, state, batch.sp, feat=batch.feat,
                                       chunk=DECODE_CHUNK)
        return batching.collect(batch, reqs, state, prompt_lp, stops.cut), state

    def _check_stops(self, stops: batching.StopStrings, state):
        hits = stops.check(state)
        if not hits:
            return state
        mask = np.zeros(state.finish.shape, bool)
        mask[hits] = True
        return self.engine.stop_rows(state, mask)

    def run_beams(self, reqs: List[Request]) -> List[Sequences]:
        sp0 = reqs[0].sp
        for r in reqs:
            if r.sp.stop_strings or r.sp.stop_sequences or r.sp.logprobs or (
                    r.sp.prompt_logprobs is not None):
                raise ValueError("num_beams > 1 does not support stop_strings, stop_sequences, "
                                 "logprobs or prompt_logprobs")
        layout = self.engine.layout
        nb, rpad = sp0.num_beams, buckets.next_pow2(len(reqs))
        if layout is not None:
            rpad = layout.batch_size(rpad)
        batch = batching.build(reqs, [nb] * len(reqs), self.cfg, 1, batch_size=rpad * nb,
                               layout=layout)
        live = jnp.arange(rpad) < len(reqs)
        st = self.beams.run(self.params, **batch.prefill_args, sp=batch.sp, live=live,
                            num_beams=nb, max_new=reqs[0].max_new,
                            early_stopping=sp0.early_stopping,
                            length_penalty=float(sp0.length_penalty), max_len=batch.max_len,
                            width=batch.width, feat=batch.feat)
        fin, fin_lp, fin_len, fin_stop, scores = sharding.fetch(
            (st.groups.fin, st.groups.fin_lp, st.groups.fin_len, st.groups.fin_stop,
             st.groups.fin_scores))
        out = []
        for i, r in enumerate(reqs):
            keep = range(r.sp.n)
            out.append(Sequences(
                tokens=[fin[i, j, :fin_len[i, j]].tolist() for j in keep],
                finish_reasons=["stop" if fin_stop[i, j] else "length" for j in keep],
                log_probs=[fin_lp[i, j, :fin_len[i, j]].tolist() for j in keep],
                cum_log_probs=[float(scores[i, j]) for j in keep]))
        return out

    def output(self, reqs: List[Request], results: List[Sequences]) -> GenerateOutput:
        def pick(r, values):
            return values if r.sp.n > 1 else values[0]

        texts = None
        if self.tokenizer is not None:
            texts = [pick(r, [self.tokenizer.decode(t) for t in s.tokens])
                     for r, s in zip(reqs, results)]
        tops = [s.top_logprobs for s in results]
        return GenerateOutput(
            tokens=[pick(r, s.tokens) for r, s in zip(reqs, results)],
            finish_reasons=[pick(r, s.finish_reasons) for r, s in zip(reqs, results)],
            log_probs=[pick(r, s.log_probs) for r, s in zip(reqs, results)],
            texts=texts,
            cum_log_probs=[pick(r, s.cum_log_probs) for r, s in zip(reqs, results)],
            top_logprobs=None if all(t is None for t in tops) else
            [None if t is None else pick(r, t) for r, t in zip(reqs, tops)],
            prompt_logprobs=None if all(s.prompt_logprobs is None for s in results) else
            [s.prompt_logprobs for s in results])
