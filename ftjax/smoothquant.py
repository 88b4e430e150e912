"""SmoothQuant W8A8 (Xiao et al., 2023): calibrate, smooth, quantize.

1. Calibration runs the float model over given token sequences and records, at the
   input of every block linear, the per-channel absmax of the activation `max|X|`
   (over every token of every sequence).
2. Per linear, s = max|X|^a / max|W|^(1-a) per input channel (max|W| over the
   output channels): the weight becomes W * s, quantized per output channel, and the
   activation becomes X / s, quantized per token (dynamic) or per tensor (static
   scale max|X / s| / 127 from calibration). The division is kept as a per-channel
   multiply inside the activation quantization (`W8A8Weight.smooth`) rather than
   folded into the preceding norm: it then applies to every linear (o and wo too,
   which follow no norm) and to every residual layout, at the cost of one fused
   elementwise op.
3. The matmul is int8 x int8 with int32 accumulation, rescaled (`quant.einsum`).
Embedding tables are int8 weight-only, per row (no activation is quantized there).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import quant
from ftjax.config import ModelConfig
from ftjax.model import Block, Linear, Transformer, split_layers
from ftjax.specs import flatten

ACTIVATIONS = ("per_token", "per_tensor")


def _record_inputs(next_fun, args, kwargs, context):
    """flax interceptor: sows max|x| over tokens at the input of every quantizable Linear."""
    module = context.module
    if isinstance(module, Linear) and context.method_name == "__call__":
        spec = module.params_spec["kernel"]
        if spec.quant == "channel":
            x = args[0]
            n = spec.contract
            amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - n)))
            module.sow("intermediates", "absmax", amax)
    return next_fun(*args, **kwargs)


def calibrate(cfg: ModelConfig, params, sequences: Sequence[Sequence[int]], dtype=jnp.float32):
    """Per-channel input absmax of every block linear.

    Args:
      params: canonical float params (layers stacked).
      sequences: token-id lists; each is cut to the model's max_positions.
    Returns:
      {"layers/attn/q/kernel": absmax [L, D], ..., "layers/attn/o/kernel": [L, N, H], ...}
    """
    if not sequences:
        raise ValueError("calibration is empty; give at least one text or token-id list")
    model = Transformer(cfg, dtype)
    block = Block(cfg, dtype)
    layers = split_layers(params["layers"], cfg.n_layers)

    @jax.jit
    def run(tokens):
        positions = jnp.arange(tokens.shape[1])[None]
        x = model.embed(params, tokens, positions)
        per_layer = []
        for p in layers:
            with nn.intercept_methods(_record_inputs):
                (x, _), state = block.apply({"params": p}, x, positions, 0, None,
                                            mutable=["intermediates"])
            per_layer.append({k.replace("/absmax", "/kernel"): v[0] for k, v in
                              flatten(state["intermediates"]).items()})
        return {f"layers/{k}": jnp.stack([d[k] for d in per_layer]) for k in per_layer[0]}

    stats = None
    for seq in sequences:
        ids = np.asarray(list(seq)[:cfg.max_positions], np.int32)[None]
        if ids.size == 0:
            continue
        s = run(jnp.asarray(ids))
        stats = s if stats is None else jax.tree_util.tree_map(jnp.maximum, stats, s)
    if stats is None:
        raise ValueError("calibration has only empty sequences")
    return stats


@functools.partial(jax.jit, static_argnums=(2, 4))
def smooth_quantize(w, x_absmax, n_contract: int, alpha: float, per_tensor: bool):
    """One float kernel `[*contraction, *out]` -> `quant.W8A8Weight`."""
    w = jnp.asarray(w, jnp.float32)
    out_axes = tuple(range(n_contract, w.ndim))
    w_absmax = jnp.max(jnp.abs(w), axis=out_axes)
    # Floors keep s finite for dead channels (no activation or all-zero weight row).
    s = jnp.maximum(x_absmax, 1e-5) ** alpha / jnp.maximum(w_absmax, 1e-5) ** (1 - alpha)
    s = jnp.clip(s, 1e-5, 1e5)
    ws = w * s.reshape(s.shape + (1,) * len(out_axes))
    q = quant.quantize(ws, n_contract)
    act_scale = None
    if per_tensor:
        act_scale = jnp.maximum(jnp.max(x_absmax / s), 1e-8) / quant.QMAX
    return quant.W8A8Weight(q.q, q.scale, (1.0 / s).astype(jnp.float32), act_scale)


def quantize_w8a8(cfg: ModelConfig, params, sequences, alpha: float = 0.5,
                  activations: str = "per_token", dtype=jnp.float32):
    """SmoothQuant W8A8 of canonical (stacked) float params, calibrated on `sequences`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant_alpha must be in [0, 1], got {alpha!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"w8a8 activations must be one of {ACTIVATIONS}, got {activations!r}")
    stats = calibrate(cfg, params, sequences, dtype)
    per_tensor = activations == "per_tensor"

    def one(path, w, spec):  # stacked [L, ...]: one smoothing per layer
        return jax.vmap(lambda wl, al: smooth_quantize(wl, al, spec.contract, alpha,
                                                       per_tensor))(w, stats[path])

    return quant.map_quantizable(cfg, params, one, quant.quantize_rows)
