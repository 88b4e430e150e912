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
from converters.hf_common import Architecture, token_id
from converters.transforms import linear_in_heads, linear_out_heads, transpose
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, require_value


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
        tied_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=token_id(hf, "bos_token_id", where),
        eos_token_id=token_id(hf, "eos_token_id", where))


def rules(cfg: ModelConfig, prefix: str):
    p = prefix + "decoder."
    h = p + "layers.{i}."
    table = [
        Rule("embed", p + "embed_tokens.weight"),
        Rule("pos_embed", p + "embed_positions.weight"),
        Rule("layers/ln1/scale", h + "self_attn_layer_norm.weight"),
        Rule("layers/ln1/bias", h + "self_attn_layer_norm.bias"),
        Rule("layers/ln2/scale", h + "final_layer_norm.weight"),
        Rule("layers/ln2/bias", h + "final_layer_norm.bias"),
        Rule("layers/attn/o/kernel", h + "self_attn.out_proj.weight", linear_out_heads),
        Rule("layers/mlp/wi/kernel", h + "fc1.weight", transpose),
        Rule("layers/mlp/wo/kernel", h + "fc2.weight", transpose),
    ]
    for name in "qkv":
        table.append(Rule(f"layers/attn/{name}/kernel", h + f"self_attn.{name}_proj.weight",
                          linear_in_heads()))
        if cfg.attn_bias:
            table.append(Rule(f"layers/attn/{name}/bias", h + f"self_attn.{name}_proj.bias",
                              linear_in_heads()))
    if cfg.attn_bias:
        table.append(Rule("layers/attn/o/bias", h + "self_attn.out_proj.bias"))
    if cfg.mlp_bias:
        table += [Rule("layers/mlp/wi/bias", h + "fc1.bias"),
                  Rule("layers/mlp/wo/bias", h + "fc2.bias")]
    if cfg.final_norm:
        table += [Rule("final_norm/scale", p + "final_layer_norm.weight"),
                  Rule("final_norm/bias", p + "final_layer_norm.bias")]
    if cfg.d_embed is not None:
        table += [Rule("project_in/kernel", p + "project_in.weight", transpose),
                  Rule("project_out/kernel", p + "project_out.weight", transpose)]
    if not cfg.tied_embeddings:
        table.append(Rule("lm_head", "lm_head.weight"))
    return table


ARCH = Architecture(("opt",), config_from_hf, rules, prefixes=("model.", ""),
                    embed="decoder.embed_tokens.weight")
