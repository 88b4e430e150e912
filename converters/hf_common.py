"""What every HuggingFace architecture shares: the `Architecture` interface
`converters.hf` loads through, and config.json readers (plain rotary settings,
special-token ids).

Rotary: transformers 5.x stores rotary settings in `rope_parameters`
(`{"rope_type": "default", "rope_theta": ..., "partial_rotary_factor": ...}`);
4.x checkpoints carry `rope_scaling` (null, or a dict with "type"/"rope_type")
plus top-level keys (`rope_theta`; GPT-NeoX's `rotary_emb_base` and `rotary_pct`).
HF resolves them in that order: `rope_scaling`, then `rope_parameters`, then the
top-level keys. Only plain rope ("default") is implemented; any other rope_type
(linear, dynamic, yarn, llama3, longrope, ...) or any extra parameter in those
dicts is refused naming the key, never loaded with different numerics.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from converters.rules import Rule, linear, norm
from converters.transforms import fused_per_head, linear_out_heads, transpose
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One HuggingFace model family, as `converters.hf.load_hf` reads it.

    Attributes:
      model_types: the config.json `model_type` values it reads.
      config: `(config.json dict, where) -> ModelConfig`; refuses (CheckpointError naming
        the key) any value that would change the math.
      rules: `(cfg, key prefix) -> [Rule]`, the key table but for the untied head
        (`table` adds it).
      prefixes: base-model key prefixes to try, in order: checkpoints saved from the
        bare model lack the head model's ("transformer.", OPT's "model.").
      embed: the token embedding's key after the prefix (how the prefix is found).
      head: the LM head's key (read when untied; when tied, a saved copy must equal
        the embedding).
      ignore: regexes of keys that carry no weights (causal-mask or rotary buffers).
      ignore_tied: regexes of keys skipped when the embeddings are tied (the saved head).
      aliases: {other name: the key the rules read}, for checkpoints that store a tensor
        under another name.
    """

    model_types: Tuple[str, ...]
    config: Callable[[dict, str], ModelConfig]
    rules: Callable[[ModelConfig, str], List[Rule]]
    prefixes: Tuple[str, ...] = ("transformer.", "")
    embed: str = "wte.weight"
    head: str = "lm_head.weight"
    ignore: Tuple[str, ...] = ()
    ignore_tied: Tuple[str, ...] = (r"lm_head\.weight",)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def table(self, cfg: ModelConfig, prefix: str) -> List[Rule]:
        """The whole key table: `rules` and, when the embeddings are untied, the head."""
        table = list(self.rules(cfg, prefix))
        if not cfg.tied_embeddings:
            table.append(Rule("lm_head", self.head))
        return table

    def detect_prefix(self, tensors: Mapping) -> str:
        """The first of `prefixes` under which the token embedding is stored; without
        the embedding, the first prefix any key carries, so the loader names the
        missing tensor under the prefix the checkpoint uses."""
        for prefix in self.prefixes:
            if prefix + self.embed in tensors:
                return prefix
        for prefix in self.prefixes:
            if any(k.startswith(prefix) for k in tensors):
                return prefix
        return self.prefixes[-1]

_PLAIN_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _number(value, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
        raise CheckpointError(f"{where}: config.json key {key!r} must be a positive number, "
                              f"got {value!r}")
    return float(value)


def megatron_block_rules(cfg: ModelConfig, h: str, attn: str) -> List[Rule]:
    """The block's key table of the families that keep Megatron(-DeepSpeed)'s names and
    its fused qkv laid out per head (BLOOM, GPT-NeoX): `{h}input_layernorm`,
    `{h}{attn}query_key_value`, `{h}{attn}dense`, `{h}mlp.dense_h_to_4h`, ... with `h`
    the layer's key prefix ("{i}" the index) and `attn` the attention module's name."""
    table = [*norm("layers/ln1", h + "input_layernorm", cfg),
             *norm("layers/ln2", h + "post_attention_layernorm", cfg),
             *linear("layers/attn/o", h + attn + "dense", linear_out_heads, cfg.attn_bias),
             *linear("layers/mlp/wi", h + "mlp.dense_h_to_4h", transpose, cfg.mlp_bias),
             *linear("layers/mlp/wo", h + "mlp.dense_4h_to_h", transpose, cfg.mlp_bias)]
    for part, name in enumerate("qkv"):
        table += linear(f"layers/attn/{name}", h + attn + "query_key_value",
                        fused_per_head(part), cfg.attn_bias, fused_per_head(part))
    return table


def plain_rope(hf: dict, where: str, theta_keys: Sequence[str] = ("rope_theta",),
               pct_keys: Sequence[str] = (), default_theta: float = 10000.0,
               default_pct: float = 1.0) -> Tuple[float, float]:
    """Returns (rope_theta, partial_rotary_factor) of a plain-rope config.

    Args:
      hf: config.json contents.
      theta_keys / pct_keys: top-level keys that hold the base / rotary fraction
        when the rope dicts do not (in priority order).
    Raises:
      CheckpointError naming the key for any rope_type other than "default" or any
      parameter plain rope does not have.
    """
    theta: Optional[float] = None
    pct: Optional[float] = None
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if params is None or params == {}:
            continue
        if not isinstance(params, dict):
            raise CheckpointError(f"{where}: config.json key {key!r} = {params!r} is not a dict")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"{where}: config.json key {key!r} has rope_type {kind!r}; only plain "
                "rope ('default') is supported; refusing to load with different numerics")
        extra = sorted(set(params) - _PLAIN_KEYS)
        if extra:
            raise CheckpointError(
                f"{where}: config.json key {key!r} carries {extra}, which plain rope does not "
                "have; refusing to load with different numerics")
        if theta is None and params.get("rope_theta") is not None:
            theta = _number(params["rope_theta"], f"{key}.rope_theta", where)
        if pct is None and params.get("partial_rotary_factor") is not None:
            pct = _number(params["partial_rotary_factor"], f"{key}.partial_rotary_factor", where)
    for key in theta_keys:
        if theta is None and hf.get(key) is not None:
            theta = _number(hf[key], key, where)
    for key in pct_keys:
        if pct is None and hf.get(key) is not None:
            pct = _number(hf[key], key, where)
    return (default_theta if theta is None else theta), (default_pct if pct is None else pct)


def token_id(hf: dict, key: str, where: str):
    """A special-token id from config.json: an int, a tuple of ints (some configs list
    several eos ids, e.g. Llama 3 instruct), or None."""
    value = hf.get(key)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{where}: config.json key {key!r} = {value!r} is not a "
                                  "token id (or a list of them)")
    if isinstance(value, list):
        return tuple(values) if values else None
    return value


def token_ids(hf: dict, where: str) -> dict:
    """`ModelConfig` bos/eos ids from config.json (see `token_id`)."""
    return {"bos_token_id": token_id(hf, "bos_token_id", where),
            "eos_token_id": token_id(hf, "eos_token_id", where)}
