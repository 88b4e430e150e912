"""Context-phase (prefill) flash attention over a KV cache, causal by position.

The prompt's queries attend to cache slots: query (b, t) at absolute position
`positions[b, t]` sees slot s iff s <= positions[b, t] (and s < lengths[b] when given),
the mask of `ftjax.model.attend` with keys at positions 0..S-1. One program per
(row, query head, block of queries) runs FlashAttention-2's online softmax over key
blocks, stopping at the block's last visible slot, so the causal upper triangle is
never loaded.

Shape legend: B batch, T query length, N query heads, K kv heads, G = N // K,
S cache slots, H head width, L layers.

Limits: query heads of one kv head run in separate programs (prefill is compute-bound,
so re-reading K/V per query head costs little); T and S of any size (tails masked).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ftjax.numerics import MASK, attend
from pallas_kernels.decode_attention import LAYOUTS

_MIN_DOT = 16
_NEG = MASK


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block_q: int
    block_k: int
    h_pad: int


def _tiles(t: int, s: int, h: int, block_q: int, block_k: int) -> _Tiles:
    for name, v in (("block_q", block_q), ("block_k", block_k)):
        if v < _MIN_DOT or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= {_MIN_DOT}, got {v}")
    return _Tiles(block_q=min(block_q, max(_MIN_DOT, pl.next_power_of_2(t))),
                  block_k=min(block_k, max(_MIN_DOT, pl.next_power_of_2(s))),
                  h_pad=max(_MIN_DOT, pl.next_power_of_2(h)))


def _dot(a, b, trans_b=False):
    exact = a.dtype == jnp.float32  # float32 stays IEEE fp32 (no TF32 rounding)
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def _kernel(index_ref, length_ref, pos_ref, q_ref, k_ref, v_ref, *rest, tl: _Tiles, t: int,
            s: int, h: int, g: int, has_alibi: bool, heads_first: bool):
    """One (row, query head, query block).

    Refs: index `[2]` (layer, first kv head), length `[]`, positions `[block_q]`,
    q `[block_q, h_pad]`, k/v `[L, Kc, S, h_pad]` ("BKSH") or `[L, S, Kc, h_pad]`
    (every kv head of the cache), optional slope `[1]`; out `[block_q, h_pad]`.
    """
    slope_ref, o_ref = rest if has_alibi else (None, rest[0])
    layer = index_ref[0]
    # This query head's kv head, read in place (see decode_attention's kv_head).
    head = index_ref[1] + pl.program_id(1) // g
    qb = pl.program_id(2)
    q_rows = qb * tl.block_q + jnp.arange(tl.block_q) < t
    h_mask = jnp.arange(tl.h_pad) < h
    q = plgpu.load(q_ref, mask=q_rows[:, None] & h_mask[None, :], other=0)
    pos = plgpu.load(pos_ref, mask=q_rows, other=-1)
    # Keys visible to any query of this block: slots < min(max position + 1, length, S).
    end = jnp.minimum(jnp.minimum(pos.max() + 1, length_ref[()]), s)
    n_blocks = pl.cdiv(jnp.maximum(end, 0), tl.block_k)
    sm_scale = 1.0 / math.sqrt(h)
    slope = slope_ref[0] if has_alibi else None

    def at(ref, rows):
        return ref.at[layer, head, rows, :] if heads_first else ref.at[layer, rows, head, :]

    def body(j, carry):
        o, m, l = carry
        rows = pl.ds(j * tl.block_k, tl.block_k)
        slots = j * tl.block_k + jnp.arange(tl.block_k)
        in_cache = slots < end
        kv_mask = in_cache[:, None] & h_mask[None, :]
        k = plgpu.load(at(k_ref, rows), mask=kv_mask, other=0)
        sc = _dot(q, k.astype(q.dtype), trans_b=True) * sm_scale     # [block_q, block_k]
        if has_alibi:
            sc = sc + slope * (slots[None, :] - pos[:, None]).astype(jnp.float32)
        visible = in_cache[None, :] & (slots[None, :] <= pos[:, None])
        sc = jnp.where(visible, sc, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(sc - m_new[:, None]), 0.0)
        v = plgpu.load(at(v_ref, rows), mask=kv_mask, other=0)
        o = o * corr[:, None] + _dot(p.astype(q.dtype), v.astype(q.dtype))
        return o, m_new, l * corr + p.sum(axis=1)

    init = (jnp.zeros((tl.block_q, tl.h_pad), jnp.float32),
            jnp.full((tl.block_q,), _NEG, jnp.float32),
            jnp.zeros((tl.block_q,), jnp.float32))
    o, _, l = jax.lax.fori_loop(0, n_blocks, body, init)
    # Padded query rows (t >= T) see nothing: keep them finite, they are not stored.
    o = o / jnp.where(l > 0, l, 1.0)[:, None]
    plgpu.store(o_ref, o.astype(o_ref.dtype), mask=q_rows[:, None] & h_mask[None, :])


@functools.partial(jax.jit, static_argnames=("layout", "block_q", "block_k", "num_warps",
                                             "num_stages", "interpret"))
def prefill_attention(q, k_cache, v_cache, positions, lengths=None, *, alibi_slopes=None,
                      layer=None, kv_head=None, layout: str = "BKSH", block_q: int = 64,
                      block_k: int = 64,
                      num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Causal attention of a prompt's queries over the cache they were written to.

    Args:
      q: `[B, T, N, H]` float32 / bfloat16 / float16.
      k_cache, v_cache: `[B, S, K, H]` ("BSKH") or `[B, K, S, H]` ("BKSH"), q's dtype;
        with `layer`, a leading layers axis `[L, ...]` and the kernel reads that layer.
      positions: int `[B, T]` absolute query positions; slot s is visible iff
        s <= positions[b, t].
      lengths: optional int `[B]`: additionally hides slots >= lengths[b].
      alibi_slopes: optional `[N]`: adds slope[n] * (slot - position).
      layer: optional int32 scalar (may be traced), see k_cache.
      kv_head: optional int32 scalar (may be traced): every query head attends kv head
        `kv_head` of the cache, whatever K it holds (a tensor rank whose query heads
        share one replicated kv head: GQA / MQA with K < TP).
      block_q, block_k: query / key block sizes (powers of two >= 16).
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      `[B, T, N, H]` in q's dtype; softmax scale 1 / sqrt(H), float32 softmax.
      A query that sees no slot returns zeros.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b, t, n, h = q.shape
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be [B, ...] (or [L, B, ...] with layer=) and equal, "
                         f"got k {k_cache.shape}, v {v_cache.shape}")
    n_layers = k_cache.shape[0]
    if layout == "BSKH":
        _, bk, s, kv, hk = k_cache.shape
    else:
        _, bk, kv, s, hk = k_cache.shape
    kv_cache = kv
    if kv_head is not None:
        kv = 1   # all n query heads over the chosen kv head
    if bk != b or hk != h or n % kv:
        raise ValueError(f"q {q.shape} does not match caches {k_cache.shape} ({layout}); "
                         "N must be a multiple of K")
    if positions.shape != (b, t):
        raise ValueError(f"positions must be [B, T]=[{b}, {t}], got {positions.shape}")
    g = n // kv
    tl = _tiles(t, s, h, block_q, block_k)
    if lengths is None:
        lengths = jnp.full((b,), s, jnp.int32)

    # Blocks hold every kv head of the cache; the kernel indexes its own one.
    if layout == "BSKH":
        kv_spec = pl.BlockSpec((n_layers, None, s, kv_cache, tl.h_pad),
                               lambda i, j, p: (0, i, 0, 0, 0))
    else:
        kv_spec = pl.BlockSpec((n_layers, None, kv_cache, s, tl.h_pad),
                               lambda i, j, p: (0, i, 0, 0, 0))
    index = jnp.stack([jnp.asarray(layer, jnp.int32),
                       jnp.asarray(0 if kv_head is None else kv_head, jnp.int32)])
    args = [index, lengths.astype(jnp.int32), positions.astype(jnp.int32), q, k_cache, v_cache]
    in_specs = [pl.BlockSpec((2,), lambda i, j, p: (0,)),
                pl.BlockSpec((None,), lambda i, j, p: (i,)),
                pl.BlockSpec((None, tl.block_q), lambda i, j, p: (i, p)),
                pl.BlockSpec((None, tl.block_q, None, tl.h_pad), lambda i, j, p: (i, p, j, 0)),
                kv_spec, kv_spec]
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((1,), lambda i, j, p: (j,)))
    kernel = functools.partial(_kernel, tl=tl, t=t, s=s, h=h, g=g,
                               has_alibi=alibi_slopes is not None, heads_first=layout == "BKSH")
    return pl.pallas_call(
        kernel,
        grid=(b, n, pl.cdiv(t, tl.block_q)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, tl.block_q, None, tl.h_pad), lambda i, j, p: (i, p, j, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ftjax_prefill_attention",
    )(*args)


def prefill_attention_reference(q, k_cache, v_cache, positions, lengths=None, *,
                                alibi_slopes=None, layer=None, kv_head=None,
                                layout: str = "BKSH"):
    """`prefill_attention`'s arguments through the model's own attention
    (`ftjax.numerics.attend`, float32 math): the one reference."""
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    if kv_head is not None:
        axis = 2 if layout == "BSKH" else 1
        k_cache = jax.lax.dynamic_slice_in_dim(k_cache, kv_head, 1, axis)
        v_cache = jax.lax.dynamic_slice_in_dim(v_cache, kv_head, 1, axis)
    heads_first = layout == "BKSH"
    s = k_cache.shape[2] if heads_first else k_cache.shape[1]
    out = attend(q.astype(jnp.float32), k_cache.astype(jnp.float32),
                 v_cache.astype(jnp.float32), positions, jnp.arange(s), alibi_slopes,
                 heads_first=heads_first, k_len=lengths)
    return out.astype(q.dtype)
