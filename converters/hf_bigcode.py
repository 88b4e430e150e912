"""HuggingFace GPTBigCode (`model_type: gpt_bigcode`; SantaCoder, StarCoder) -> canonical params.

GPT-2's block with `nn.Linear` weights (`[out, in]`, not Conv1D) and one fused
`c_attn` whose output axis depends on `multi_query`:
  - True (MQA, one KV head): `[q (N*H) | k (H) | v (H)]`, three contiguous blocks;
  - False (MHA): per head, `[N, 3, H]` (HF views the output as `[N, 3*H]` and
    splits each head's slice into q, k, v).
Both are de-interleaved here into q `[D, N, H]`, k/v `[D, K, H]`.
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters import hf_gpt2
from converters.hf_common import token_id
from converters.transforms import fused_per_head, linear_out_heads, transpose
from converters.rules import check_keys, require_value

_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new", "gelu": "gelu",
                "relu": "relu", "silu": "silu", "swish": "silu"}

PREFIXES = ("transformer.", "")
EMBED = "wte.weight"




def config_from_hf(hf: dict, where: str) -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions"])
    act = require_value(hf, "activation_function", list(_ACTIVATIONS), where,
                        "gelu_pytorch_tanh")
    require_value(hf, "scale_attn_weights", [True], where, True)
    require_value(hf, "add_cross_attention", [False], where, False)
    mqa = require_value(hf, "multi_query", [True, False], where, True)
    d, n = hf["n_embd"], hf["n_head"]
    if d % n:
        raise CheckpointError(f"{where}: n_embd ({d}) is not a multiple of n_head ({n})")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=n,
        n_kv_heads=1 if mqa else n, head_dim=d // n, d_ff=hf.get("n_inner") or 4 * d,
        max_positions=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=_ACTIVATIONS[act],
        positions="learned", attn_bias=True, mlp_bias=True,
        tied_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=token_id(hf, "bos_token_id", where),
        eos_token_id=token_id(hf, "eos_token_id", where))


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


# The causal-mask buffers older checkpoints may carry (never weights).
IGNORE = [r"(transformer\.)?bias", r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"]
IGNORE_TIED = [r"lm_head\.weight"]
