"""HuggingFace checkpoint directories -> (ModelConfig, canonical numpy params).

Each supported family is one `converters.hf_common.Architecture` (its config reader,
key table, key prefixes and ignorable buffers), in `hf_<family>.ARCH`; one loader
reads them all.
"""

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

ARCHITECTURES = {t: arch for arch in (hf_gpt2.ARCH, hf_opt.ARCH, hf_bloom.ARCH, hf_bigcode.ARCH,
                                      hf_gptj.ARCH, hf_gpt_neox.ARCH, hf_llama.ARCH)
                 for t in arch.model_types}


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
    cfg = arch.config(hf, where)
    tensors = read_checkpoint_tensors(directory)
    # A tensor stored under another name is read under the rules' name.
    aliases = {a: k for a, k in arch.aliases.items() if a in tensors and k not in tensors}
    if aliases:
        tensors = {aliases.get(k, k): v for k, v in tensors.items()}
    prefix = arch.detect_prefix(tensors)
    ignore = list(arch.ignore)
    if cfg.tied_embeddings and arch.head in tensors:
        if not np.array_equal(tensors[arch.head], tensors.get(prefix + arch.embed)):
            raise CheckpointError(
                f"{directory}: tensor {arch.head!r} differs from the token embedding but "
                "config.json says tie_word_embeddings=true")
        ignore += arch.ignore_tied
    params = apply_rules(tensors, arch.table(cfg, prefix), cfg, param_shapes(cfg),
                         ignore=ignore, where=directory)
    return cfg, params
