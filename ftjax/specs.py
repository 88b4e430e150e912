"""The parameter spec table: every parameter's shape, logical axes, contraction axes and
quantizability, stated once (as jax-llm-examples' `ArrayInfo`).

The model creates its params from it, `ftjax.sharding` maps its logical axes to mesh
axes, `ftjax.quant` quantizes what it marks quantizable along its contraction axes,
converters and exporters check tensors against its shapes, and `ftjax plan` counts its
bytes. Adding a parameter (a qk-norm, a new bias) means adding one entry here and using
it in the model.

Canonical layout (numpy or jax leaves, nested dicts): attention unfused with heads
explicit, q `[D, N, H]`, k/v `[D, K, H]`, o `[N, H, D]`; MLP wi/wg `[D, F]`, wo `[F, D]`;
every block param stacked on a leading `L` ("layers") axis under "layers".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import ModelConfig

INITS = ("normal", "zeros", "ones")
INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter.

    Attributes:
      shape: the global (unsharded, unpadded) shape.
      axes: one logical axis name per dimension ("layers", "vocab", "embed", "heads",
        "kv_heads", "head_dim", "ffn", "positions"); `ftjax.sharding.RULES` maps them.
      init: "normal" (stddev 0.02), "zeros" or "ones".
      contract: for a matmul kernel, how many of its axes (after "layers") are
        contracted with the activation (they come first); 0 for anything else.
      quant: how int8 weight types quantize it: "channel" (a block matmul kernel: per
        output channel, or per group of input rows), "rows" (an embedding table: per
        row), or None (stays float).
    """

    shape: Tuple[int, ...]
    axes: Tuple[str, ...]
    init: str = "normal"
    contract: int = 0
    quant: Optional[str] = None

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ParamSpec: shape {self.shape} and axes {self.axes} differ in rank")
        if self.init not in INITS:
            raise ValueError(f"ParamSpec: init must be one of {INITS}, got {self.init!r}")

    @property
    def stacked(self) -> bool:
        return bool(self.axes) and self.axes[0] == "layers"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _kernel(shape, axes, contract=1, quantizable=True) -> ParamSpec:
    return ParamSpec(tuple(shape), tuple(axes), "normal", contract,
                     "channel" if quantizable else None)


def _norm(cfg: ModelConfig) -> dict:
    d = cfg.d_model
    out = {"scale": ParamSpec((d,), ("embed",), "ones")}
    if cfg.norm == "layernorm":
        out["bias"] = ParamSpec((d,), ("embed",), "zeros")
    return out


def _linear(kernel: ParamSpec, bias: bool, bias_shape, bias_axes) -> dict:
    out = {"kernel": kernel}
    if bias:
        out["bias"] = ParamSpec(tuple(bias_shape), tuple(bias_axes), "zeros")
    return out


def block_specs(cfg: ModelConfig) -> dict:
    """The params of one transformer block (no "layers" axis)."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    ab, mb = cfg.attn_bias, cfg.mlp_bias
    attn = {
        "q": _linear(_kernel((d, n, h), ("embed", "heads", "head_dim")), ab, (n, h),
                     ("heads", "head_dim")),
        "k": _linear(_kernel((d, k, h), ("embed", "kv_heads", "head_dim")), ab, (k, h),
                     ("kv_heads", "head_dim")),
        "v": _linear(_kernel((d, k, h), ("embed", "kv_heads", "head_dim")), ab, (k, h),
                     ("kv_heads", "head_dim")),
        "o": _linear(_kernel((n, h, d), ("heads", "head_dim", "embed"), contract=2), ab,
                     (d,), ("embed",)),
    }
    mlp = {"wi": _linear(_kernel((d, f), ("embed", "ffn")), mb, (f,), ("ffn",))}
    if cfg.glu:
        mlp["wg"] = _linear(_kernel((d, f), ("embed", "ffn")), mb, (f,), ("ffn",))
    mlp["wo"] = _linear(_kernel((f, d), ("ffn", "embed")), mb, (d,), ("embed",))
    out = {"ln1": _norm(cfg), "attn": attn, "mlp": mlp}
    if not cfg.shared_norm:
        out["ln2"] = _norm(cfg)
    return out


def param_specs(cfg: ModelConfig, vocab: Optional[int] = None) -> dict:
    """The whole canonical params tree as `ParamSpec`s, block params stacked.

    Args:
      vocab: rows of the vocabulary params when padded past `cfg.vocab_size`
        (vocab-parallel sharding pads to a multiple of the tensor size).
    """
    d, e = cfg.d_model, cfg.embed_dim
    v = vocab or cfg.vocab_size
    table = ("vocab", "embed")
    out: Dict[str, object] = {"embed": ParamSpec((v, e), table, quant="rows")}
    if e != d:
        out["project_in"] = {"kernel": _kernel((e, d), ("embed", "embed"), quantizable=False)}
        out["project_out"] = {"kernel": _kernel((d, e), ("embed", "embed"), quantizable=False)}
    if cfg.positions == "learned":
        out["pos_embed"] = ParamSpec((cfg.max_positions + cfg.position_offset, d),
                                     ("positions", "embed"), quant="rows")
    if cfg.embed_norm:
        out["embed_norm"] = _norm(cfg)
    out["layers"] = map_specs(lambda s: dataclasses.replace(
        s, shape=(cfg.n_layers,) + s.shape, axes=("layers",) + s.axes), block_specs(cfg))
    if cfg.final_norm:
        out["final_norm"] = _norm(cfg)
    if not cfg.tied_embeddings:
        out["lm_head"] = ParamSpec((v, e), table, quant="rows")
    if cfg.lm_head_bias:
        out["lm_head_bias"] = ParamSpec((v,), ("vocab",), "zeros")
    return out


# -- trees of specs (and of params: the same nesting) ---------------------------------


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], object], specs: Mapping) -> dict:
    return jax.tree_util.tree_map(fn, specs, is_leaf=is_spec)


def flatten(tree: Mapping, prefix: str = "", is_leaf=None) -> dict:
    """Nested dicts -> {"a/b/c": leaf}. The one path convention of params everywhere
    (sharding, quantization, checkpoints, converters)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and not (is_leaf and is_leaf(v)):
            out.update(flatten(v, path + "/", is_leaf))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping) -> dict:
    """{"a/b/c": leaf} -> nested dicts (the inverse of `flatten`)."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def spec_at(specs: Mapping, path: str) -> ParamSpec:
    """The spec of the param at "/"-path `path` (ValueError naming it if there is none)."""
    node = specs
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"no parameter {path!r} in this model's spec table")
        node = node[part]
    if not is_spec(node):
        raise ValueError(f"{path!r} names a group of parameters, not one")
    return node


# -- what the table gives -----------------------------------------------------------------


def shapes(cfg: ModelConfig, dtype=jnp.float32, vocab: Optional[int] = None) -> dict:
    """The canonical params pytree as `jax.ShapeDtypeStruct`s (nothing allocated)."""
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg, vocab))


def n_params(cfg: ModelConfig) -> int:
    """Parameter count (a tied LM head counted once)."""
    return sum(s.size for s in jax.tree_util.tree_leaves(param_specs(cfg), is_leaf=is_spec))


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Random params of the canonical shapes (presets, tests, training from scratch):
    normal(0.02) weights, zero biases, unit norm scales. numpy, float32 first."""
    rng = np.random.default_rng(seed)

    def draw(s: ParamSpec):
        if s.init == "zeros":
            x = np.zeros(s.shape, np.float32)
        elif s.init == "ones":
            x = np.ones(s.shape, np.float32)
        else:
            x = rng.standard_normal(s.shape, dtype=np.float32) * INIT_STDDEV
        return jnp.asarray(x, dtype)

    return map_specs(draw, param_specs(cfg))
