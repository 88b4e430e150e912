"""FasterTransformer GPT c-model directories: read and write.

The layout FasterTransformer's `examples/pytorch/gpt/utils/huggingface_gpt_convert.py`
writes and its ParallelGpt loads: `config.ini` with a `[gpt]` section (head_num,
size_per_head, inter_size, max_pos_seq_len, num_layer, vocab_size, start_id, end_id,
weight_data_type fp32|fp16, tensor_para_size) and one headerless little-endian
`.bin` per tensor, GPT-2 Conv1D layout `[in, out]`. Tensors split over TP ranks
carry the rank `R` in their name:

  model.wte.bin [V, D]   model.wpe.bin [P, D]   model.final_layernorm.{weight,bias}.bin [D]
  model.lm_head.weight.bin [V, D] (only when untied)
  model.layers.N.input_layernorm.{weight,bias}.bin            [D]
  model.layers.N.attention.query_key_value.weight.R.bin       [D, 3, D/tp]
  model.layers.N.attention.query_key_value.bias.R.bin         [3, D/tp]
  model.layers.N.attention.dense.weight.R.bin                 [D/tp, D]
  model.layers.N.attention.dense.bias.bin                     [D]
  model.layers.N.post_attention_layernorm.{weight,bias}.bin   [D]
  model.layers.N.mlp.dense_h_to_4h.{weight,bias}.R.bin        [D, F/tp], [F/tp]
  model.layers.N.mlp.dense_4h_to_h.weight.R.bin               [F/tp, D]
  model.layers.N.mlp.dense_4h_to_h.bias.bin                   [D]

Reading merges the ranks into HuggingFace GPT-2 tensors and reuses GPT-2's key table
(`converters.hf_gpt2`); writing runs GPT-2's exporter (`converters.hf_export`) and
splits. FT's "Gelu" is the tanh approximation (ftjax "gelu_new"). The converter
script writes no layernorm epsilon; without `layernorm_eps` in config.ini, GPT-2's
1e-5 is used (the epsilon the weights were trained with).
"""

from __future__ import annotations

import configparser
import os
import re

import numpy as np

from converters import hf_gpt2
from converters.activations import FT as FT_ACTIVATIONS
from converters.hf_export import hf_gpt2_config, hf_gpt2_layout, hf_gpt2_tensors
from converters.native import copy_tokenizer
from converters.rules import apply_rules, supported
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from ftjax.specs import shapes as param_shapes

CONFIG = "config.ini"
_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# config.ini variant keys that change the math: the values FT's plain GPT has.
_DEFAULTS = {"layernorm_type": "pre_layernorm", "has_positional_encoding": "true",
             "has_pre_decoder_layernorm": "false", "has_post_decoder_layernorm": "true",
             "use_attention_linear_bias": "false", "has_adapters": "false", "int8_mode": "0"}
# Keys that name the model's shape, ids or storage (read above), or only runtime settings.
_KNOWN = {"model_name", "head_num", "size_per_head", "inter_size", "max_pos_seq_len",
          "num_layer", "vocab_size", "start_id", "end_id", "weight_data_type",
          "tensor_para_size", "pipeline_para_size", "layernorm_eps", "activation_type",
          "sparse", "prompt_learning_type", "prompt_learning_start_id", "num_tasks"}
# FT layer tensor -> HF GPT-2 name. Shapes and TP split axes are GPT-2's
# (`hf_export.hf_gpt2_layout`, from the spec table), but for the fused qkv, which FT
# stores as `[.., 3, D]` and splits along D (`_ft_layout`).
_LAYER = {
    "input_layernorm.weight": "ln_1.weight", "input_layernorm.bias": "ln_1.bias",
    "attention.query_key_value.weight": "attn.c_attn.weight",
    "attention.query_key_value.bias": "attn.c_attn.bias",
    "attention.dense.weight": "attn.c_proj.weight", "attention.dense.bias": "attn.c_proj.bias",
    "post_attention_layernorm.weight": "ln_2.weight",
    "post_attention_layernorm.bias": "ln_2.bias",
    "mlp.dense_h_to_4h.weight": "mlp.c_fc.weight", "mlp.dense_h_to_4h.bias": "mlp.c_fc.bias",
    "mlp.dense_4h_to_h.weight": "mlp.c_proj.weight", "mlp.dense_4h_to_h.bias": "mlp.c_proj.bias",
}
_GLOBAL = {"wte": "wte.weight", "wpe": "wpe.weight",
           "final_layernorm.weight": "ln_f.weight", "final_layernorm.bias": "ln_f.bias",
           "lm_head.weight": "lm_head.weight"}


def _ft_layout(layout: dict, hf_key: str, tp: int):
    """(shape on one of `tp` ranks, split axis or None) of the FT tensor of GPT-2's `hf_key`."""
    shape, axis = layout[hf_key]
    if hf_key.endswith(("c_attn.weight", "c_attn.bias")):
        shape, axis = shape[:-1] + (3, shape[-1] // 3), len(shape)
    if axis is not None:
        shape = shape[:axis] + (shape[axis] // tp,) + shape[axis + 1:]
    return shape, axis


def is_fastertransformer(directory: str) -> bool:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        return False
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return True  # let the loader report the broken file
    return parser.has_section("gpt")


def _read_config(directory: str):
    path = os.path.join(directory, CONFIG)
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as e:
        raise CheckpointError(f"{path}: not a readable config.ini ({e})") from e
    if not parser.has_section("gpt"):
        raise CheckpointError(f"{path}: no [gpt] section")
    sec = dict(parser["gpt"])

    def integer(key, default=None):
        if key not in sec:
            if default is not None:
                return default
            raise CheckpointError(f"{path}: [gpt] lacks required key {key!r}")
        try:
            value = int(sec[key])
        except ValueError as e:
            raise CheckpointError(f"{path}: [gpt] {key} = {sec[key]!r} is not an int") from e
        low = 0 if key in ("start_id", "end_id", "tensor_para_size") else 1
        if value < low:
            raise CheckpointError(f"{path}: [gpt] {key} = {value} is out of range (must be "
                                  f">= {low})")
        return value

    unknown = sorted(set(sec) - _KNOWN - set(_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{path}: [gpt] keys this converter does not know (they may "
                              f"change the model's math; refusing to guess): {unknown}")
    for key, want in _DEFAULTS.items():
        supported(sec.get(key, want).strip().lower(), (want,), f"[gpt] {key}", path)
    act = supported(sec.get("activation_type", "gelu").strip().lower(), FT_ACTIVATIONS,
                    "[gpt] activation_type", path)
    dtype = supported(sec.get("weight_data_type", "fp32").strip().lower(), _DTYPES,
                      "[gpt] weight_data_type", path)
    n, h = integer("head_num"), integer("size_per_head")
    try:
        eps = float(sec.get("layernorm_eps", 1e-5))
    except ValueError as e:
        raise CheckpointError(f"{path}: [gpt] layernorm_eps = {sec['layernorm_eps']!r} is not "
                              "a number") from e
    hf = {"n_head": n, "n_embd": n * h, "n_inner": integer("inter_size"),
          "n_positions": integer("max_pos_seq_len"), "n_layer": integer("num_layer"),
          "vocab_size": integer("vocab_size"), "activation_function": FT_ACTIVATIONS[act],
          "layer_norm_epsilon": eps}
    for src, dst in (("start_id", "bos_token_id"), ("end_id", "eos_token_id")):
        if src in sec:
            hf[dst] = integer(src)
    return path, hf, _DTYPES[dtype], integer("tensor_para_size", 0)


def _detect_tp(directory: str, where: str) -> int:
    ranks = set()
    pat = re.compile(r"model\.layers\.0\.attention\.query_key_value\.weight\.(\d+)\.bin")
    for name in os.listdir(directory):
        m = pat.fullmatch(name)
        if m:
            ranks.add(int(m.group(1)))
    if not ranks:
        raise CheckpointError(f"{where}: no model.layers.0.attention.query_key_value.weight.R.bin "
                              "file found")
    return max(ranks) + 1


def _read_bin(path: str, dtype, shape) -> np.ndarray:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: not found")
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size != want:
        raise CheckpointError(f"{path}: {size} bytes, expected {want} for tensor of shape "
                              f"{shape} in {np.dtype(dtype).name} (truncated or another model?)")
    return np.fromfile(path, dtype=dtype).reshape(shape)


def load_fastertransformer(directory: str):
    """Reads a c-model directory. Returns (ModelConfig, params of numpy arrays)."""
    where, hf, dtype, tp = _read_config(directory)
    tp = tp or _detect_tp(directory, where)
    d, f = hf["n_embd"], hf["n_inner"]
    head = os.path.join(directory, "model.lm_head.weight.bin")
    hf["tie_word_embeddings"] = not os.path.exists(head)
    cfg = hf_gpt2.config_from_hf(hf, where)
    if d % tp or f % tp:
        raise CheckpointError(f"{where}: tensor_para_size {tp} does not divide hidden size {d} "
                              f"and inter_size {f}")
    used = set()

    def read(name, shape):
        path = os.path.join(directory, f"model.{name}.bin")
        used.add(os.path.basename(path))
        return _read_bin(path, dtype, shape)

    layout = hf_gpt2_layout(cfg)
    tensors = {}
    for name, hf_name in _GLOBAL.items():
        if hf_name in layout:  # the head only when untied
            tensors[hf_name] = read(name, layout[hf_name][0])
    for i in range(cfg.n_layers):
        for name, hf_name in _LAYER.items():
            key = f"layers.{i}.{name}"
            shape, axis = _ft_layout(layout, "h.{i}." + hf_name, tp)
            if axis is None:
                value = read(key, shape)
            else:
                value = np.concatenate([read(f"{key}.{r}", shape) for r in range(tp)], axis)
            # FT's [.., 3, D] qkv -> GPT-2's c_attn
            tensors[f"h.{i}.{hf_name}"] = value.reshape(layout["h.{i}." + hf_name][0])
    extra = sorted(n for n in os.listdir(directory)
                   if n.startswith("model.") and n.endswith(".bin") and n not in used)
    if extra:
        raise CheckpointError(f"{where}: tensor files this converter does not understand "
                              f"(refusing to drop them): {extra[:8]}")
    params = apply_rules(tensors, hf_gpt2.ARCH.table(cfg, ""), cfg, param_shapes(cfg),
                         where=directory)
    return cfg, params


def save_fastertransformer(directory: str, cfg: ModelConfig, params, tp: int = 1,
                           dtype: str = "float32", source: str | None = None) -> None:
    """Writes a c-model directory (config.ini + .bin per tensor, split over `tp` ranks).

    Args:
      cfg, params: the model (canonical params, numpy or jax leaves).
      tp: tensor parallel size FasterTransformer will run with; must divide the
        hidden size, heads and inter_size.
      dtype: "float32" (fp32) or "float16" (fp16).
      source: a directory whose tokenizer files are copied along, if any.
    Raises:
      ValueError: `cfg` has a feature FT's GPT c-model lacks (message names the field),
        or a bad tp / dtype.
    """
    names = {"float32": "fp32", "float16": "fp16"}
    if dtype not in names:
        raise ValueError(f"dtype must be 'float32' or 'float16' for FasterTransformer, "
                         f"got {dtype!r}")
    if not isinstance(tp, int) or tp < 1 or cfg.n_heads % tp or cfg.d_ff % tp:
        raise ValueError(f"tp must be a positive int dividing n_heads ({cfg.n_heads}) and "
                         f"d_ff ({cfg.d_ff}), got {tp!r}")
    act = {v: k.capitalize() for k, v in FT_ACTIVATIONS.items()}.get(cfg.activation)
    if act is None:
        raise ValueError(f"ModelConfig.activation = {cfg.activation!r} cannot be expressed in "
                         "a FasterTransformer GPT c-model (supported: "
                         f"{sorted(FT_ACTIVATIONS.values())})")
    if len(cfg.eos_token_ids) > 1:
        raise ValueError(f"ModelConfig.eos_token_id = {cfg.eos_token_id!r}: a FasterTransformer "
                         "c-model has one end_id")
    hf = hf_gpt2_config(cfg, dtype)
    np_dtype = np.dtype(dtype)
    tensors = hf_gpt2_tensors(cfg, params, np_dtype)
    os.makedirs(directory, exist_ok=True)

    def write(name, value):
        np.ascontiguousarray(value, np_dtype).tofile(os.path.join(directory, f"model.{name}.bin"))

    for ft_name, hf_name in _GLOBAL.items():
        if "transformer." + hf_name in tensors:
            write(ft_name, tensors["transformer." + hf_name])
    layout = hf_gpt2_layout(cfg)
    for i in range(cfg.n_layers):
        for name, hf_name in _LAYER.items():
            full, axis = _ft_layout(layout, "h.{i}." + hf_name, 1)
            value = tensors[f"transformer.h.{i}.{hf_name}"].reshape(full)
            if axis is None:
                write(f"layers.{i}.{name}", value)
            else:
                for r, part in enumerate(np.split(value, tp, axis=axis)):
                    write(f"layers.{i}.{name}.{r}", part)
    parser = configparser.ConfigParser()
    parser["gpt"] = {
        "model_name": "gpt", "head_num": str(cfg.n_heads), "size_per_head": str(cfg.head_dim),
        "inter_size": str(cfg.d_ff), "max_pos_seq_len": str(cfg.max_positions),
        "num_layer": str(cfg.n_layers), "vocab_size": str(cfg.vocab_size),
        "weight_data_type": names[dtype], "tensor_para_size": str(tp),
        "layernorm_eps": repr(float(cfg.norm_eps)), "activation_type": act,
    }
    for key, value in (("start_id", hf["bos_token_id"]), ("end_id", hf["eos_token_id"])):
        if isinstance(value, int):
            parser["gpt"][key] = str(value)
    with open(os.path.join(directory, CONFIG), "w") as fh:
        parser.write(fh)
    if source and os.path.isdir(source):
        copy_tokenizer(source, directory)

