"""HuggingFace checkpoint directories -> (ModelConfig, canonical numpy params)."""

from __future__ import annotations

import json
import os

import numpy as np

from ftjax.errors import CheckpointError
from converters import (hf_bigcode, hf_bloom, hf_gpt2, hf_gpt_neox, hf_gptj, hf_llama,
                        hf_opt)
from converters.rules import apply_rules
from converters.tensors import read_checkpoint_tensors
from ftjax.specs import shapes as param_shapes

# model_type -> module with config_from_hf, rules, IGNORE, IGNORE_TIED and optionally
# PREFIXES (key prefixes to try, in order; default ("transformer.", "")) and EMBED (the
# token embedding's key after the prefix; default "wte.weight"), HEAD (the untied head's
# key; default "lm_head.weight") and ALIASES ({other name: key the rules read}, for
# checkpoints that store a tensor under another name).
ARCHITECTURES = {"gpt2": hf_gpt2, "opt": hf_opt, "bloom": hf_bloom, "gpt_bigcode": hf_bigcode,
                 "gptj": hf_gptj, "gpt_neox": hf_gpt_neox, "llama": hf_llama}


def detect_prefix(arch, tensors) -> str:
    """The first of the arch's PREFIXES under which its token embedding is stored.

    Checkpoints saved from the bare model lack the head model's prefix ("transformer.",
    OPT's "model."). Without the embedding, the first prefix any key carries, so
    the loader names the missing tensor under the prefix the checkpoint uses.
    """
    prefixes = getattr(arch, "PREFIXES", ("transformer.", ""))
    embed = getattr(arch, "EMBED", "wte.weight")
    for prefix in prefixes:
        if prefix + embed in tensors:
            return prefix
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in tensors):
            return prefix
    return prefixes[-1]


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found (is {directory!r} a checkpoint directory?)") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: a JSON {type(hf).__name__}, not an object of config keys")
    return hf


def load_hf(directory: str):
    """Reads a HuggingFace directory. Returns (ModelConfig, params pytree of numpy arrays)."""
    hf = read_hf_config(directory)
    where = directory
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {sorted(ARCHITECTURES)})")
    arch = ARCHITECTURES[model_type]
    cfg = arch.config_from_hf(hf, where)
    tensors = read_checkpoint_tensors(directory)
    # A tensor stored under another name (ALIASES) is read under the rules' name.
    aliases = {a: k for a, k in getattr(arch, "ALIASES", {}).items()
               if a in tensors and k not in tensors}
    if aliases:
        tensors = {aliases.get(k, k): v for k, v in tensors.items()}
    prefix = detect_prefix(arch, tensors)
    ignore = list(arch.IGNORE)
    head = getattr(arch, "HEAD", "lm_head.weight")
    if cfg.tied_embeddings and head in tensors:
        embed = tensors.get(prefix + getattr(arch, "EMBED", "wte.weight"))
        if not np.array_equal(tensors[head], embed):
            raise CheckpointError(
                f"{directory}: tensor {head!r} differs from the token embedding but "
                "config.json says tie_word_embeddings=true")
        ignore += arch.IGNORE_TIED
    params = apply_rules(tensors, arch.rules(cfg, prefix), cfg, param_shapes(cfg),
                         ignore=ignore, where=directory)
    return cfg, params
