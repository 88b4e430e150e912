"""The checkpoint's HuggingFace tokenizer, and encoding texts longer than its limit."""

from __future__ import annotations

import os
from typing import List

from ftjax.errors import CheckpointError


def load_tokenizer(path: str):
    """The tokenizer in directory `path`, or None if it holds no tokenizer files."""
    names = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer, GPT2TokenizerFast

    try:
        bare = not any(os.path.exists(os.path.join(path, n))
                       for n in ("tokenizer_config.json", "config.json", "tokenizer.json"))
        if bare and os.path.exists(os.path.join(path, "merges.txt")):
            # A bare GPT-2 BPE pair (Megatron's --vocab-file/--merge-file): nothing tells
            # AutoTokenizer the class.
            return GPT2TokenizerFast(os.path.join(path, "vocab.json"),
                                     os.path.join(path, "merges.txt"))
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from e



def encode_long(tokenizer, text: str) -> List[int]:
    """Token ids of a text longer than the tokenizer's model_max_length, without HF's
    warning: the windows, not the tokenizer, bound what the model sees."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = max(saved, len(text) + 1)
    try:
        return tokenizer.encode(text)
    finally:
        tokenizer.model_max_length = saved
