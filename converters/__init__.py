"""Checkpoint converters: every supported format -> (ModelConfig, canonical params).

Canonical params (numpy leaves here; `ftjax.load` places them on devices):
attention unfused with heads explicit (q `[D, N, H]`, k/v `[D, K, H]`,
o `[N, H, D]`), MLP `wi [D, F]`, `wo [F, D]`, block weights stacked on a leading
layers axis. Fused layouts are de-interleaved here, once, at load.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from converters import fastertransformer, megatron, nemo
from converters.hf import ARCHITECTURES, load_hf
from converters.native import is_native, load_native, save_native
from converters.orbax_ckpt import is_orbax, load_orbax, save_orbax
from ftjax.errors import CheckpointError, ModelConfigError


# Format -> the file(s) that mark it, for detection messages.
MARKERS = {"ftjax": "ftjax_config.json", "nemo": "model_config.yaml (or a .nemo archive)",
           "megatron": "latest_checkpointed_iteration.txt or mp_rank_XX/model_optim_rng.pt",
           "fastertransformer": "config.ini with a [gpt] section",
           "huggingface": "config.json"}


def _megatron_marked(path: str) -> bool:
    """Megatron-LM's own files: the iteration pointer, or a rank directory holding its
    weights file (NeMo's rank directories hold model_weights.ckpt instead)."""
    if os.path.isfile(os.path.join(path, megatron.LATEST)):
        return True
    return any(megatron._RANK_DIR.fullmatch(n)
               and os.path.isfile(os.path.join(path, n, megatron.WEIGHTS))
               for n in os.listdir(path))


def detect_format(path: str) -> str:
    """The one checkpoint format whose files `path` holds.

    Returns:
      "ftjax", "nemo", "megatron", "fastertransformer" or "huggingface".
    Raises:
      CheckpointError: the files of two formats are present (naming both: a stray
        Megatron or NeMo file in a HuggingFace directory must not send it down the
        pickle path), or none is (naming what was looked for).
    """
    if os.path.isfile(path):
        if path.endswith(".nemo"):
            return "nemo"
        raise CheckpointError(f"{path}: a file, not a checkpoint directory (or .nemo archive)")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not found")
    found = [name for name, present in (
        ("ftjax", is_native(path)), ("nemo", nemo.is_nemo(path)),
        ("megatron", _megatron_marked(path)),
        ("fastertransformer", fastertransformer.is_fastertransformer(path)),
        ("huggingface", os.path.isfile(os.path.join(path, "config.json")))) if present]
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds the files of {len(found)} checkpoint formats ("
            + "; ".join(f"{f}: {MARKERS[f]}" for f in found)
            + "); refusing to guess which one to read: remove the stray files")
    if not found and any(n.startswith(("model.safetensors", "pytorch_model.bin"))
                         for n in os.listdir(path)):
        return "huggingface"  # HF weights without config.json: load_hf names the file
    if not found:
        raise CheckpointError(
            f"{path}: not a checkpoint directory: none of "
            + "; ".join(f"{f}: {m}" for f, m in MARKERS.items()) + " found")
    return found[0]


def load_checkpoint(path: str, megatron_args: dict | None = None):
    """(ModelConfig, params) from an ftjax (orbax or native), HuggingFace, Megatron-LM,
    NeMo or FasterTransformer c-model checkpoint (detected by its files, see
    `detect_format`).

    Args:
      path: the checkpoint directory (or a `.nemo` archive).
      megatron_args: Megatron argument values for Megatron checkpoints saved without
        args, and "vocab_size" (see `converters.megatron.load_megatron`).
    Raises:
      CheckpointError: unreadable, ambiguous or unsupported (naming file and key); a
        config describing an invalid model (e.g. a negative norm epsilon).
    """
    if megatron_args and not (os.path.isdir(path) and _megatron_marked(path)):
        raise ValueError(f"{path}: megatron_args given but this is not a Megatron-LM "
                         "checkpoint directory")
    fmt = detect_format(path)
    try:
        if fmt == "ftjax":
            cfg, params, _ = (load_orbax if is_orbax(path) else load_native)(path)
            return cfg, params
        if fmt == "nemo":
            return nemo.load_nemo(path)
        if fmt == "megatron":
            return megatron.load_megatron(path, megatron_args)
        if fmt == "fastertransformer":
            return fastertransformer.load_fastertransformer(path)
        return load_hf(path)
    except ModelConfigError as e:
        raise CheckpointError(f"{path}: the checkpoint's config describes an invalid model "
                              f"({e})") from e


def tokenizer_dir(path: str):
    """The directory holding the checkpoint's tokenizer files (a `.nemo` archive's are
    extracted to a new temporary directory the caller removes: prefer
    `tokenizer_files`), or None."""
    if nemo.is_nemo(path):
        return nemo.tokenizer_dir(path)
    return path if os.path.isdir(path) else None


@contextlib.contextmanager
def tokenizer_files(path: str):
    """Context manager: the directory holding the checkpoint's tokenizer files, or
    None; a `.nemo` archive's are extracted for the block only (nothing left in /tmp)."""
    directory = tokenizer_dir(path)
    try:
        yield directory
    finally:
        if directory is not None and directory != path and nemo.is_nemo(path):
            shutil.rmtree(directory, ignore_errors=True)


__all__ = ["ARCHITECTURES", "detect_format", "load_checkpoint", "load_hf", "load_native",
           "load_orbax", "save_native", "save_orbax", "tokenizer_dir", "tokenizer_files"]
