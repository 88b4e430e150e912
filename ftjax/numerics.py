"""The numeric building blocks every layer shares, each stated once.

The model's attention (`attend`) is also the reference the Pallas attention kernels are
tested against; `quantize_int8` is the one symmetric int8 quantizer (weights, the
kernels' test operands, the int8 KV cache); `NEG_INF` / `MASK` are the one "minus
infinity" (as a logit, and finite where sums and softmaxes must stay finite).

Shape legend: B batch, T query length, S key length, N query heads, K kv heads,
G = N // K query heads per kv head, H head width.

This module depends on jax and numpy only: `pallas_kernels` (below the model) and the
model both import it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# A logit that can never be sampled: -inf, as HuggingFace's logits processors set it.
NEG_INF = float("-inf")
# The same "minus infinity" where it must stay finite: attention scores of masked keys
# (an online softmax would compute inf - inf = NaN) and beam scores that are summed.
MASK = float(np.finfo(np.float32).min)
QMAX = 127.0


# -- int8 ----------------------------------------------------------------------------


def round_int8(x, scale):
    """`x / scale` rounded and clipped to [-127, 127], as int8."""
    return jnp.clip(jnp.round(x / scale), -QMAX, QMAX).astype(jnp.int8)


def quantize_int8(x, axes: Tuple[int, ...]):
    """Symmetric int8 with one scale per slice reduced over `axes` (absmax / 127).

    An all-zero slice gets scale 1 (it stays exactly zero, and dividing by it is safe).

    Returns:
      (int8 array of x's shape, float32 scale of x's shape with `axes` kept as size 1).
    """
    xf = jnp.asarray(x).astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=axes, keepdims=True) / QMAX
    scale = jnp.where(scale == 0, 1.0, scale)
    return round_int8(xf, scale), scale


def quantize_vectors(x):
    """Per-vector int8 over the last axis (the int8 KV cache: one scale per token and head).

    Returns:
      (int8 array of x's shape, float32 scales of shape `x.shape[:-1]`).
    """
    q, scale = quantize_int8(x, axes=(-1,))
    return q, scale[..., 0]


# -- positions -------------------------------------------------------------------------


def alibi_slopes(n_heads: int) -> jax.Array:
    """ALiBi head slopes `[N]` (Press et al.; BLOOM's rule for non-powers of two)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(n_heads - closest)]
    return jnp.asarray(slopes, jnp.float32)


def rotate(x, positions, rotary_dim: int, theta: float):
    """Rotary embedding, rotate-half convention, on the first `rotary_dim` dims.

    Args:
      x: `[B, T, X, H]` (X heads); positions: `[B, T]`.
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / rotary_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xr = x[..., :rotary_dim].astype(jnp.float32)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def activation(name: str, x):
    if name == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


# -- attention -------------------------------------------------------------------------


def attend(q, k, v, q_pos, k_pos, slopes=None, heads_first=False, k_scale=None,
           v_scale=None, k_len: Optional[jax.Array] = None):
    """Causal attention over keys whose position is <= the query's.

    Args:
      q: `[B, T, N, H]`; k, v: `[B, S, K, H]`, or `[B, K, S, H]` with heads_first.
      q_pos: `[B, T]` absolute query positions; k_pos: `[B, S]` or `[S]` key positions.
      slopes: optional ALiBi slopes `[N]`: adds slope * (k_pos - q_pos) to the scores.
      k_scale, v_scale: for an int8 k / v: float32 per-token scales (`[B, K, S]` with
        heads_first, else `[B, S, K]`), applied to the scores and the probabilities
        (no dequantized copy of the cache).
      k_len: optional int `[B]`: keys at index >= k_len are not visible either.
    Returns:
      `[B, T, N, H]` in q's dtype; a query that sees no key gets zeros. Scores and
      softmax run in float32.
    """
    b, t, n, h = q.shape
    kv, s = (k.shape[1], k.shape[2]) if heads_first else (k.shape[2], k.shape[1])
    kspec = "bksh" if heads_first else "bskh"
    qg = q.reshape(b, t, kv, n // kv, h)
    if k_scale is not None:
        k = k.astype(q.dtype)
        if not heads_first:
            k_scale, v_scale = jnp.swapaxes(k_scale, 1, 2), jnp.swapaxes(v_scale, 1, 2)
    scores = jnp.einsum(f"btkgh,{kspec}->bkgts", qg, k, preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(h)))
    k_pos = jnp.broadcast_to(k_pos, (b, s))
    if slopes is not None:
        dist = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, T, S]
        scores = scores + slopes.reshape(kv, n // kv)[None, :, :, None, None] * dist[:, None, None]
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    if k_len is not None:
        mask = mask & (jnp.arange(s)[None, :] < k_len[:, None])[:, None, None, None, :]
    scores = jnp.where(mask, scores, MASK)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)
    if v_scale is not None:
        probs, v = probs * v_scale[:, :, None, None, :], v.astype(q.dtype)
    out = jnp.einsum(f"bkgts,{kspec}->btkgh", probs.astype(v.dtype), v)
    return out.reshape(b, t, n, h)
