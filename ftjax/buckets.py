"""Shape buckets: batch, prompt and budget sizes rounded so calls reuse compiled code."""

from __future__ import annotations

import dataclasses

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Plan:
    batch: int       # padded batch size
    prompt_len: int  # padded prompt length T
    cache_len: int   # KV cache slots S
    width: int       # generated-token buffer W


def plan(batch: int, longest_prompt: int, max_new: int, max_positions: int,
         chunk: int) -> Plan:
    """Buckets a request. The cache holds prompt + budget, never beyond max_positions."""
    b = next_pow2(batch)
    t = min(next_pow2(longest_prompt, MIN_PROMPT_BUCKET), max_positions)
    new = next_pow2(max_new, MIN_NEW_BUCKET)
    s = min(t + new, max_positions)
    # Decode runs whole chunks; the buffer has room for the chunk that overshoots.
    return Plan(batch=b, prompt_len=t, cache_len=s, width=new + chunk)
