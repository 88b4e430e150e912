"""The default decoding of `ftjax generate`: the model's HF `generation_config.json`, else ours.

HuggingFace checkpoints say how they are meant to be decoded in `generation_config.json`
(`do_sample`, `temperature`, `top_k`, ...); `ftjax generate` uses it as HF `generate()`
does, with HF's defaults for the fields it leaves out (top_k 50, temperature 1.0, ...).
A model without one is sampled with `FALLBACK` (greedy decoding of a small model loops
on one phrase, so the fallback samples, with a repetition guard). Command-line flags
override the fields they name. No jax import here: `--help` stays fast.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

from ftjax.errors import CheckpointError

FILE = "generation_config.json"

# HF GenerationConfig._get_default_generation_params() for the fields ftjax reads.
HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "min_p": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}

# The decoding of a model without generation_config.json.
FALLBACK = {"temperature": 0.7, "top_k": 50, "top_p": 0.95, "min_p": 0.0,
            "repetition_penalty": 1.2, "no_repeat_ngram_size": 0}

FALLBACK_TEXT = ("temperature 0.7, top-k 50, top-p 0.95, repetition penalty 1.2 "
                 "(a model without generation_config.json)")

_NUMBERS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
            "repetition_penalty": float, "no_repeat_ngram_size": int}


def decoding_defaults(model_dir) -> Tuple[Dict[str, float], str]:
    """SamplingParams keyword arguments for a model directory, and where they came from.

    Args:
      model_dir: a checkpoint directory (or a file path / None: no generation config).
    Returns:
      ({"temperature", "top_k", "top_p", "min_p", "repetition_penalty",
        "no_repeat_ngram_size"[, "max_new_tokens"]}, source) where source is the
      generation_config.json path or "ftjax default".
    Raises:
      CheckpointError: generation_config.json is not a JSON object or a field has the
        wrong type (the message names the file and the field).
    """
    path = os.path.join(model_dir, FILE) if model_dir and os.path.isdir(model_dir) else None
    if path is None or not os.path.exists(path):
        return dict(FALLBACK), "ftjax default"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    merged = {**HF_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    out = {}
    for key, kind in _NUMBERS.items():
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{path}: {key} must be a number, got {value!r}")
        out[key] = kind(value)
    if not merged["do_sample"]:  # HF: greedy (or beams) unless do_sample is true
        out.update(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    new = raw.get("max_new_tokens")
    if isinstance(new, int) and not isinstance(new, bool) and new > 0:
        out["max_new_tokens"] = new
    return out, path
