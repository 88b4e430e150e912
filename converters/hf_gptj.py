"""HuggingFace GPT-J (`model_type: gptj`) -> canonical params.

GPT-J: parallel residual with one shared layernorm (x + attn(ln(x)) + mlp(ln(x))),
rotary on the first `rotary_dim` dims of each head with base 10000, no attention
biases, an LM head with a bias. Projections are torch Linear, `[out, in]`.

GPT-J rotates adjacent pairs (dims 2i, 2i+1: "rotate-every-two"); the model
always rotates halves (dims i, i + rotary_dim/2). Permuting the q and k output
columns within each head's rotary dims, even indices first then odd, maps one
onto the other exactly, and leaves q.k unchanged (both sides move alike).
"""

from __future__ import annotations

import numpy as np

from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from converters.hf_common import Architecture, plain_rope, token_ids
from converters.transforms import linear_in_heads, linear_out_heads, transpose
from converters.activations import hf_activation
from converters.rules import Rule, check_keys, linear, norm, require_value


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    check_keys(hf, where, ["vocab_size", "n_embd", "n_layer", "n_head", "n_positions"])
    act = hf_activation(hf, "activation_function", where, "gelu_new")
    # GPT-J's rotary base is fixed at 10000: refuse rope settings it would not honour.
    theta, pct = plain_rope(hf, where)
    if theta != 10000.0 or pct != 1.0:
        raise CheckpointError(f"{where}: config.json sets rope base {theta} / partial rotary "
                              f"factor {pct}; GPT-J's rotary is fixed (base 10000, rotary_dim)")
    d, n = hf["n_embd"], hf["n_head"]
    if d % n:
        raise CheckpointError(f"{where}: n_embd ({d}) is not a multiple of n_head ({n})")
    h = d // n
    rd = hf.get("rotary_dim")
    if rd is None:
        rd = h  # HF's rotary_dim=None rotates whole heads (it only runs with one head)
    if isinstance(rd, bool) or not isinstance(rd, int) or not 0 < rd <= h or rd % 2:
        raise CheckpointError(f"{where}: config.json key 'rotary_dim' = {rd!r} must be an even "
                              f"int in (0, head_dim={h}]")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=n,
        n_kv_heads=n, head_dim=h, d_ff=hf.get("n_inner") or 4 * d,
        max_positions=hf["n_positions"], norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=act,
        positions="rotary", rotary_dim=rd, rope_theta=10000.0, attn_bias=False,
        mlp_bias=True, parallel_residual=True, shared_norm=True,
        tied_embeddings=hf.get("tie_word_embeddings", False), lm_head_bias=True,
        **token_ids(hf, where))


def every_two_to_half(rotary_dim: int, head_dim: int) -> np.ndarray:
    """Per-head index order turning rotate-every-two dims into rotate-half dims."""
    return np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2),
                           np.arange(rotary_dim, head_dim)])


def _qk(x, cfg: ModelConfig):
    """`[N*H, D]` -> `[D, N, H]` with each head's rotary dims permuted."""
    w = x.reshape(cfg.n_heads, cfg.head_dim, cfg.d_model)
    w = w[:, every_two_to_half(cfg.n_rotary, cfg.head_dim), :]
    return w.transpose(2, 0, 1)


def rules(cfg: ModelConfig, prefix: str):
    h = prefix + "h.{i}."
    table = [Rule("embed", prefix + "wte.weight"), *norm("final_norm", prefix + "ln_f", cfg),
             *norm("layers/ln1", h + "ln_1", cfg),
             *linear("layers/attn/q", h + "attn.q_proj", _qk),
             *linear("layers/attn/k", h + "attn.k_proj", _qk),
             *linear("layers/attn/v", h + "attn.v_proj", linear_in_heads()),
             *linear("layers/attn/o", h + "attn.out_proj", linear_out_heads),
             *linear("layers/mlp/wi", h + "mlp.fc_in", transpose, cfg.mlp_bias),
             *linear("layers/mlp/wo", h + "mlp.fc_out", transpose, cfg.mlp_bias),
             Rule("lm_head_bias", "lm_head.bias")]
    return table


ARCH = Architecture(
    ("gptj",), config_from_hf, rules,
    # Buffers older checkpoints carry (causal mask, sinusoid table).
    ignore=(r"(transformer\.)?h\.\d+\.attn\.(masked_bias|bias|embed_positions)",))
