"""Checkpoint converters: every supported format -> (ModelConfig, canonical params).

Canonical params (numpy leaves here; `ftjax.load` places them on devices):
attention unfused with heads explicit (q `[D, N, H]`, k/v `[D, K, H]`,
o `[N, H, D]`), MLP `wi [D, F]`, `wo [F, D]`, block weights stacked on a leading
layers axis. Fused layouts are de-interleaved here, once, at load.
"""

from __future__ import annotations

import os

from converters.hf import ARCHITECTURES, load_hf
from converters.native import is_native, load_native, save_native
from converters.orbax_ckpt import is_orbax, load_orbax, save_orbax


def load_checkpoint(path: str, megatron_args: dict | None = None):
    """(ModelConfig, params) from an ftjax (orbax or native), HuggingFace, Megatron-LM,
    NeMo or FasterTransformer c-model checkpoint (detected by its files).

    Args:
      path: the checkpoint directory (or a `.nemo` archive).
      megatron_args: Megatron argument values for Megatron checkpoints saved without
        args, and "vocab_size" (see `converters.megatron.load_megatron`).
    """
    from converters import fastertransformer, megatron, nemo

    if megatron_args and not megatron.is_megatron(path):
        raise ValueError(f"{path}: megatron_args given but this is not a Megatron-LM "
                         "checkpoint directory")
    if os.path.isdir(path) and is_orbax(path):
        cfg, params, _ = load_orbax(path)
        return cfg, params
    if os.path.isdir(path) and is_native(path):
        cfg, params, _ = load_native(path)
        return cfg, params
    if nemo.is_nemo(path):
        return nemo.load_nemo(path)
    if megatron.is_megatron(path):
        return megatron.load_megatron(path, megatron_args)
    if fastertransformer.is_fastertransformer(path):
        return fastertransformer.load_fastertransformer(path)
    return load_hf(path)


def tokenizer_dir(path: str):
    """The directory holding the checkpoint's tokenizer files (a `.nemo` archive's are
    extracted to a temporary directory), or None."""
    from converters import nemo

    if nemo.is_nemo(path):
        return nemo.tokenizer_dir(path)
    return path if os.path.isdir(path) else None


__all__ = ["ARCHITECTURES", "load_checkpoint", "load_hf", "load_native", "load_orbax",
           "save_native", "save_orbax", "tokenizer_dir"]
