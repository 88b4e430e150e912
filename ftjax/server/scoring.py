"""Prompt log-probabilities for `echo` + `logprobs` (lm-evaluation-harness's
`local-completions` loglikelihood requests).

`LLMEngine` returns no prompt log-probs, so a prompt is scored by one teacher-forced
`Model.forward`, run on the engine thread between steps. The prompt is right-padded
to a power-of-two length (causal attention: padding after a position never changes
its logits), so a few shapes compile, not one per prompt length.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from ftjax.buckets import next_pow2

MIN_BUCKET = 16


def prompt_logprobs(engine, ids: List[int], k: int) -> Tuple[List[float], List[Dict[int, float]]]:
    """Log-probs of prompt tokens 1..L-1 given the ones before, and per token the
    token itself and the k most likely (as `{token: log-prob}`).

    Args:
      engine: the `LLMEngine` (its `model` is used).
      ids: the prompt's L token ids (L <= the model's positions).
      k: alternatives per token.
    Returns:
      (L - 1 log-probs, L - 1 dicts).
    """
    model = engine.model
    n = len(ids)
    width = min(next_pow2(n, MIN_BUCKET), model.config.max_positions)
    padded = np.zeros((1, width), np.int32)
    padded[0, :n] = ids
    logits = np.asarray(model.forward(padded)[0, :n - 1], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nxt = np.asarray(ids[1:])
    chosen = logp[np.arange(n - 1), nxt]
    tops = []
    for i in range(n - 1):
        d = {int(nxt[i]): float(chosen[i])}
        if k:
            best = np.argpartition(-logp[i], k - 1)[:k]
            for t in best[np.argsort(-logp[i, best])]:
                d.setdefault(int(t), float(logp[i, t]))
        tops.append(d)
    return [float(x) for x in chosen], tops
