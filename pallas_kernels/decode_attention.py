"""Decode (generation-phase) attention: one new query token per sequence over a KV cache.

Flash-decoding on the Pallas Triton backend: the cache's slot axis S is cut into
`num_splits` contiguous splits; one program per (batch row, kv head, split) runs an
online softmax (float32) over blocks of `block_s` slots and writes an unnormalized
partial output with its running max and sum; a small jnp pass then merges the splits.
The G = N // K query heads that share one kv head are processed together, so every
key/value block is read once per kv head (MQA / GQA read K times less than MHA).

Shape legend: B batch, N query heads, K kv heads, G = N // K, S cache slots, H head width.

Validity: slot s of row b is attended iff s < lengths[b]; blocks past a row's length
are never loaded, so decode cost follows the real context length, not S.

Tiling (`_tiles`) is kept apart from the kernel body so another backend (e.g. Mosaic
GPU) can reuse the wrapper's split / merge logic.
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

LAYOUTS = ("BSKH", "BKSH")
# tl.dot needs every operand dimension >= 16: query-head groups and head widths
# are padded up to this inside the block (masked loads, nothing copied in HBM).
_MIN_DOT = 16
_NEG = MASK


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block_s: int      # slots per inner-loop block (power of two, >= 16)
    split_len: int    # slots per split (a multiple of block_s)
    num_splits: int   # programs along S
    g_pad: int        # query heads per kv head, padded (power of two, >= 16)
    h_pad: int        # head width, padded (power of two, >= 16)


def _tiles(s: int, g: int, h: int, block_s: int, num_splits) -> _Tiles:
    """Chooses power-of-two blocks and the S split for a cache of S slots."""
    if block_s < _MIN_DOT or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= {_MIN_DOT}, got {block_s}")
    block_s = min(block_s, max(_MIN_DOT, pl.next_power_of_2(s)))
    if num_splits is None:
        # Enough splits to fill the GPU at small batch, each split still long
        # enough (>= 4 blocks) that its partial result is cheap to merge.
        num_splits = max(1, min(16, s // (4 * block_s)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split_len = block_s * pl.cdiv(pl.cdiv(s, num_splits), block_s)
    return _Tiles(block_s=block_s, split_len=split_len, num_splits=pl.cdiv(s, split_len),
                  g_pad=max(_MIN_DOT, pl.next_power_of_2(g)),
                  h_pad=max(_MIN_DOT, pl.next_power_of_2(h)))


def _dot(a, b, trans_b=False):
    """float32-accumulating dot; float32 inputs stay IEEE fp32 (no TF32 rounding)."""
    exact = a.dtype == jnp.float32
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if exact else None)


def _kernel(index_ref, length_ref, q_ref, k_ref, v_ref, *rest, t: _Tiles, g: int, h: int,
            has_alibi: bool, has_scale: bool, heads_first: bool):
    """One (row, kv head, split): online softmax over this split's valid slots.

    Refs: index `[2]` (layer, first kv head), length `[]`, q `[g_pad, h_pad]`, k/v
    `[L, Kc, split_len, h_pad]` ("BKSH") or `[L, split_len, Kc, h_pad]` ("BSKH") with
    every kv head Kc of the cache, then optional slopes `[g_pad]`, optional k/v scales
    `[L, Kc, split_len]` / `[L, split_len, Kc]`; outputs o `[g_pad, h_pad]` (unnormalized,
    float32), m `[g_pad]` (running max), l `[g_pad]` (running sum).
    """
    rest = list(rest)
    slope_ref = rest.pop(0) if has_alibi else None
    ks_ref, vs_ref = (rest.pop(0), rest.pop(0)) if has_scale else (None, None)
    o_ref, m_ref, l_ref = rest
    # Layer and kv head are picked inside the kernel: the model's whole [L, ...] cache
    # comes in without a per-layer slice copy in HBM, and a tensor rank holding
    # replicated kv heads (K < TP) reads only its own one (the first-head offset).
    # (One indexer per load: Triton lowering does not compose `.at[layer].at[rows]`.)
    layer = index_ref[0]
    head = index_ref[1] + pl.program_id(1)
    split = pl.program_id(2)
    length = length_ref[()]
    start = split * t.split_len
    end = jnp.minimum(start + t.split_len, length)
    n_blocks = pl.cdiv(jnp.maximum(end - start, 0), t.block_s)

    g_mask = jnp.arange(t.g_pad) < g
    h_mask = jnp.arange(t.h_pad) < h
    q = plgpu.load(q_ref, mask=g_mask[:, None] & h_mask[None, :], other=0)
    dot_dtype = q.dtype
    sm_scale = 1.0 / math.sqrt(h)
    slope = None
    if has_alibi:
        slope = plgpu.load(slope_ref, mask=g_mask, other=0.0)

    def load_kv(ref, scale_ref, rows, valid):
        at = ref.at[layer, head, rows, :] if heads_first else ref.at[layer, rows, head, :]
        x = plgpu.load(at, mask=valid[:, None] & h_mask[None, :], other=0)
        if scale_ref is not None:
            # int8 cache: dequantize per (slot, kv head) before the tensor-core dot.
            at = (scale_ref.at[layer, head, rows] if heads_first
                  else scale_ref.at[layer, rows, head])
            sc = plgpu.load(at, mask=valid, other=0.0)
            x = x.astype(jnp.float32) * sc[:, None]
        return x.astype(dot_dtype)

    def body(i, carry):
        o, m, l = carry
        rows = pl.ds(i * t.block_s, t.block_s)
        slots = start + i * t.block_s + jnp.arange(t.block_s)
        valid = slots < end
        k = load_kv(k_ref, ks_ref, rows, valid)
        s = _dot(q, k, trans_b=True) * sm_scale  # [g_pad, block_s]
        if has_alibi:
            dist = (slots - (length - 1)).astype(jnp.float32)
            s = s + slope[:, None] * dist[None, :]
        s = jnp.where(valid[None, :], s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = load_kv(v_ref, vs_ref, rows, valid)
        o = o * corr[:, None] + _dot(p.astype(dot_dtype), v)
        return o, m_new, l * corr + p.sum(axis=1)

    run_blocks(body, n_blocks, t, o_ref, m_ref, l_ref, g_mask, h_mask)


def run_blocks(body, n_blocks, t: _Tiles, o_ref, m_ref, l_ref, g_mask, h_mask):
    """Inside a decode kernel: the online softmax over `n_blocks` KV blocks from an empty
    state (`body(i, (o, m, l)) -> (o, m, l)`), then the stores of the unnormalized
    output, running max and sum that `_merge` combines across splits (shared by the
    contiguous and the paged kernels)."""
    init = (jnp.zeros((t.g_pad, t.h_pad), jnp.float32),
            jnp.full((t.g_pad,), _NEG, jnp.float32),
            jnp.zeros((t.g_pad,), jnp.float32))
    o, m, l = jax.lax.fori_loop(0, n_blocks, body, init)
    plgpu.store(o_ref, o, mask=g_mask[:, None] & h_mask[None, :])
    plgpu.store(m_ref, m, mask=g_mask)
    plgpu.store(l_ref, l, mask=g_mask)


def _merge(o, m, l, dtype):
    """Combines split partials: o `[B, K, P, G, H]`, m/l `[B, K, P, G]` -> `[B, K, G, H]`."""
    m_all = m.max(axis=2, keepdims=True)
    w = jnp.exp(m - m_all)                      # empty splits: exp(min - max) = 0
    denom = (l * w).sum(axis=2)
    num = (o * w[..., None]).sum(axis=2)
    # A row with length 0 has no keys: return zeros rather than 0 / 0.
    out = num / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnames=("layout", "block_s", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, k_scale=None,
                     v_scale=None, layer=None, kv_head=None, layout: str = "BSKH",
                     block_s: int = 64,
                     num_splits=None, num_warps: int = 4, num_stages: int = 2,
                     interpret: bool = False):
    """Attention of one new token per sequence over its cached keys and values.

    Args:
      q: `[B, N, H]` float32 / bfloat16 / float16 queries (this step's token).
      k_cache, v_cache: `[B, S, K, H]` (layout "BSKH") or `[B, K, S, H]` (layout "BKSH",
        ftjax's own `KVCache` layer slice), q's dtype or int8 (then pass scales).
      lengths: int32 `[B]`, valid slots per row (>= 1; values above S count as S):
        slots >= lengths[b] are masked.
      alibi_slopes: optional float `[N]`: adds slope[n] * (slot - (lengths[b] - 1)).
      k_scale, v_scale: float32 per-(slot, kv head) scales for int8 caches, `[B, S, K]`
        ("BSKH") or `[B, K, S]` ("BKSH"); dequantized value = int8 * scale.
      layer: optional int32 scalar (may be traced). Then caches and scales carry a
        leading layers axis (`[L, B, K, S, H]`, `[L, B, K, S]` for "BKSH") and the kernel
        reads layer `layer` in place: no slice of the cache is copied.
      kv_head: optional int32 scalar (may be traced): every query head attends kv head
        `kv_head` of the cache (read in place), whatever K the cache holds. For a tensor
        rank whose query heads share one replicated kv head (GQA / MQA with K < TP).
      layout: "BSKH" or "BKSH". block_s: slots per inner block (power of two >= 16).
      num_splits: programs along S (flash-decoding); None picks from S.
      num_warps, num_stages: Triton launch parameters.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      `[B, N, H]` in q's dtype. Softmax scale 1 / sqrt(H); softmax in float32.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b, n, h = q.shape
    if layer is None:
        # One "layer": a leading unit axis costs nothing (a reshape, no copy).
        k_cache, v_cache = k_cache[None], v_cache[None]
        if k_scale is not None and v_scale is not None:
            k_scale, v_scale = k_scale[None], v_scale[None]
        layer = 0
    if k_cache.ndim != 5:
        raise ValueError(f"with layer=, caches must be [L, B, ...] (5-d), got {k_cache.shape}")
    n_layers = k_cache.shape[0]
    if layout == "BSKH":
        _, _, s, kv, hk = k_cache.shape
    else:
        _, _, kv, s, hk = k_cache.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[1] != b or hk != h:
        raise ValueError(f"q {q.shape} and caches k {k_cache.shape}, v {v_cache.shape} "
                         f"do not match layout {layout}")
    kv_cache = kv
    if kv_head is not None:
        kv = 1   # all n query heads form one group over the chosen kv head
    if n % kv:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]=[{b}], got {lengths.shape}")
    quantized = k_cache.dtype == jnp.int8
    if quantized != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("int8 caches need k_scale and v_scale (and only int8 caches take them)")
    scale_shape = (n_layers,) + ((b, s, kv_cache) if layout == "BSKH" else (b, kv_cache, s))
    if quantized and (k_scale.shape != scale_shape or v_scale.shape != scale_shape):
        raise ValueError(f"k_scale/v_scale must be {scale_shape} for layout {layout}, got "
                         f"{k_scale.shape} / {v_scale.shape}")
    g = n // kv
    t = _tiles(s, g, h, block_s, num_splits)

    # Blocks hold every kv head (Kc) of the cache; the kernel indexes its own one.
    def kv_spec():
        if layout == "BSKH":
            return pl.BlockSpec((n_layers, None, t.split_len, kv_cache, t.h_pad),
                                lambda i, j, p: (0, i, p, 0, 0))
        return pl.BlockSpec((n_layers, None, kv_cache, t.split_len, t.h_pad),
                            lambda i, j, p: (0, i, 0, p, 0))

    def scale_spec():
        if layout == "BSKH":
            return pl.BlockSpec((n_layers, None, t.split_len, kv_cache),
                                lambda i, j, p: (0, i, p, 0))
        return pl.BlockSpec((n_layers, None, kv_cache, t.split_len),
                            lambda i, j, p: (0, i, 0, p))

    # Clamped to S: the kernel never reads a slot past the cache, whatever it is given.
    lengths = jnp.minimum(lengths.astype(jnp.int32), s)
    first_head = 0 if kv_head is None else kv_head
    index = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(first_head, jnp.int32)])
    args = [index, lengths, q.reshape(b, kv, g, h), k_cache, v_cache]
    in_specs = [pl.BlockSpec((2,), lambda i, j, p: (0,)),
                pl.BlockSpec((None,), lambda i, j, p: (i,)),
                pl.BlockSpec((None, None, t.g_pad, t.h_pad), lambda i, j, p: (i, j, 0, 0)),
                kv_spec(), kv_spec()]
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(jnp.float32).reshape(kv, g))
        in_specs.append(pl.BlockSpec((None, t.g_pad), lambda i, j, p: (j, 0)))
    if quantized:
        args += [k_scale.astype(jnp.float32), v_scale.astype(jnp.float32)]
        in_specs += [scale_spec(), scale_spec()]

    kernel = functools.partial(_kernel, t=t, g=g, h=h, has_alibi=alibi_slopes is not None,
                               has_scale=quantized, heads_first=layout == "BKSH")
    out = split_call(kernel, args, in_specs, t=t, part=(b, kv, t.num_splits, g), h=h,
                     dtype=q.dtype, num_warps=num_warps, num_stages=num_stages,
                     interpret=interpret, name="ftjax_decode_attention")
    return out.reshape(b, n, h)


def split_call(kernel, args, in_specs, *, t: _Tiles, part, h: int, dtype, num_warps: int,
               num_stages: int, interpret: bool, name: str):
    """Runs a flash-decoding kernel over the grid (batch row, kv head, split) and merges
    the splits (shared by the contiguous and the paged decode kernels).

    Args:
      part: (B, K, splits, G), the shape of the per-split running max and sum.
    Returns:
      `[B, K, G, H]` in `dtype`.
    """
    o, m, l = pl.pallas_call(
        kernel,
        grid=part[:3],
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, t.g_pad, t.h_pad), lambda i, j, p: (i, j, p, 0, 0)),
            pl.BlockSpec((None, None, None, t.g_pad), lambda i, j, p: (i, j, p, 0)),
            pl.BlockSpec((None, None, None, t.g_pad), lambda i, j, p: (i, j, p, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(part + (h,), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        # Explicit Triton params: the kernel never silently moves to another backend.
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return _merge(o, m, l, dtype)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, alibi_slopes=None,
                               k_scale=None, v_scale=None, layer=None, kv_head=None,
                               layout: str = "BSKH"):
    """`decode_attention`'s arguments through the model's own attention
    (`ftjax.numerics.attend`, float32 math): the one reference."""
    if layer is not None:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
        if k_scale is not None:
            k_scale, v_scale = k_scale[layer], v_scale[layer]
    if kv_head is not None:
        axis = 2 if layout == "BSKH" else 1
        pick = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=kv_head,
                                 slice_size=1, axis=axis)
        k_cache, v_cache = pick(k_cache), pick(v_cache)
        if k_scale is not None:
            k_scale, v_scale = pick(k_scale), pick(v_scale)
    heads_first = layout == "BKSH"
    s = k_cache.shape[2] if heads_first else k_cache.shape[1]
    lengths = jnp.minimum(lengths, s)
    k, v = k_cache.astype(jnp.float32), v_cache.astype(jnp.float32)
    out = attend(q.astype(jnp.float32)[:, None], k, v, (lengths - 1)[:, None], jnp.arange(s),
                 alibi_slopes, heads_first=heads_first, k_scale=k_scale, v_scale=v_scale,
                 k_len=lengths)
    return out[:, 0].astype(q.dtype)
