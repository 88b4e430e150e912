"""HuggingFace GPT-NeoX / Pythia (`model_type: gpt_neox`) -> canonical params.

GPT-NeoX: rotary (rotate-half, as the model) on the first
`int(head_dim * rotary_pct)` dims of each head; `use_parallel_residual` picks
x + attn(ln1(x)) + mlp(ln2(x)) or the sequential pre-norm block; an untied
output embedding (`embed_out`, which transformers 5.x calls `lm_head` in memory).

`query_key_value` is one torch Linear `[3*N*H, D]` whose output is interleaved
per head: row n*3H + part*H + h is head n's q (part 0), k (1) or v (2) dim h.
It is de-interleaved once, at load, by the Megatron-style block table GPT-NeoX
shares with BLOOM (`hf_common.megatron_block_rules`).
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, megatron_block_rules, plain_rope, token_ids
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, norm, require_value


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "intermediate_size", "max_position_embeddings"])
    act = hf_activation(hf, "hidden_act", where, "gelu")
    parallel = require_value(hf, "use_parallel_residual", [True, False], where, True)
    attn_bias = require_value(hf, "attention_bias", [True, False], where, True)
    theta, pct = plain_rope(hf, where, theta_keys=("rotary_emb_base",),
                            pct_keys=("rotary_pct",), default_pct=0.25)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if d % n:
        raise CheckpointError(f"{where}: hidden_size ({d}) is not a multiple of "
                              f"num_attention_heads ({n})")
    h = d // n
    # HF's rotary reads head_dim when present, its attention never does.
    require_value(hf, "head_dim", [None, h], where, None)
    rd = int(h * pct)
    if not 0 < rd <= h or rd % 2:
        raise CheckpointError(
            f"{where}: config.json key 'rotary_pct' / 'rope_parameters.partial_rotary_factor' "
            f"= {pct} gives {rd} rotary dims of head_dim {h}; an even count in (0, {h}] is needed")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=n, head_dim=h, d_ff=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"], norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5), activation=act,
        positions="rotary", rotary_dim=rd, rope_theta=theta, attn_bias=attn_bias,
        mlp_bias=True, parallel_residual=parallel, shared_norm=False,
        tied_embeddings=hf.get("tie_word_embeddings", False), **token_ids(hf, where))


def rules(cfg: ModelConfig, prefix: str):
    table = [Rule("embed", prefix + "embed_in.weight"),
             *norm("final_norm", prefix + "final_layer_norm", cfg),
             *megatron_block_rules(cfg, prefix + "layers.{i}.", "attention.")]
    return table


ARCH = Architecture(
    ("gpt_neox",), config_from_hf, rules, prefixes=("gpt_neox.", ""), embed="embed_in.weight",
    head="embed_out.weight",
    # Buffers older checkpoints carry (causal mask, rotary inverse frequencies).
    ignore=(r"(gpt_neox\.)?layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",
            r"(gpt_neox\.)?rotary_emb\.inv_freq"),
    ignore_tied=(r"embed_out\.weight",),
    # Checkpoints written with the in-memory name of the head.
    aliases={"lm_head.weight": "embed_out.weight"})
