"""ftjax's own checkpoint format, written by `ftjax convert`.

A directory holding:
  ftjax_config.json   the ModelConfig fields, plus {"format": "ftjax", "version": 1, "dtype"}
  params.safetensors  the canonical params, flattened with "/" (e.g. "layers/attn/q/kernel"),
                      already de-interleaved, stacked and cast: loading is a memory map.
  tokenizer files     copied from the source checkpoint, when it had them.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.rules import Rule, apply_rules, flatten_tree
from converters.tensors import read_safetensors, write_safetensors

CONFIG_NAME = "ftjax_config.json"
PARAMS_NAME = "params.safetensors"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def is_native(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, CONFIG_NAME))


def save_native(directory: str, cfg: ModelConfig, params, dtype_name: str, source: str = None):
    os.makedirs(directory, exist_ok=True)
    meta = {"format": "ftjax", "version": FORMAT_VERSION, "dtype": dtype_name,
            "config": cfg.to_dict()}
    write_safetensors(os.path.join(directory, PARAMS_NAME),
                      {k: np.asarray(v) for k, v in flatten_tree(params).items()})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    copy_tokenizer(source, directory)


def copy_tokenizer(source, directory: str):
    """Copies the source checkpoint's tokenizer files (if any) next to the converted params."""
    if not source:
        return
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.exists(path):
            shutil.copy(path, os.path.join(directory, name))


def read_meta(directory: str, fmt: str = "ftjax", version: int = FORMAT_VERSION):
    """Reads and checks ftjax_config.json: returns (the JSON dict, ModelConfig)."""
    where = os.path.join(directory, CONFIG_NAME)
    try:
        with open(where) as f:
            meta = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if meta.get("format") != fmt or meta.get("version") != version:
        raise CheckpointError(
            f"{where}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
            f"{fmt} format version {version}")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad 'config' entry ({e})") from e
    return meta, cfg


def load_native(directory: str):
    """Returns (ModelConfig, params pytree of memory-mapped numpy arrays, stored dtype name)."""
    from ftjax.model import param_shapes

    meta, cfg = read_meta(directory)
    params_path = os.path.join(directory, PARAMS_NAME)
    if not os.path.exists(params_path):
        raise CheckpointError(f"{params_path}: not found")
    tensors = read_safetensors(params_path)
    expected = param_shapes(cfg)
    rules = [Rule(path, path) for path in flatten_tree(expected)]
    params = apply_rules(tensors, rules, cfg, expected, where=params_path)
    return cfg, params, meta.get("dtype", "float32")

