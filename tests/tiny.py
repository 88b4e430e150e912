"""Tiny random ftjax models that need no torch (for engine behaviour tests)."""

import jax
import numpy as np

import ftjax
from ftjax.api import Model
from ftjax.specs import shapes as param_shapes


def tiny_config(**overrides):
    kwargs = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                  d_ff=64, max_positions=64, eos_token_id=None)
    kwargs.update(overrides)
    return ftjax.ModelConfig(**kwargs)


def tiny_params(cfg, seed=0, scale=0.3):
    """Random params of the canonical shapes, wide enough that greedy text varies."""
    shapes = param_shapes(cfg)  # abstract shapes: nothing compiled
    rng = np.random.default_rng(seed)

    def draw(path, x):
        noise = rng.standard_normal(x.shape) * scale
        is_scale = path[-1].key == "scale"  # norm gains stay near 1
        return (noise * 0.2 + 1.0 if is_scale else noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_model(seed=0, dtype="float32", **overrides):
    cfg = tiny_config(**overrides)
    params = jax.tree_util.tree_map(np.asarray, tiny_params(cfg, seed))
    return Model(cfg, jax.tree_util.tree_map(lambda x: x.astype(dtype), params), dtype)
