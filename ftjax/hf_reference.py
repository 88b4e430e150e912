"""The HuggingFace torch model that `bench --compare hf` and `eval --compare hf` measure against.

One rule for both commands: a directory HF reads itself (a `config.json` with a
`model_type`) is loaded with `AutoModelForCausalLM`; anything else (an `ftjax convert`
output, a preset's random weights) is exported from the loaded ftjax params as a
HuggingFace GPT-2 checkpoint first (`converters.hf_export`), so the reference always
has the very weights ftjax runs.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

_TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _hf_readable(path) -> bool:
    """True when `path` is a directory whose config.json names an HF model_type."""
    if not path or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def hf_causal_lm(model, dtype: str = "float32"):
    """An HF `AutoModelForCausalLM` (eval mode) with `model`'s weights.

    Args:
      model: an `ftjax.Model` with float weights.
      dtype: the torch dtype of the reference ("float32", "bfloat16", "float16").
    Raises:
      ValueError: a quantized model (there is no HF reference for ftjax's int8 weights),
        an unknown dtype, or a config GPT-2 cannot express when the weights must be
        exported (the message names the field).
    """
    import torch

    from ftjax.hf_compat import import_transformers

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype!r}")
    transformers = import_transformers()
    torch_dtype = getattr(torch, dtype)

    def from_dir(directory):
        return transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype).eval()

    if _hf_readable(model.path):
        return from_dir(model.path)
    if getattr(model, "quant", None) is not None:
        raise ValueError("--compare hf needs float weights (load the float checkpoint "
                         "and quantize at load)")
    import jax

    from converters.hf_export import save_hf_gpt2

    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), model.params)
    with tempfile.TemporaryDirectory(prefix="ftjax-hf-") as directory:
        save_hf_gpt2(directory, model.config, params)
        hf = from_dir(directory)
        # from_pretrained may memory-map the file: materialize before it is deleted
        for p in hf.parameters():
            p.data = p.data.clone()
        return hf
