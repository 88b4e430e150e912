"""Importing HuggingFace transformers for tokenizers only: quietly and without torch.

ftjax needs transformers for tokenizers (and, in `--compare hf`, for reference
models). Two things about a plain `AutoTokenizer` get in a user's way:
- on a torch-free install, `import transformers` logs "PyTorch was not found. Models
  won't be available ..." although ftjax never asks it for a model;
- with torch installed, `AutoTokenizer` imports torch (through transformers'
  configuration module): seconds of start-up for a tokenizer that does not use it.
`load_tokenizer` reads a `tokenizer.json` whose class is the generic fast tokenizer
(the bundled model's, and what `ftjax convert` copies from it) with
`PreTrainedTokenizerFast` directly, which imports no torch, and leaves every other
tokenizer to `AutoTokenizer`.
"""

from __future__ import annotations

import json
import logging
import os

from ftjax.errors import CheckpointError

_NO_TORCH_MESSAGE = "PyTorch was not found"
# tokenizer_config.json classes that are exactly PreTrainedTokenizerFast over tokenizer.json
# ("TokenizersBackend" is transformers 5's name for it).
_GENERIC_FAST = ("PreTrainedTokenizerFast", "TokenizersBackend")


class _DropNoTorchWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_TORCH_MESSAGE)


def import_transformers():
    """`import transformers` without its "PyTorch was not found" warning (only that one)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _DropNoTorchWarning) for f in logger.filters):
        logger.addFilter(_DropNoTorchWarning())
    import transformers

    return transformers


def _tokenizer_class(path: str):
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config.get("tokenizer_class") if isinstance(config, dict) else None


def load_tokenizer(path: str):
    """The checkpoint directory's HF tokenizer, or None when it has no tokenizer files.

    Raises:
      CheckpointError: tokenizer files are present but unreadable (names the directory).
    """
    names = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    transformers = import_transformers()
    try:
        if (_tokenizer_class(path) in _GENERIC_FAST
                and os.path.exists(os.path.join(path, "tokenizer.json"))):
            return transformers.PreTrainedTokenizerFast.from_pretrained(path)
        bare = not any(os.path.exists(os.path.join(path, n))
                       for n in ("tokenizer_config.json", "config.json", "tokenizer.json"))
        if bare and os.path.exists(os.path.join(path, "merges.txt")):
            # A bare GPT-2 BPE pair (Megatron's --vocab-file/--merge-file): nothing tells
            # AutoTokenizer the class.
            return transformers.GPT2TokenizerFast(os.path.join(path, "vocab.json"),
                                                  os.path.join(path, "merges.txt"))
        return transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from e
