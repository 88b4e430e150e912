"""HuggingFace checkpoint directories -> (ModelConfig, canonical numpy params)."""

from __future__ import annotations

import json
import os

import numpy as np

from ftjax.errors import CheckpointError
from converters import hf_gpt2
from converters.rules import apply_rules
from converters.tensors import read_checkpoint_tensors

# model_type -> module with config_from_hf, rules, IGNORE, IGNORE_TIED.
ARCHITECTURES = {"gpt2": hf_gpt2}


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found (is {directory!r} a checkpoint directory?)") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def load_hf(directory: str):
    """Reads a HuggingFace directory. Returns (ModelConfig, params pytree of numpy arrays)."""
    from ftjax.model import param_shapes

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
    # Checkpoints saved from the bare model lack the "transformer." prefix.
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    ignore = list(arch.IGNORE)
    if cfg.tied_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors.get(prefix + "wte.weight")):
            raise CheckpointError(
                f"{directory}: tensor 'lm_head.weight' differs from the token embedding but "
                "config.json says tie_word_embeddings=true")
        ignore += arch.IGNORE_TIED
    params = apply_rules(tensors, arch.rules(cfg, prefix), cfg, param_shapes(cfg),
                         ignore=ignore, where=directory)
    return cfg, params
