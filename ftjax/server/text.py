"""Tokens -> text for the server: incremental decoding with stop strings cut off,
OpenAI's log-prob shapes, and chat templates."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from ftjax.server.protocol import APIError


class Detokenizer:
    """Turns one sequence's growing token list into text deltas.

    The text ends before the first stop string (OpenAI leaves the stop out). While
    unfinished it holds back an incomplete multi-byte character and the last
    len(longest stop) - 1 characters (they may start a stop string), so the
    concatenated deltas of a stream equal the non-streaming text.
    """

    def __init__(self, tokenizer, stops: Optional[Sequence[str]], skip_special: bool = True):
        self.tokenizer = tokenizer
        self.stops = list(stops or ())
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.skip = skip_special
        self.shown = 0

    def text(self, tokens: List[int]) -> str:
        full = self.tokenizer.decode(tokens, skip_special_tokens=self.skip)
        cut = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        return full[:min(cut)] if cut else full

    def delta(self, tokens: List[int], finished: bool) -> str:
        full = self.text(tokens)
        end = len(full)
        if not finished:
            end -= self.hold
            while end > self.shown and full[end - 1] == "\ufffd":
                end -= 1
        if end <= self.shown:
            return ""
        out, self.shown = full[self.shown:end], end
        return out


def token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok])


def completion_logprobs(tokenizer, tokens: List[int], lps: List[Optional[float]],
                        tops: List[Optional[Dict[int, float]]], offset: int = 0) -> dict:
    """OpenAI completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset
    (character offsets from `offset`, the length of the text before these tokens)."""
    texts = [token_text(tokenizer, t) for t in tokens]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": texts, "token_logprobs": lps,
            "top_logprobs": [None if d is None else
                             {token_text(tokenizer, t): lp for t, lp in d.items()} for d in tops],
            "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: List[int], lps: List[float],
                  tops: List[Dict[int, float]], n: int) -> List[dict]:
    """Chat completions `logprobs.content`: per token its text, log-prob, bytes and the
    n most likely alternatives."""
    def entry(t, lp):
        s = token_text(tokenizer, t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    out = []
    for t, lp, d in zip(tokens, lps, tops):
        alts = sorted(d.items(), key=lambda kv: -kv[1])[:n] if d else []
        out.append(dict(entry(t, lp), top_logprobs=[entry(a, v) for a, v in alts]))
    return out


def render_chat(tokenizer, messages: List[dict], template: Optional[str],
                add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation through the chat template (`template`, the
    server's --chat-template, overrides the tokenizer's).

    Raises:
      APIError: 400 when there is no template, or rendering it fails.
    """
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot serve chat "
                       "completions; use /v1/completions with token ids", "messages")
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model's tokenizer has no chat template; start the server "
                       "with --chat-template FILE (a Jinja template) to serve chat "
                       "completions, or use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a template error is the request's (or the template's) fault
        raise APIError(400, f"the chat template failed on these messages: {e}",
                       "messages") from None
