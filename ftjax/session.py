"""Interactive sessions (FasterTransformer's continue_gen): one conversation on the serving engine.

Each turn is one request of `ftjax.LLMEngine` whose prompt is the whole conversation.
The engine keeps the pages of the previous turn (prompt and reply) for the session,
so a turn computes only what was appended, plus the previous reply's last token
(sampled, never fed). The result equals running the whole conversation from scratch.
"""

from __future__ import annotations

import weakref
from typing import List, Optional, Sequence, Union

from ftjax.batching import Request, check_ids
from ftjax.generation import GenerateOutput, Generator
from ftjax.sampling import SamplingParams
from ftjax.serving import LLMEngine, sequences


class Session:
    """A conversation with a model: `append` tokens, `generate` a reply, repeat.

    Args:
      gen: the model's `ftjax.generation.Generator` (its config, tokenizer, outputs).
      engine: the `ftjax.LLMEngine` that runs the turns and keeps the pages between them.
      max_len: the most positions the conversation may use (prompt and replies).

    `close()` (or leaving a `with` block, or dropping the session) frees its pages.
    """

    def __init__(self, gen: Generator, engine: LLMEngine, max_len: int):
        limit = gen.cfg.max_positions
        if not isinstance(max_len, int) or not 2 <= max_len <= limit:
            raise ValueError(f"session max_len must be an int in [2, {limit}] (the model's "
                             f"max_positions), got {max_len!r}: this model has {limit} "
                             f"positions, so use model.session(max_len={limit}) or less "
                             "(or max_len=None for all)")
        self.gen = gen
        self.engine = engine
        self.max_len = max_len
        self.history: List[int] = []  # every token of the conversation, in order
        self.id = engine.open_session()
        self._closed = weakref.finalize(self, _close, engine, self.id)

    def __len__(self) -> int:
        return len(self.history)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Frees the pages the engine keeps for this conversation."""
        self._closed()

    def append(self, ids: Union[str, Sequence[int]]) -> None:
        """Adds user tokens (or text, with a tokenizer) to the conversation."""
        if isinstance(ids, str):
            if self.gen.tokenizer is None:
                raise ValueError("append got text but this model has no tokenizer; pass token ids")
            ids = self.gen.tokenizer.encode(ids)
        ids = check_ids(self.gen.cfg, ids, "session.append ids", self.gen.cfg.max_positions)
        if len(self.history) + len(ids) > self.max_len - 1:
            raise ValueError(f"session length exceeded: {len(self.history)} tokens + "
                             f"{len(ids)} appended leaves no room to generate within "
                             f"max_len={self.max_len}")
        self.history += ids

    def generate(self, max_new_tokens: int = 16,
                 sampling: Optional[SamplingParams] = None) -> GenerateOutput:
        """Generates a reply to the conversation so far; the reply joins the conversation.

        Returns a `GenerateOutput` with one entry (prompt_logprobs, if asked for, cover
        the whole conversation).
        """
        sp = sampling or SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise ValueError("session.generate takes one SamplingParams")
        if sp.n != 1 or sp.num_beams != 1:
            raise ValueError("session.generate supports n=1 and num_beams=1 only")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not self._closed.alive:
            raise ValueError("this session is closed")
        budget = max_new_tokens if sp.max_new_tokens is None else sp.max_new_tokens
        if not self.history:
            raise ValueError("nothing to reply to: append tokens first")
        if len(self.history) + budget > self.max_len:
            raise ValueError(f"session length exceeded: {len(self.history)} tokens + "
                             f"max_new_tokens={budget} > max_len={self.max_len}")
        rid = self.engine.add_request(self.history, sp, budget, session=self.id)
        seq = sequences(list(self.engine.iterate([rid])), 1)
        self.history += seq.tokens[0]
        return self.gen.output([Request(self.history, sp, budget)], [seq])


def _close(engine: LLMEngine, sid: str) -> None:
    try:
        engine.close_session(sid)
    except KeyError:
        pass
