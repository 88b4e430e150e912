"""HuggingFace GPTBigCode (`model_type: gpt_bigcode`; SantaCoder, StarCoder) -> canonical params.

GPT-2's block with `nn.Linear` weights (`[out, in]`, not Conv1D) and one fused
`c_attn` whose output axis depends on `multi_query`:
  - True (MQA, one KV head): `[q (N*H) | k (H) | v (H)]`, three contiguous blocks;
  - False (MHA): per head, `[N, 3, H]` (HF views the output as `[N, 3*H]` and
    splits each head's slice into q, k, v).
Both are de-interleaved here into q `[D, N, H]`, k/v `[D, K, H]`.
"""

from __future__ import annotations

import dataclasses

from ftjax.config import ModelConfig
from converters import hf_gpt2
from converters.hf_common import Architecture
from converters.transforms import fused_per_head, linear_out_heads, transpose
from converters.rules import require_value


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """GPT-2's config keys and checks, plus `multi_query` (one KV head)."""
    mqa = require_value(hf, "multi_query", [True, False], where, True)
    cfg = hf_gpt2.config_from_hf(hf, where, default_activation="gelu_pytorch_tanh")
    return dataclasses.replace(cfg, n_kv_heads=1 if mqa else cfg.n_heads)


def _qkv(part: int):
    """Fused c_attn weight `[(N + 2K)*H, D]` (or bias) -> q `[D, N, H]` / k, v `[D, K, H]`."""
    def f(x, cfg: ModelConfig):
        n, k, h, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        out = (n + 2 * k) * h
        want = (out, d) if x.ndim == 2 else (out,)
        if tuple(x.shape) != want:
            # apply_rules reports it as a CheckpointError naming the tensor.
            raise ValueError(f"expected shape {want} ({n} query heads, {k} kv heads of {h})")
        if k == n:                                      # MHA: per head [q | k | v]
            return fused_per_head(part)(x, cfg)
        y = x.T if x.ndim == 2 else x[None]             # [D or 1, out]
        start = (0, n * h, (n + k) * h)[part]           # MQA: [q (N*H) | k (K*H) | v (K*H)]
        heads = n if part == 0 else k
        y = y[:, start:start + heads * h].reshape(y.shape[0], heads, h)
        return y if x.ndim == 2 else y[0]
    return f


def rules(cfg: ModelConfig, prefix: str):
    # GPT-2's key names, with nn.Linear ([out, in]) weights instead of Conv1D.
    return hf_gpt2.layout_rules(cfg, prefix, _qkv, linear_out_heads, transpose)


ARCH = Architecture(
    ("gpt_bigcode",), config_from_hf, rules,
    # The causal-mask buffers older checkpoints may carry (never weights).
    ignore=(r"(transformer\.)?bias", r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"))
