"""The checkpoint's HuggingFace tokenizer, and encoding texts longer than its limit."""

from __future__ import annotations

from typing import List



def load_tokenizer(path: str):
    """The tokenizer in directory `path`, or None if it holds no tokenizer files.

    `ftjax.hf_compat.load_tokenizer`: a generic fast tokenizer (the bundled model's)
    loads without importing torch, and transformers' no-torch warning is dropped."""
    from ftjax.hf_compat import load_tokenizer as load

    return load(path)


def encode_long(tokenizer, text: str) -> List[int]:
    """Token ids of a text longer than the tokenizer's model_max_length, without HF's
    warning: the windows, not the tokenizer, bound what the model sees."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = max(saved, len(text) + 1)
    try:
        return tokenizer.encode(text)
    finally:
        tokenizer.model_max_length = saved
