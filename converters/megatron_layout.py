"""Megatron-style tensor-parallel shards -> one full state dict -> canonical params.

Shared by Megatron-LM (`converters.megatron`) and NeMo (`converters.nemo`), whose
weights are Megatron modules under other wrappers. Key names vary by release
(`transformer`/`encoder`/`decoder`, `attention`/`self_attention`, `*_layernorm`/
`*_norm`, megatron-core `linear_qkv`/`linear_proj`/`linear_fc1`/`linear_fc2` with
the norms fused into them); they are recognized by pattern (by presence, never
by a version number) and mapped to one role per tensor.

Each TP rank's fused query_key_value rows are first brought to the per-group
layout `[ng, np/ng + 2, hn]` (q heads of the group, then its k, then its v), from
the layout its `checkpoint_version` used:
  0:        `[3, np, hn]`
  1.0:      `[np, hn, 3]`
  2.0, 3.0: `[np, 3, hn]`, with GQA `[ng, np/ng + 2, hn]` (megatron-core the same)
so that concatenating ranks along groups gives the whole model's tensor.

What each rank's tensor should look like (its shape, and the axis ranks split it
along) is derived from the parameter spec table (`rank_layout`), not restated.
"""

from __future__ import annotations

import re

import numpy as np

from converters.rules import Rule, apply_rules, linear, norm
from converters.spec_shapes import split_axis, stored_shape
from converters.transforms import linear_out_heads, transpose
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError
from ftjax.specs import flatten, is_spec, param_specs, shapes as param_shapes

_STACK = r"(?:language_model\.)?(?:transformer|encoder|decoder)\."
_LAYER = re.compile(_STACK + r"layers\.(\d+)\.(.+)")
# Per-layer suffix -> role; several releases' names per role.
_LAYER_ROLES = {
    "input_layernorm": "ln1", "input_norm": "ln1", "self_attention.linear_qkv.layer_norm": "ln1",
    "attention.query_key_value": "qkv", "self_attention.query_key_value": "qkv",
    "self_attention.linear_qkv": "qkv",
    "attention.dense": "proj", "self_attention.dense": "proj", "self_attention.linear_proj": "proj",
    "post_attention_layernorm": "ln2", "post_attention_norm": "ln2", "pre_mlp_layernorm": "ln2",
    "mlp.linear_fc1.layer_norm": "ln2",
    "mlp.dense_h_to_4h": "fc1", "mlp.linear_fc1": "fc1",
    "mlp.dense_4h_to_h": "fc2", "mlp.linear_fc2": "fc2",
}
_GLOBAL_ROLES = [
    (re.compile(r"(?:language_model\.)?embedding\.word_embeddings\.weight"), "embed.weight"),
    (re.compile(r"(?:language_model\.)?embedding\.position_embeddings\.weight"), "pos.weight"),
    (re.compile(_STACK + r"final_(?:layer)?norm\.(weight|bias)"), "final_norm.{}"),
    (re.compile(r"(?:language_model\.)?output_layer\.weight"), "head.weight"),
    (re.compile(r"word_embeddings_for_head\.weight"), "head_copy.weight"),
]
# Buffers and TransformerEngine bookkeeping that carry no weights.
IGNORE = re.compile(r".*(\._extra_state|rotary_pos_emb\.inv_freq)")


def role_of(key: str) -> tuple[str, int | None] | None:
    """(role, layer index or None) of a flattened Megatron key; None if unknown."""
    m = _LAYER.fullmatch(key)
    if m:
        rest = m.group(2)
        for suffix in ("weight", "bias"):
            for name, role in _LAYER_ROLES.items():
                fused_norm = name.endswith(".layer_norm")
                full = f"{name}_{suffix}" if fused_norm else f"{name}.{suffix}"
                if rest == full:
                    return f"{role}.{suffix}", int(m.group(1))
        return None
    for pattern, role in _GLOBAL_ROLES:
        m = pattern.fullmatch(key)
        if m:
            return role.format(*m.groups()), None
    return None


# Role -> (how its params are stored, the canonical params its tensor holds, fused in
# this order). A tied head's copies repeat the embedding.
_ROLE_PARAMS = {
    "embed": ("table", "embed"), "head": ("table", "embed"), "head_copy": ("table", "embed"),
    "pos": ("table", "pos_embed"), "final_norm": ("norm", "final_norm"),
    "ln1": ("norm", "layers/ln1"), "ln2": ("norm", "layers/ln2"),
    "qkv": ("linear", "layers/attn/q", "layers/attn/k", "layers/attn/v"),
    "proj": ("linear", "layers/attn/o"), "fc1": ("linear", "layers/mlp/wg", "layers/mlp/wi"),
    "fc2": ("linear", "layers/mlp/wo"),
}
# Per storage: role suffix -> (the param's leaf name, `stored_shape` kind).
_SUFFIXES = {"table": {"weight": ("", "table")},
             "norm": {"weight": ("/scale", "table"), "bias": ("/bias", "table")},
             "linear": {"weight": ("/kernel", "kernel"), "bias": ("/bias", "bias")}}


def core_layers(state: dict) -> bool:
    """Whether flat state dict keys are megatron-core's (`linear_qkv`, ...) rather than the
    legacy layer's (`query_key_value`, ...)."""
    return any(".linear_qkv." in key for key in state)


def rank_layout(cfg: ModelConfig, tp: int, padded_vocab: int) -> dict[str, tuple]:
    """{role: (shape of its tensor on one TP rank (`nn.Linear` `[out, in]`), the axis TP
    ranks split it along or None if replicated)}, derived from the spec table. A role
    the config has no param for (a bias of a bias-free model, positions of a rotary
    one) is absent."""
    specs = flatten(param_specs(cfg, vocab=padded_vocab), is_leaf=is_spec)
    out = {}
    for role, (storage, *paths) in _ROLE_PARAMS.items():
        for suffix, (leaf, kind) in _SUFFIXES[storage].items():
            parts = [specs[p + leaf] for p in paths if p + leaf in specs]
            if parts:
                out[f"{role}.{suffix}"] = (stored_shape(parts, kind, tp), split_axis(parts, kind))
    return out


def qkv_to_groups(x: np.ndarray, cfg: ModelConfig, tp: int, version: float) -> np.ndarray:
    """One rank's fused qkv rows (weight `[rows, D]` or bias `[rows]`) -> `[ng/tp, r + 2, hn, ...]`."""
    h, r = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    groups = cfg.n_kv_heads // tp
    tail = x.shape[1:]
    if version < 2.0:
        np_l = cfg.n_heads // tp
        if version == 0:  # [3, np, hn]
            y = x.reshape(3, np_l, h, *tail).swapaxes(0, 1)
        else:  # 1.0: [np, hn, 3]
            y = x.reshape(np_l, h, 3, *tail).swapaxes(1, 2)
        return y  # MHA only (checked by the caller): groups == heads, r == 1
    return x.reshape(groups, r + 2, h, *tail)


def _part(kind: str):
    """q / k / v of the merged `[K, r + 2, H, (D)]` tensor -> canonical `[D, X, H]` / `[X, H]`."""
    def f(x, cfg: ModelConfig):
        r = cfg.n_heads // cfg.n_kv_heads
        y = {"q": lambda: x[:, :r], "k": lambda: x[:, r], "v": lambda: x[:, r + 1]}[kind]()
        heads = cfg.n_heads if kind == "q" else cfg.n_kv_heads
        y = y.reshape(heads, cfg.head_dim, *x.shape[3:])
        return y.transpose(2, 0, 1) if y.ndim == 3 else y
    return f


def _norm(one_p: bool):
    # layernorm1p (NeMo, Megatron --apply-layernorm-1p) stores gamma - 1.
    return (lambda x, cfg: x + np.asarray(1, x.dtype)) if one_p else (lambda x, cfg: x)


def rules(cfg: ModelConfig, layernorm_1p: bool = False) -> list[Rule]:
    """The table from merged role names to canonical params."""
    n1 = _norm(layernorm_1p)
    table = [Rule("embed", "embed.weight"), *norm("final_norm", "final_norm", cfg, n1),
             *norm("layers/ln1", "layers.{i}.ln1", cfg, n1),
             *norm("layers/ln2", "layers.{i}.ln2", cfg, n1),
             *linear("layers/attn/o", "layers.{i}.proj", linear_out_heads, cfg.attn_bias),
             *linear("layers/mlp/wi", "layers.{i}.fc1", transpose, cfg.mlp_bias),
             *linear("layers/mlp/wo", "layers.{i}.fc2", transpose, cfg.mlp_bias)]
    if cfg.positions == "learned":
        table.append(Rule("pos_embed", "pos.weight"))
    for part in "qkv":
        table += linear(f"layers/attn/{part}", "layers.{i}.qkv", _part(part), cfg.attn_bias,
                        _part(part))
    if cfg.glu:
        table += linear("layers/mlp/wg", "layers.{i}.fc1_gate", transpose, cfg.mlp_bias)
    if not cfg.tied_embeddings:
        table.append(Rule("lm_head", "head.weight"))
    return table


def merge(stages: list[list[tuple[str, dict[str, np.ndarray]]]], cfg: ModelConfig, tp: int,
          version: float, padded_vocab: int, where: str) -> dict[str, np.ndarray]:
    """Merges `stages[pp][tp] = (file, flat state dict)` into one dict of role names.

    Layer indices restart at 0 on each pipeline stage (Megatron-LM, NeMo); a stage that
    numbers its layers globally is recognized and kept as is.
    Raises:
      CheckpointError naming the file and tensor of any unknown, misshapen or
      inconsistent (between TP ranks) tensor.
    """
    if version < 2.0 and cfg.n_kv_heads != cfg.n_heads:
        raise CheckpointError(f"{where}: checkpoint_version {version} predates grouped-query "
                              "attention but the args ask for num_query_groups "
                              f"{cfg.n_kv_heads} != heads {cfg.n_heads}")
    layout = rank_layout(cfg, tp, padded_vocab)
    merged: dict[str, np.ndarray] = {}
    offset = 0
    for p, ranks in enumerate(stages):
        per_rank: list[dict[tuple[str, int | None], tuple[str, np.ndarray]]] = []
        for path, state in ranks:
            roles = {}
            unknown = []
            for key, value in state.items():
                if IGNORE.fullmatch(key):
                    continue
                role = role_of(key)
                if role is None:
                    unknown.append(key)
                    continue
                if role in roles:
                    raise CheckpointError(f"{path}: tensors {roles[role][0]!r} and {key!r} "
                                          "hold the same weight under old and new names")
                if role[0] not in layout:
                    raise CheckpointError(f"{path}: tensor {key!r} has no parameter in the model "
                                          "the args describe (refusing to drop it)")
                want = layout[role[0]][0]
                if tuple(value.shape) != want:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has shape {tuple(value.shape)}, expected "
                        f"{want} for this config with tensor parallel size {tp}")
                roles[role] = (key, value)
            if unknown:
                raise CheckpointError(f"{path}: tensors this converter does not understand "
                                      f"(refusing to drop them): {sorted(unknown)[:8]}")
            per_rank.append(roles)
        first = set(per_rank[0])
        for (path, _), roles in zip(ranks, per_rank):
            if set(roles) != first:
                diff = sorted(str(r) for r in first ^ set(roles))[:6]
                raise CheckpointError(f"{path}: holds different tensors than {ranks[0][0]} "
                                      f"(roles {diff})")
        layers = sorted({i for _, i in first if i is not None})
        base = layers[0] if layers else 0  # 0: numbered per stage; offset: globally
        if layers != list(range(base, base + len(layers))) or base not in (0, offset):
            raise CheckpointError(f"{ranks[0][0]}: pipeline stage {p} holds layers {layers}, "
                                  f"expected 0..{len(layers) - 1} or from {offset}")
        for role in sorted(first, key=str):
            name, layer = role
            tensors = [roles[role][1] for roles in per_rank]
            keys = [(path, roles[role][0]) for (path, _), roles in zip(ranks, per_rank)]
            dst = name if layer is None else f"layers.{layer - base + offset}.{name}"
            axis = layout[name][1]
            for out, value in _merge_role(name, axis, tensors, keys, cfg, tp, version).items():
                out_name = dst.replace(name, out)
                if out_name in merged:
                    if not np.array_equal(merged[out_name], value):
                        raise CheckpointError(f"{keys[0][0]}: tensor {keys[0][1]!r} differs "
                                              "from the copy on an earlier pipeline stage")
                    continue
                merged[out_name] = value
        offset += len(layers)
    if offset != cfg.n_layers:
        raise CheckpointError(f"{where}: the stages hold {offset} layers, the args say "
                              f"num_layers={cfg.n_layers}")
    return merged


def _merge_role(name, axis, tensors, keys, cfg, tp, version) -> dict[str, np.ndarray]:
    if axis is None:  # replicated: every rank must hold the same values
        for (path, key), t in zip(keys[1:], tensors[1:]):
            if not np.array_equal(t, tensors[0]):
                raise CheckpointError(f"{path}: tensor {key!r} differs from rank 0's copy "
                                      f"({keys[0][0]}); it should be replicated")
        return {name: np.asarray(tensors[0])}
    if name.startswith("qkv."):
        parts = [qkv_to_groups(np.asarray(t), cfg, tp, version) for t in tensors]
        return {name: np.concatenate(parts, axis=0)}
    if name.startswith("fc1.") and cfg.glu:
        # Swiglu's fc1 rows are [gate; up] on every rank (torch.chunk(x, 2, dim=-1)).
        halves = [np.split(np.asarray(t), 2, axis=0) for t in tensors]
        return {name.replace("fc1", "fc1_gate"): np.concatenate([g for g, _ in halves]),
                name: np.concatenate([u for _, u in halves])}
    return {name: np.concatenate([np.asarray(t) for t in tensors], axis=axis)}


def to_params(merged: dict[str, np.ndarray], cfg: ModelConfig, vocab: int, where: str,
              layernorm_1p: bool = False) -> dict:
    """Canonical params from the merged dict, dropping padded vocabulary rows past `vocab`."""
    tensors = dict(merged)
    for name in ("embed.weight", "head.weight", "head_copy.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:vocab]
    copy = tensors.pop("head_copy.weight", None)
    if cfg.tied_embeddings:
        for name, t in (("word_embeddings_for_head", copy), ("output_layer", tensors.get(
                "head.weight"))):
            if t is not None and not np.array_equal(t, tensors.get("embed.weight")):
                raise CheckpointError(f"{where}: tensor {name!r} differs from the word "
                                      "embeddings but the embeddings are tied")
        tensors.pop("head.weight", None)
    return apply_rules(tensors, rules(cfg, layernorm_1p), cfg, param_shapes(cfg), where=where)
