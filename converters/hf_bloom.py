"""HuggingFace BLOOM (`model_type: bloom`) -> canonical params.

BLOOM has no position table: attention adds ALiBi biases (`positions="alibi"`),
and a LayerNorm follows the token embedding (`word_embeddings_layernorm`,
`embed_norm`). `query_key_value` is one `nn.Linear` whose output axis is laid out
per head, `[N, 3, H]` (q, k, v interleaved head by head), as GPT-NeoX's: the
block's key table is the Megatron-style one both share
(`hf_common.megatron_block_rules`), which de-interleaves it.
`apply_residual_connection_post_layernorm` maps to `residual_from_norm`.
The MLP is always `4 * hidden_size` wide with BLOOM's tanh GELU (= gelu_new).
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, megatron_block_rules, token_ids
from converters.rules import Rule, check_keys, norm, require_value


# BLOOM was trained at 2048 tokens; ALiBi has no hard limit, config.json rarely says.
_DEFAULT_MAX_POSITIONS = 2048


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    hf = dict(hf)
    if "n_embed" in hf:  # older BLOOM configs name the width n_embed (HF prefers it)
        hf["hidden_size"] = hf["n_embed"]
    check_keys(hf, where, ["vocab_size", "hidden_size", "n_layer", "n_head"])
    tp = hf.get("pretraining_tp", 1)
    if tp != 1:
        # slow_but_exact splits the output projections into pretraining_tp slices.
        require_value(hf, "slow_but_exact", [False], f"{where} (pretraining_tp={tp})", False)
    residual_from_norm = require_value(
        hf, "apply_residual_connection_post_layernorm", [True, False], where, False)
    d, n = hf["hidden_size"], hf["n_head"]
    if d % n:
        raise CheckpointError(f"{where}: hidden_size ({d}) is not a multiple of n_head ({n})")
    max_positions = hf.get("seq_length") or _DEFAULT_MAX_POSITIONS
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=n,
        n_kv_heads=n, head_dim=d // n, d_ff=4 * d, max_positions=max_positions,
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_new",
        positions="alibi", attn_bias=True, mlp_bias=True,
        residual_from_norm=bool(residual_from_norm), embed_norm=True, final_norm=True,
        tied_embeddings=hf.get("tie_word_embeddings", True), **token_ids(hf, where))


def rules(cfg: ModelConfig, prefix: str):
    table = [Rule("embed", prefix + "word_embeddings.weight"),
             *norm("embed_norm", prefix + "word_embeddings_layernorm", cfg),
             *norm("final_norm", prefix + "ln_f", cfg),
             *megatron_block_rules(cfg, prefix + "h.{i}.", "self_attention.")]
    return table


ARCH = Architecture(("bloom",), config_from_hf, rules, embed="word_embeddings.weight")
