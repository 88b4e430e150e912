"""Canonical params -> a HuggingFace GPT-2 directory: the inverse of `converters.hf_gpt2`.

Both directions read one key table, `hf_gpt2.ARCH.table`. Each HF tensor is rebuilt by
scattering the canonical params through the import transforms: the transforms
are run on an array of flat indices, which says where every element came from.
The config is checked the same way: the written config.json must read back, via
`hf_gpt2.config_from_hf`, as exactly the given ModelConfig.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from converters import hf_gpt2
from converters.spec_shapes import split_axis, stored_shape
from converters.tensors import write_safetensors
from ftjax.config import ModelConfig
from ftjax.specs import flatten, param_specs, spec_at

_PREFIX = "transformer."


def hf_gpt2_config(cfg: ModelConfig, dtype_name: str = "float32") -> dict:
    """The config.json of `cfg`; ValueError naming the field GPT-2 cannot express."""
    hf = {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads, "n_positions": cfg.max_positions, "n_inner": cfg.d_ff,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": cfg.activation,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": (list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                         else cfg.eos_token_id),
        "tie_word_embeddings": True, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "dtype": dtype_name,
    }
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"ModelConfig.d_model ({cfg.d_model}) is not a multiple of n_heads "
                         f"({cfg.n_heads}); GPT-2 cannot express it")
    back = hf_gpt2.config_from_hf(hf, "config.json")
    for field in cfg.to_dict():
        if getattr(back, field) != getattr(cfg, field):
            raise ValueError(
                f"ModelConfig.{field} = {getattr(cfg, field)!r} cannot be expressed as a "
                f"HuggingFace GPT-2 checkpoint (GPT-2 has {getattr(back, field)!r})")
    return hf


def _export_dtype(leaves) -> np.dtype:
    dtypes = {np.dtype(x.dtype) for x in leaves}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype.name in ("float16", "bfloat16", "float32"):
            return dtype
    return np.dtype(np.float32)


def _scatter(shape, parts, cfg: ModelConfig, dtype) -> np.ndarray:
    """Inverts the import transforms of `parts` [(rule, canonical value)] into one HF tensor."""
    size = math.prod(shape)
    index = np.arange(size).reshape(shape)
    out = np.empty(size, dtype)
    filled = np.zeros(size, bool)
    for rule, value in parts:
        where = np.asarray(rule.transform(index, cfg))
        if where.shape != value.shape:
            raise ValueError(f"{rule.dst}: shape {value.shape}, expected {where.shape}")
        where = where.ravel()
        out[where] = np.asarray(value, dtype).ravel()
        filled[where] = True
    if not filled.all():
        raise ValueError(f"{parts[0][0].src}: the params do not cover the whole HF tensor")
    return out.reshape(shape)


def _groups(cfg: ModelConfig, prefix: str) -> dict:
    """HF key template -> [the rules reading it] (table order kept)."""
    groups: dict = {}
    for rule in hf_gpt2.ARCH.table(cfg, prefix):
        groups.setdefault(rule.src, []).append(rule)
    return groups


def hf_gpt2_layout(cfg: ModelConfig, prefix: str = "") -> dict:
    """{HF GPT-2 key template ("{i}": the layer): (shape, the axis tensor-parallel ranks
    split it along or None)}, from the spec table: Conv1D kernels are `[in, out]`, the
    fused c_attn concatenates q, k, v along out."""
    specs = param_specs(cfg)
    out = {}
    for src, rules in _groups(cfg, prefix).items():
        parts = [spec_at(specs, r.dst) for r in rules]
        leaf = rules[0].dst.rsplit("/", 1)[-1]
        kind = leaf if leaf in ("kernel", "bias") else "table"
        out[src] = (stored_shape(parts, kind, out_first=False),
                    split_axis(parts, kind, out_first=False))
    return out


def hf_gpt2_tensors(cfg: ModelConfig, params, dtype) -> dict:
    """HF GPT-2 state dict (numpy, with the "transformer." prefix) of canonical params."""
    flat = flatten(params)
    layout = hf_gpt2_layout(cfg, _PREFIX)
    tensors = {}
    for src, rules in _groups(cfg, _PREFIX).items():
        layers = range(cfg.n_layers) if "{i}" in src else [None]
        shape = layout[src][0]
        for i in layers:
            values = [np.asarray(flat[r.dst]) if i is None else np.asarray(flat[r.dst][i])
                      for r in rules]
            tensors[src.format(i=i)] = _scatter(shape, list(zip(rules, values)), cfg, dtype)
    return tensors


def save_hf_gpt2(directory: str, cfg: ModelConfig, params) -> None:
    """Writes `config.json` and `model.safetensors` that HF GPT2LMHeadModel and `ftjax.load` read.

    Weights keep the params' dtype when it is float32, float16 or bfloat16 (float32 otherwise).
    Raises:
      ValueError: `cfg` has a feature GPT-2 lacks (the message names the ModelConfig field).
    """
    leaves = list(flatten(params).values())
    dtype = _export_dtype(leaves)
    hf = hf_gpt2_config(cfg, dtype.name)
    tensors = hf_gpt2_tensors(cfg, params, dtype)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors,
                      metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
        f.write("\n")
