"""HuggingFace GPT-2 (`model_type: gpt2`) -> canonical params.

GPT-2 stores projections as Conv1D, `[in, out]`; `c_attn` fuses q, k, v along
the output axis as three contiguous `[D]` blocks, each heads-major.
"""

from __future__ import annotations

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, token_ids
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, linear, norm, require_value


def config_from_hf(hf: dict, where: str, default_activation: str = "gelu_new") -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions"])
    act = hf_activation(hf, "activation_function", where, default_activation)
    require_value(hf, "scale_attn_weights", [True], where, True)
    require_value(hf, "scale_attn_by_inverse_layer_idx", [False], where, False)
    require_value(hf, "add_cross_attention", [False], where, False)
    d, n = hf["n_embd"], hf["n_head"]
    if d % n:
        raise CheckpointError(f"{where}: n_embd ({d}) is not a multiple of n_head ({n})")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=n,
        n_kv_heads=n, head_dim=d // n, d_ff=hf.get("n_inner") or 4 * d,
        max_positions=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=act,
        positions="learned", attn_bias=True, mlp_bias=True,
        tied_embeddings=hf.get("tie_word_embeddings", True), **token_ids(hf, where))


def _qkv(part: int):
    def f(x, cfg: ModelConfig):
        d = cfg.d_model
        block = x[..., part * d:(part + 1) * d]
        if block.ndim == 2:
            return block.reshape(d, cfg.n_heads, cfg.head_dim)
        return block.reshape(cfg.n_heads, cfg.head_dim)
    return f


def _o(x, cfg: ModelConfig):
    return x.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)


def layout_rules(cfg: ModelConfig, prefix: str, qkv, o, mlp):
    """GPT-2's key names (shared by GPTBigCode), with the layout transforms given:
    `qkv(part)` for the fused c_attn weight and bias, `o` for c_proj, `mlp` for c_fc/c_proj."""
    h = prefix + "h.{i}."
    table = [Rule("embed", prefix + "wte.weight"), Rule("pos_embed", prefix + "wpe.weight"),
             *norm("final_norm", prefix + "ln_f", cfg), *norm("layers/ln1", h + "ln_1", cfg),
             *norm("layers/ln2", h + "ln_2", cfg),
             *linear("layers/attn/o", h + "attn.c_proj", o, cfg.attn_bias),
             *linear("layers/mlp/wi", h + "mlp.c_fc", mlp, cfg.mlp_bias),
             *linear("layers/mlp/wo", h + "mlp.c_proj", mlp, cfg.mlp_bias)]
    for part, name in enumerate("qkv"):
        table += linear(f"layers/attn/{name}", h + "attn.c_attn", qkv(part), cfg.attn_bias,
                        qkv(part))
    return table


def rules(cfg: ModelConfig, prefix: str):
    # Conv1D weights are already [in, out]: only the fused c_attn and heads need reshaping.
    return layout_rules(cfg, prefix, _qkv, _o, lambda x, cfg: x)


ARCH = Architecture(
    ("gpt2",), config_from_hf, rules,
    # Buffers some GPT-2 checkpoints carry (causal mask).
    ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",))
