"""HuggingFace Llama (`model_type: llama`) -> canonical params.

Llama: RMSNorm, SwiGLU MLP (silu(x @ gate) * (x @ up)), rotate-half rotary on
whole heads with base `rope_theta`, grouped-query attention
(`num_key_value_heads` from 1 to `num_attention_heads`), `head_dim` possibly
different from hidden_size / heads, optional `attention_bias` (q/k/v/o) and
`mlp_bias` (gate/up/down). Projections are torch Linear, `[out, in]`.
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, plain_rope, token_ids
from converters.transforms import linear_in_heads, linear_out_heads, transpose
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, linear, norm, require_value


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings"])
    act = hf_activation(hf, "hidden_act", where, "silu")
    # pretraining_tp > 1 splits the projections into slices (transformers 4.x).
    require_value(hf, "pretraining_tp", [1, None], where, 1)
    attn_bias = require_value(hf, "attention_bias", [False, True], where, False)
    mlp_bias = require_value(hf, "mlp_bias", [False, True], where, False)
    theta, pct = plain_rope(hf, where, pct_keys=("partial_rotary_factor",))
    if pct != 1.0:
        raise CheckpointError(
            f"{where}: config.json key 'partial_rotary_factor' = {pct} is not supported for "
            "llama (transformers' Llama rotates whole heads); refusing to load with different "
            "numerics")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or n
    if isinstance(kv, bool) or not isinstance(kv, int) or n % kv:
        raise CheckpointError(f"{where}: config.json key 'num_key_value_heads' = {kv!r} must "
                              f"divide num_attention_heads ({n})")
    h = hf.get("head_dim")
    if h is None:
        if d % n:
            raise CheckpointError(f"{where}: hidden_size ({d}) is not a multiple of "
                                  f"num_attention_heads ({n}) and head_dim is not given")
        h = d // n
    elif isinstance(h, bool) or not isinstance(h, int) or h <= 0 or h % 2:
        raise CheckpointError(f"{where}: config.json key 'head_dim' = {h!r} must be a "
                              "positive even int")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=kv, head_dim=h, d_ff=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=act,
        positions="rotary", rotary_dim=None, rope_theta=theta, attn_bias=attn_bias,
        mlp_bias=mlp_bias, glu=True, tied_embeddings=hf.get("tie_word_embeddings", False),
        **token_ids(hf, where))


def rules(cfg: ModelConfig, prefix: str):
    h = prefix + "layers.{i}."
    table = [Rule("embed", prefix + "embed_tokens.weight"),
             *norm("final_norm", prefix + "norm", cfg),
             *norm("layers/ln1", h + "input_layernorm", cfg),
             *norm("layers/ln2", h + "post_attention_layernorm", cfg),
             *linear("layers/attn/o", h + "self_attn.o_proj", linear_out_heads, cfg.attn_bias)]
    for name, kv in (("q", False), ("k", True), ("v", True)):
        heads = linear_in_heads(kv=kv)
        table += linear(f"layers/attn/{name}", h + f"self_attn.{name}_proj", heads,
                        cfg.attn_bias, heads)
    for dst, src in (("wg", "gate_proj"), ("wi", "up_proj"), ("wo", "down_proj")):
        table += linear(f"layers/mlp/{dst}", h + "mlp." + src, transpose, cfg.mlp_bias)
    return table


ARCH = Architecture(
    ("llama",), config_from_hf, rules, prefixes=("model.", ""), embed="embed_tokens.weight",
    # Rotary inverse-frequency buffers older checkpoints carry.
    ignore=(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
            r"(model\.)?rotary_emb\.inv_freq"))
