"""ftjax's own checkpoint format, written by `ftjax convert`.

A directory holding:
  ftjax_config.json   the ModelConfig fields, plus {"format": "ftjax", "version": 1, "dtype"}
                      and, for quantized weights, "quant": {"mode", "group_size"}.
  params.safetensors  the canonical params, flattened with "/" (e.g. "layers/attn/q/kernel"),
                      already de-interleaved, stacked and cast: loading is a memory map.
                      A quantized weight is stored as its parts instead of the float
                      tensor: ".../kernel/q" (int8), ".../kernel/scale" (float32) and for
                      W8A8 ".../kernel/smooth" and ".../kernel/act_scale" (see ftjax.quant).
  tokenizer files     copied from the source checkpoint, when it had them.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np

from converters.rules import Rule, apply_rules
from converters.tensors import read_safetensors, write_safetensors
from ftjax import quant
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from ftjax.specs import flatten, shapes as param_shapes, unflatten

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
    mode = quant.mode_of(params)
    if mode is not None:
        groups = [x.group_size for x in jax.tree_util.tree_leaves(params, is_leaf=quant.is_leaf)
                  if isinstance(x, quant.Int8Weight)]
        meta["quant"] = {"mode": mode, "group_size": max(groups, default=0)}
    write_safetensors(os.path.join(directory, PARAMS_NAME),
                      {k: np.asarray(v) for k, v in quant.to_tensors(params).items()})
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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: a JSON {type(meta).__name__}, not an object")
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
    meta, cfg = read_meta(directory)
    params_path = os.path.join(directory, PARAMS_NAME)
    if not os.path.exists(params_path):
        raise CheckpointError(f"{params_path}: not found")
    tensors = read_safetensors(params_path)
    expected = flatten(param_shapes(cfg))
    quantized = _quantized_params(tensors, expected, meta, os.path.join(directory, CONFIG_NAME),
                                  params_path)
    rules = [Rule(path, path) for path in expected if path not in quantized]
    floats = apply_rules(tensors, rules, cfg,
                         {p: v for p, v in expected.items() if p not in quantized},
                         where=params_path)
    params = unflatten({**flatten(floats), **quantized})
    return cfg, params, meta.get("dtype", "float32")


def _quantized_params(tensors: dict, expected: dict, meta: dict, where: str,
                      params_path: str) -> dict:
    """Pops the parts of every quantized weight out of `tensors`: {param path: weight}."""
    q = meta.get("quant")
    if q is None:
        return {}
    if not isinstance(q, dict) or q.get("mode") not in ("int8", "w8a8") and not str(
            q.get("mode", "")).startswith("int8-g"):
        raise CheckpointError(f"{where}: unrecognized 'quant' entry {q!r}")
    group = int(q.get("group_size", 0))
    out = {}
    for path, shape in expected.items():
        table = not path.startswith("layers/")
        try:
            w = quant.from_tensors(tensors, path, shape.shape, 0 if table else group, params_path)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        if w is not None:
            out[path] = w
            for part in ("q", "scale", "smooth", "act_scale"):
                tensors.pop(f"{path}/{part}", None)
    return out

