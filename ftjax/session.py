"""Interactive sessions (FasterTransformer's continue_gen): one conversation, one KV cache.

Each turn prefills only the tokens the cache does not hold yet (what was
appended, plus the previous turn's last generated token, which was sampled but
never fed), then decodes. The result equals running the whole conversation
from scratch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

from ftjax.batching import Request, check_ids
from ftjax.generation import GenerateOutput, Generator
from ftjax.sampling import SamplingParams


class Session:
    """A conversation with a model: `append` tokens, `generate` a reply, repeat.

    Args:
      gen: the model's `ftjax.generation.Generator` (`Model.session()` passes it).
      max_len: the most positions the conversation may use (prompt and replies);
        the KV cache holds this many slots.
    """

    def __init__(self, gen: Generator, max_len: int):
        limit = gen.cfg.max_positions
        if not isinstance(max_len, int) or not 2 <= max_len <= limit:
            raise ValueError(f"session max_len must be an int in [2, {limit}] (the model's "
                             f"max_positions), got {max_len!r}: this model has {limit} "
                             f"positions, so use model.session(max_len={limit}) or less "
                             "(or max_len=None for all)")
        self.gen = gen
        self.max_len = max_len
        self.history: List[int] = []  # every token of the conversation, in order
        self._cached = 0              # how many of them the cache holds
        self._cache = None

    def __len__(self) -> int:
        return len(self.history)

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

        Returns a `GenerateOutput` with one entry.
        """
        sp = sampling or SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise ValueError("session.generate takes one SamplingParams")
        if sp.n != 1 or sp.num_beams != 1:
            raise ValueError("session.generate supports n=1 and num_beams=1 only")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        budget = max_new_tokens if sp.max_new_tokens is None else sp.max_new_tokens
        pending = self.history[self._cached:]
        if not pending:
            raise ValueError("nothing to reply to: append tokens first")
        if len(self.history) + budget > self.max_len:
            raise ValueError(f"session length exceeded: {len(self.history)} tokens + "
                             f"max_new_tokens={budget} > max_len={self.max_len}")
        req = Request(pending, sp, budget)
        seqs, state = self.gen.run_sampling(
            [req], session={"start": self._cached, "max_len": self.max_len,
                            "history": self.history[:self._cached]},
            cache=self._cache)
        reply = seqs[0].tokens[0]
        # The cache now holds the pending tokens and every reply token but the last
        # (a token is fed the step after it is sampled).
        self._cached = len(self.history) + max(len(reply) - 1, 0)
        self.history += reply
        self._cache = state.cache
        return self.gen.output([req], seqs)
