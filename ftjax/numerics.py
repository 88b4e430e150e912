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


def _scatter_bf16_as_bits() -> bool:
    """XLA:CPU in jaxlib < 0.11 runs a bf16 / f16 scatter by upcasting the whole operand
    to float32 and back (a KV cache write: 5.7 ms for a 12 x 8 x 12 x 160 x 64 cache);
    scattering the bits as uint16 costs 3.3 ms there (a bitcast copy of the cache). On
    jax 0.12 the plain scatter is in place (0.004 ms) and the bitcast costs 4.6 ms
    (`numerics.scatter_set`'s micro, 2-core AMD EPYC). GPUs scatter bf16 natively."""
    major, minor = (int(v) for v in jax.__version__.split(".")[:2])
    return (major, minor) < (0, 11) and jax.default_backend() == "cpu"


def kv_storage(dtype, kernels: str):
    """The dtype a KV cache of `dtype` values is stored in: bf16 as its uint16 bits where
    the native CPU kernels read it (they take the bits as bf16) and XLA:CPU would
    upcast each bf16 write (`_scatter_bf16_as_bits`); there a cache of bf16 values
    scattered through a bitcast is copied whole around every write, twice per layer and
    step (36% of a bf16 batch-8 decode step of gpt2-124m on jax 0.10)."""
    if kernels == "cpu" and jnp.dtype(dtype) == jnp.bfloat16 and _scatter_bf16_as_bits():
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(dtype)


def kv_values(a):
    """A KV array as values: uint16 storage (`kv_storage`) as the bf16 it holds."""
    if a is not None and a.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(a, jnp.bfloat16)
    return a


def scatter_set(a, index, x, mode):
    """`a.at[index].set(x, mode=mode)` (x cast to a's dtype; into uint16 KV storage as
    bf16 bits); 2-byte floats scattered as their uint16 bits where that is faster
    (`_scatter_bf16_as_bits`: old XLA:CPU)."""
    if a.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    x = x.astype(a.dtype)
    if (a.dtype.itemsize == 2 and jnp.issubdtype(a.dtype, jnp.floating)
            and _scatter_bf16_as_bits()):
        bits = jax.lax.bitcast_convert_type
        out = bits(a, jnp.uint16).at[index].set(bits(x, jnp.uint16), mode=mode)
        return bits(out, a.dtype)
    return a.at[index].set(x, mode=mode)


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


def argmax(x, axis: int = -1):
    """`jnp.argmax` (the first maximum; a NaN counts as the maximum) as two plain
    reductions: XLA:CPU runs jnp.argmax's paired (value, index) reduction ~7x slower
    (8 x 50,257 logits: 2.1 ms vs 0.3 ms), and the decode step takes one per token."""
    top = jnp.max(x, axis=axis, keepdims=True)
    hit = (x == top) | jnp.isnan(x)
    idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    return jnp.min(jnp.where(hit, idx, x.shape[axis]), axis=axis)


# -- attention -------------------------------------------------------------------------


# Keys per step of `attend_blocks`: small enough to stay in cache while used, large
# enough that the loop's per-step cost is paid rarely. Measured (gpt2-124m shapes, 12
# layers, 2-core AMD EPYC, CPU time): 128 or 256 keys per block cost 1/4 (8 rows) to
# 1/7 (1 row) of attending over a whole 1024-slot cache at once, and follow the
# tokens in use; smaller blocks pay the loop, 16 pages of 16 cost more than 8.
KEY_BLOCK = 128


def _page_scores(qg, k, k_scale):
    """Scores `[B, K, G, T, M * P]` of queries `qg [B, T, K, G, H]` against a block of
    pages `k [B, M, K, P, H]` (scales `[B, M, K, P]`), one small dot per (row, page,
    kv head).

    Batching the dot over the pages' own leading axes (B, M, K) needs no copy of the
    block: the `[B, K, M * P, H]` form made XLA:CPU transpose every block of every
    layer (with the gather, most of the engine's decode attention; measured 54 -> 46
    ms a step at 8 rows x 400 tokens, gpt2-124m). Only the small scores move."""
    b, t, kv, g, h = qg.shape
    m, ps = k.shape[1], k.shape[3]
    qm = jnp.broadcast_to(jnp.moveaxis(qg, 1, 3).reshape(b, 1, kv, g * t, h),
                          (b, m, kv, g * t, h))
    s = jnp.einsum("bmkxh,bmksh->bmkxs", qm.astype(k.dtype), k,
                   preferred_element_type=jnp.float32)
    if k_scale is not None:
        s = s * k_scale[:, :, :, None, :]
    s = s.reshape(b, m, kv, g, t, ps)
    return jnp.moveaxis(s, 1, 4).reshape(b, kv, g, t, m * ps)


def _page_values(p, v, v_scale):
    """`sum_s p[..., s] v[s]` for probabilities `p [B, K, G, T, M * P]` and pages
    `v [B, M, K, P, H]` -> `[B, K, G, T, H]`: per page, then summed (`_page_scores`)."""
    b, kv, g, t, _ = p.shape
    m, ps, h = v.shape[1], v.shape[3], v.shape[4]
    pm = jnp.moveaxis(p.reshape(b, kv, g, t, m, ps), 4, 1).reshape(b, m, kv, g * t, ps)
    if v_scale is not None:
        pm = pm * v_scale[:, :, :, None, :]
    pv = jnp.einsum("bmkxs,bmksh->bmkxh", pm.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
    return jnp.sum(pv, axis=1).reshape(b, kv, g, t, h)


def _block_scores(qg, q_pos, k_pos, k, k_scale, slopes, inv):
    """Masked scores `[B, K, G, T, S]` of queries `qg [B, T, K, G, H]` at `q_pos [B, T]`
    against a block of pages `k [B, M, K, P, H]` at key positions `k_pos` (`[S]` or
    `[B, S]`, S = M * P), and the mask (a key is seen iff its position <= the query's)."""
    kv, g = qg.shape[2], qg.shape[3]
    if k_scale is not None:
        k = k.astype(qg.dtype)
    s = _page_scores(qg, k, k_scale) * inv
    k_pos = jnp.broadcast_to(k_pos, (qg.shape[0], s.shape[-1]))
    if slopes is not None:
        dist = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)
        s = s + slopes.reshape(kv, g)[None, :, :, None, None] * dist[:, None, None]
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]
    return jnp.where(mask, s, MASK), mask


def _as_pages(k, v, k_scale, v_scale):
    """A contiguous block `[B, K, S, H]` as one page of S keys (a free reshape)."""
    if k.ndim == 5:
        return k, v, k_scale, v_scale
    if k_scale is None:
        return k[:, None], v[:, None], None, None
    return k[:, None], v[:, None], k_scale[:, None], v_scale[:, None]


def _finish(z, acc, shape, dtype):
    b, t, n, h = shape
    out = jnp.where(z[..., None] > 0, acc / jnp.where(z > 0, z, 1.0)[..., None], 0.0)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(dtype)


def attend_blocks(q, q_pos, block, block_len: int, max_blocks: int, slopes=None):
    """Causal attention streamed over key blocks with an online softmax, visiting only
    the blocks some query can see (a run-time trip count: the cost follows the tokens
    in the cache, not its capacity, and nothing is copied but one block at a time).

    Args:
      q: `[B, T, N, H]`; q_pos: int32 `[B, T]` (-1: a padding query, sees nothing).
      block: `i -> (start, k, v, k_scale, v_scale)`: keys / values at positions
        `[start, start + block_len)` as `[B, K, block_len, H]`, or as pages
        `[B, M, K, block_len // M, H]` (int8 with float32 scales `[B, K, block_len]` /
        `[B, M, K, block_len // M]`, else scales None), where start <= i * block_len
        (a last block may overlap the one before: keys before i * block_len are
        skipped); i is traced.
      block_len: keys per block (static). max_blocks: blocks that exist (static).
      slopes: optional ALiBi slopes `[N]`.
    Returns:
      `[B, T, N, H]` in q's dtype; `attend`'s numbers up to float32 rounding (the
      softmax is summed block by block), zeros for a query that sees no key.
    """
    b, t, n, h = q.shape
    k_shape = jax.eval_shape(block, jnp.int32(0))[1].shape
    kv = k_shape[2] if len(k_shape) == 5 else k_shape[1]
    qg = q.reshape(b, t, kv, n // kv, h)
    inv = 1.0 / jnp.sqrt(jnp.float32(h))
    last = jnp.max(q_pos)
    count = jnp.clip(last // block_len + 1, 0, max_blocks)

    def body(i, carry):
        m, z, acc = carry
        start, k, v, k_scale, v_scale = block(i)
        k, v, k_scale, v_scale = _as_pages(k, v, k_scale, v_scale)
        k_pos = start + jnp.arange(block_len)
        s, mask = _block_scores(qg, q_pos, k_pos, k, k_scale, slopes, inv)
        # keys before i * block_len (an overlapping last block) were seen already
        mask = mask & (k_pos >= i * block_len)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK), axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)
        z = z * scale + jnp.sum(p, axis=-1)
        if v_scale is not None:
            v = v.astype(q.dtype)
        return m_new, z, acc * scale[..., None] + _page_values(p, v, v_scale)

    g = n // kv
    init = (jnp.full((b, kv, g, t), MASK, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
            jnp.zeros((b, kv, g, t, h), jnp.float32))
    _, z, acc = jax.lax.fori_loop(0, count, body, init)
    return _finish(z, acc, q.shape, q.dtype)


def attend_ragged(q, q_pos, block, block_len: int, max_blocks: int, slopes=None):
    """`attend_blocks` visiting only each row's own blocks: the (row, block) pairs some
    query of the row can see are packed B to a loop step, so rows of different lengths
    cost the blocks they have, not B times the furthest row's. Each step's pairs give
    softmax partials that are merged into their rows (log-sum-exp); a row may appear
    more than once in a step.

    Args:
      q, q_pos, block_len, max_blocks, slopes: as `attend_blocks`.
      block: `(rows, blocks) -> (k, v, k_scale, v_scale)`: for B pairs (int32 `[B]`
        each, traced), block `blocks[i]` of row `rows[i]` (keys at positions
        `[blocks[i] * block_len, (blocks[i] + 1) * block_len)`) as pages
        `[B, M, K, block_len // M, H]` (scales `[B, M, K, block_len // M]` or None),
        or contiguous `[B, K, block_len, H]` (scales `[B, K, block_len]`).
    Returns:
      `[B, T, N, H]` in q's dtype, as `attend_blocks`.
    """
    b, t, n, h = q.shape
    zero = jnp.zeros((b,), jnp.int32)
    k_shape = jax.eval_shape(block, zero, zero)[0].shape
    kv = k_shape[2] if len(k_shape) == 5 else k_shape[1]
    g = n // kv
    qg = q.reshape(b, t, kv, g, h)
    inv = 1.0 / jnp.sqrt(jnp.float32(h))
    last = jnp.max(q_pos, axis=1)
    blocks = jnp.where(last >= 0, jnp.minimum(last // block_len + 1, max_blocks), 0)
    ends = jnp.cumsum(blocks)              # pair index at which each row's pairs end
    total = ends[-1]

    def body(j, carry):
        m, z, acc = carry
        pair = j * b + jnp.arange(b)
        row = jnp.searchsorted(ends, pair, side="right").astype(jnp.int32)  # b: none
        live = pair < total
        rc = jnp.minimum(row, b - 1)
        blk = jnp.where(live, pair - (ends[rc] - blocks[rc]), 0)
        k, v, k_scale, v_scale = _as_pages(*block(rc, blk))
        k_pos = blk[:, None] * block_len + jnp.arange(block_len)[None, :]
        qp = jnp.where(live[:, None], q_pos[rc], -1)
        s, mask = _block_scores(qg[rc], qp, k_pos, k, k_scale, slopes, inv)
        m_pair = jnp.max(s, axis=-1)
        p = jnp.where(mask, jnp.exp(s - m_pair[..., None]), 0.0)
        if v_scale is not None:
            v = v.astype(q.dtype)
        z_pair, acc_pair = jnp.sum(p, axis=-1), _page_values(p, v, v_scale)
        row = jnp.where(live, row, b)      # dropped by the scatters below
        m_new = m.at[row].max(m_pair, mode="drop")
        w = jnp.exp(m_pair - m_new[rc])    # pair -> its row's new maximum
        scale = jnp.exp(m - m_new)
        z = z * scale + jnp.zeros_like(z).at[row].add(z_pair * w, mode="drop")
        acc = acc * scale[..., None] + jnp.zeros_like(acc).at[row].add(
            acc_pair * w[..., None], mode="drop")
        return m_new, z, acc

    init = (jnp.full((b, kv, g, t), MASK, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
            jnp.zeros((b, kv, g, t, h), jnp.float32))
    _, z, acc = jax.lax.fori_loop(0, (total + b - 1) // b, body, init)
    return _finish(z, acc, q.shape, q.dtype)


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
