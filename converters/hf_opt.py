"""HuggingFace OPT (`model_type: opt`, OPTForCausalLM) -> canonical params.

OPT stores `nn.Linear` weights `[out, in]` with q, k, v unfused. Variants:
pre-LN (`do_layer_norm_before`, most sizes) and post-LN (opt-350m, which also has
no final layer norm), `word_embed_proj_dim != hidden_size` (project_in /
project_out around the stack, opt-350m), `_remove_final_layer_norm` and
`enable_bias`. Learned positions are looked up at `position + 2` (OPT's offset),
so the position table has `max_position_embeddings + 2` rows.

Keys live under "model.decoder." (OPTForCausalLM) or "decoder." (a bare OPTModel).
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, token_ids
from converters.transforms import linear_in_heads, linear_out_heads, transpose
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, linear, norm, require_value


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "hidden_size", "num_hidden_layers",
                           "num_attention_heads", "ffn_dim", "max_position_embeddings"])
    act = hf_activation(hf, "activation_function", where, "relu")
    # Without affine params the norms have no tensors to load; not implemented.
    require_value(hf, "layer_norm_elementwise_affine", [True], where, True)
    pre = require_value(hf, "do_layer_norm_before", [True, False], where, True)
    remove_final = require_value(hf, "_remove_final_layer_norm", [True, False], where, False)
    bias = require_value(hf, "enable_bias", [True, False], where, True)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if d % n:
        raise CheckpointError(
            f"{where}: hidden_size ({d}) is not a multiple of num_attention_heads ({n})")
    e = hf.get("word_embed_proj_dim") or d
    if not isinstance(e, int) or isinstance(e, bool) or e <= 0:
        raise CheckpointError(f"{where}: config.json key 'word_embed_proj_dim' must be a "
                              f"positive int, got {e!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=n, head_dim=d // n, d_ff=hf["ffn_dim"],
        max_positions=hf["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
        activation=act, positions="learned", position_offset=2,
        attn_bias=bias, mlp_bias=bias, norm_position="pre" if pre else "post",
        # HF builds the final norm only for pre-LN models that keep it.
        final_norm=bool(pre and not remove_final), d_embed=None if e == d else e,
        tied_embeddings=hf.get("tie_word_embeddings", True), **token_ids(hf, where))


def rules(cfg: ModelConfig, prefix: str):
    p = prefix + "decoder."
    h = p + "layers.{i}."
    table = [Rule("embed", p + "embed_tokens.weight"),
             Rule("pos_embed", p + "embed_positions.weight"),
             *norm("layers/ln1", h + "self_attn_layer_norm", cfg),
             *norm("layers/ln2", h + "final_layer_norm", cfg),
             *linear("layers/attn/o", h + "self_attn.out_proj", linear_out_heads, cfg.attn_bias),
             *linear("layers/mlp/wi", h + "fc1", transpose, cfg.mlp_bias),
             *linear("layers/mlp/wo", h + "fc2", transpose, cfg.mlp_bias)]
    for name in "qkv":
        table += linear(f"layers/attn/{name}", h + f"self_attn.{name}_proj", linear_in_heads(),
                        cfg.attn_bias, linear_in_heads())
    if cfg.final_norm:
        table += norm("final_norm", p + "final_layer_norm", cfg)
    if cfg.d_embed is not None:
        table += [*linear("project_in", p + "project_in", transpose),
                  *linear("project_out", p + "project_out", transpose)]
    return table


ARCH = Architecture(("opt",), config_from_hf, rules, prefixes=("model.", ""),
                    embed="decoder.embed_tokens.weight")
