"""`Model.stream`: a batch of requests through the serving engine, token by token.

The requests join the model's `ftjax.LLMEngine` like any other client's; each
engine step's new tokens become `StreamEvent`s (with incrementally decoded text)
as soon as the step returns.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

from ftjax.batching import Request
from ftjax.generation import StreamEvent
from ftjax.serving import LLMEngine


def stream(engine: LLMEngine, reqs: List[Request], tokenizer=None) -> Iterator[StreamEvent]:
    """Yields each token of the validated requests `reqs` as the engine produces it.

    Events of one sequence come in order; `text` is its newly decoded text (held back
    while a multi-byte character is incomplete). Closing the iterator early aborts the
    requests still running.
    """
    if any(r.sp.num_beams > 1 for r in reqs):
        raise ValueError("stream does not support num_beams > 1: beams are only final "
                         "when the search ends; use generate")
    index: Dict[str, int] = {}
    for i, r in enumerate(reqs):
        rid = engine.add_request(r.ids, r.sp, r.max_new, soft_prompt=r.soft)
        index[rid] = i
    shown: Dict[Tuple[str, int], str] = {}
    for o in engine.iterate(list(index)):
        base = len(o.tokens) - len(o.new_tokens)
        for k, tok in enumerate(o.new_tokens):
            last = o.finished and k + 1 == len(o.new_tokens)
            text = None
            if tokenizer is not None:
                full = tokenizer.decode(o.tokens[:base + k + 1])
                seen = shown.get((o.request_id, o.sample), "")
                if full.endswith("\ufffd") and not last:
                    text = ""  # an incomplete multi-byte character: wait for more
                else:
                    text, shown[(o.request_id, o.sample)] = full[len(seen):], full
            yield StreamEvent(index=index[o.request_id], token=int(tok), text=text,
                              finish_reason=o.finish_reason if last else None,
                              sample=o.sample)
