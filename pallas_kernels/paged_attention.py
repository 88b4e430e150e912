"""Paged decode attention: one new query token per sequence over a paged KV cache.

The cache is a pool of fixed-size pages shared by all sequences (vLLM's PagedAttention):
keys and values `[L, P, K, page_size, H]`; row b's token t lives in page
`page_table[b, t // page_size]` at offset `t % page_size`. Page 0 is a reserved null
page: unused page-table entries point there, so a stray read is always in bounds.

Flash-decoding on the Pallas Triton backend, as `decode_attention`: one program per
(batch row, kv head, split of the row's pages) runs an online softmax (float32) over
blocks of `pages_per_block` pages, gathering each block's pages through the page table;
a small jnp pass merges the splits. The G = N // K query heads of one kv head are
processed together, so each page is read once per kv head.

Shape legend: B batch, N query heads, K kv heads, G = N // K, L layers, P pool pages,
H head width, M max pages per sequence (page-table width).

Validity: token t of row b is attended iff t < lengths[b]; pages past a row's length
are never loaded, so cost follows the real context length, not M * page_size.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# One online-softmax merge, dot and "minus infinity" for both decode kernels.
from pallas_kernels.decode_attention import (_MIN_DOT, _NEG, _dot, run_blocks, split_call,
                                             decode_attention_reference)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    page_size: int
    pages_per_block: int   # pages gathered per inner-loop block (power of two)
    pages_per_split: int   # pages per split (a multiple of pages_per_block)
    num_splits: int        # programs along the page axis
    g_pad: int             # query heads per kv head, padded (power of two, >= 16)
    h_pad: int             # head width, padded (power of two, >= 16)


def _pow2(x: int) -> bool:
    return x >= 1 and not x & (x - 1)


def _tiles(max_pages: int, page_size: int, g: int, h: int, pages_per_block,
           num_splits) -> _Tiles:
    """Chooses the page blocking and the split of the page-table row."""
    if not _pow2(page_size):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if pages_per_block is None:
        # tl.dot needs >= 16 keys per block; 64 keys per block amortize the loop.
        pages_per_block = max(1, 64 // page_size)
    if not _pow2(pages_per_block) or pages_per_block * page_size < _MIN_DOT:
        raise ValueError(f"pages_per_block must be a power of two with pages_per_block * "
                         f"page_size >= {_MIN_DOT}, got {pages_per_block} (page_size "
                         f"{page_size})")
    pages_per_block = min(pages_per_block,
                          max(pl.cdiv(_MIN_DOT, page_size), pl.next_power_of_2(max_pages)))
    if num_splits is None:
        # As decode_attention: enough splits to fill the GPU at small batch, each at
        # least 4 blocks long so its partial result is cheap to merge.
        num_splits = max(1, min(16, max_pages // (4 * pages_per_block)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    per_split = pages_per_block * pl.cdiv(pl.cdiv(max_pages, num_splits), pages_per_block)
    return _Tiles(page_size=page_size, pages_per_block=pages_per_block,
                  pages_per_split=per_split, num_splits=pl.cdiv(max_pages, per_split),
                  g_pad=max(_MIN_DOT, pl.next_power_of_2(g)),
                  h_pad=max(_MIN_DOT, pl.next_power_of_2(h)))


def _kernel(layer_ref, length_ref, table_ref, q_ref, k_ref, v_ref, *rest, t: _Tiles,
            num_pages: int, g: int, h: int, has_alibi: bool, has_scale: bool):
    """One (row, kv head, split): online softmax over this split's valid pages.

    Refs: layer `[1]`, length `[]`, table `[M]` (this row's pages), q `[g_pad, h_pad]`,
    k/v `[L * P, page_size, h_pad]` (this kv head), then optional slopes `[g_pad]`,
    optional k/v scales `[L * P, page_size]`; outputs o `[g_pad, h_pad]` (unnormalized,
    float32), m `[g_pad]` (running max), l `[g_pad]` (running sum).
    """
    rest = list(rest)
    slope_ref = rest.pop(0) if has_alibi else None
    ks_ref, vs_ref = (rest.pop(0), rest.pop(0)) if has_scale else (None, None)
    o_ref, m_ref, l_ref = rest
    ps, ppb = t.page_size, t.pages_per_block
    block_k = ppb * ps
    # Layers are folded into the page axis (row layer * P + page): one vector index
    # per gather, and the pool is read in place, never sliced per layer.
    base = layer_ref[0] * num_pages
    length = length_ref[()]
    first = pl.program_id(2) * t.pages_per_split
    last = jnp.minimum(first + t.pages_per_split, pl.cdiv(length, ps))
    n_blocks = pl.cdiv(jnp.maximum(last - first, 0), ppb)

    g_mask = jnp.arange(t.g_pad) < g
    h_mask = jnp.arange(t.h_pad) < h
    q = plgpu.load(q_ref, mask=g_mask[:, None] & h_mask[None, :], other=0)
    dot_dtype = q.dtype
    sm_scale = 1.0 / math.sqrt(h)
    slope = plgpu.load(slope_ref, mask=g_mask, other=0.0) if has_alibi else None

    def body(i, carry):
        o, m, l = carry
        p0 = first + i * ppb
        pidx = p0 + jnp.arange(ppb)
        # Entries past the row's last page read as the null page 0 (masked below).
        pages = plgpu.load(table_ref.at[pl.ds(p0, ppb)], mask=pidx < last, other=0)
        rows = base + pages
        tok = p0 * ps + jnp.arange(ppb)[:, None] * ps + jnp.arange(ps)[None, :]
        valid2 = tok < length                                     # [ppb, ps]
        kv_mask = valid2[:, :, None] & h_mask[None, None, :]

        # Gathers index every axis with an array (pointer arithmetic in Triton; the
        # interpreter takes no mix of array and slice indices).
        offs = jnp.arange(ps)

        def load(ref):
            idx = (rows[:, None, None], offs[None, :, None], jnp.arange(t.h_pad)[None, None, :])
            x = plgpu.load(ref.at[idx], mask=kv_mask, other=0)
            return x.reshape(block_k, t.h_pad).astype(dot_dtype)

        def load_scale(ref):
            x = plgpu.load(ref.at[rows[:, None], offs[None, :]], mask=valid2, other=0.0)
            return x.reshape(block_k)

        valid = valid2.reshape(block_k)
        # int8 pages: the int8 -> dtype cast is exact; scales multiply the scores
        # (per key) and the probabilities (per value), as ftjax.model.attend does.
        s = _dot(q, load(k_ref), trans_b=True)                    # [g_pad, block_k]
        if has_scale:
            s = s * load_scale(ks_ref)[None, :]
        s = s * sm_scale
        if has_alibi:
            dist = (p0 * ps + jnp.arange(block_k) - (length - 1)).astype(jnp.float32)
            s = s + slope[:, None] * dist[None, :]
        s = jnp.where(valid[None, :], s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_new = l * corr + p.sum(axis=1)
        if has_scale:
            p = p * load_scale(vs_ref)[None, :]
        o = o * corr[:, None] + _dot(p.astype(dot_dtype), load(v_ref))
        return o, m_new, l_new

    run_blocks(body, n_blocks, t, o_ref, m_ref, l_ref, g_mask, h_mask)


def _check(q, k_pages, v_pages, page_table, lengths, alibi_slopes, k_scale, v_scale):
    b, n, h = q.shape
    if k_pages.ndim != 5 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages / v_pages must both be [L, P, K, page_size, H], got "
                         f"{k_pages.shape} / {v_pages.shape}")
    n_layers, num_pages, kv, ps, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"q head width {h} != pages' head width {hk}")
    if n % kv:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, max_pages] with B={b}, got "
                         f"{page_table.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]=[{b}], got {lengths.shape}")
    if alibi_slopes is not None and alibi_slopes.shape != (n,):
        raise ValueError(f"alibi_slopes must be [N]=[{n}], got {alibi_slopes.shape}")
    quantized = k_pages.dtype == jnp.int8
    if quantized != (k_scale is not None) or (k_scale is None) != (v_scale is None):
        raise ValueError("int8 pages need k_scale and v_scale (and only int8 pages take them)")
    if quantized and not k_scale.shape == v_scale.shape == k_pages.shape[:4]:
        raise ValueError(f"k_scale / v_scale must be [L, P, K, page_size]={k_pages.shape[:4]}, "
                         f"got {k_scale.shape} / {v_scale.shape}")
    if not quantized and k_pages.dtype != q.dtype:
        raise ValueError(f"pages dtype {k_pages.dtype} must be q's ({q.dtype}) or int8")
    return n_layers, num_pages, kv, ps, quantized


def _as_stacked(layer, k_pages, v_pages, k_scale, v_scale):
    """layer=None: unstacked pools `[P, K, page_size, H]` get a unit layers axis."""
    if layer is not None:
        return layer, k_pages, v_pages, k_scale, v_scale
    add = (lambda a: None if a is None else a[None])
    return 0, add(k_pages), add(v_pages), add(k_scale), add(v_scale)


@functools.partial(jax.jit, static_argnames=("pages_per_block", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def paged_attention(q, k_pages, v_pages, page_table, lengths, *, layer=None,
                    alibi_slopes=None, k_scale=None, v_scale=None, pages_per_block=None,
                    num_splits=None, num_warps: int = 4, num_stages: int = 2,
                    interpret: bool = False):
    """Attention of one new token per sequence over its pages of a paged KV cache.

    Args:
      q: `[B, N, H]` float32 / bfloat16 / float16 queries (this step's token).
      k_pages, v_pages: pools `[L, P, K, page_size, H]` (`[P, K, page_size, H]` with
        layer=None), q's dtype or int8 (then pass scales); page_size a power of two.
      page_table: int32 `[B, M]`: row b's i-th page. Entries past a row's last page are
        never dereferenced (they are read as page 0, the null page); entries are
        clipped to [0, P).
      lengths: int32 `[B]`, valid tokens per row (values above M * page_size count as
        that); tokens >= lengths[b] are masked, a row of length 0 returns zeros.
      layer: int32 scalar (may be traced): the layer of the pools read, in place.
      alibi_slopes: optional float `[N]`: adds slope[n] * (t - (lengths[b] - 1)).
      k_scale, v_scale: float32 `[L, P, K, page_size]` per-token, per-kv-head scales of
        int8 pools (dequantized value = int8 * scale).
      pages_per_block: pages gathered per inner block (power of two; times page_size
        >= 16); None: 64 tokens' worth.
      num_splits: programs along the page axis (flash-decoding); None picks from M.
      num_warps, num_stages: Triton launch parameters.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      `[B, N, H]` in q's dtype. Softmax scale 1 / sqrt(H); scores and softmax in float32.
    """
    layer, k_pages, v_pages, k_scale, v_scale = _as_stacked(layer, k_pages, v_pages,
                                                            k_scale, v_scale)
    n_layers, num_pages, kv, ps, quantized = _check(q, k_pages, v_pages, page_table,
                                                    lengths, alibi_slopes, k_scale, v_scale)
    b, n, h = q.shape
    g = n // kv
    max_pages = page_table.shape[1]
    t = _tiles(max_pages, ps, g, h, pages_per_block, num_splits)
    rows = n_layers * num_pages
    # Clamps keep every read inside the pool, whatever the caller passes.
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * ps)
    page_table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)

    def pool_spec():
        return pl.BlockSpec((rows, None, ps, t.h_pad), lambda i, j, p: (0, j, 0, 0))

    def scale_spec():
        return pl.BlockSpec((rows, None, ps), lambda i, j, p: (0, j, 0))

    args = [jnp.asarray(layer, jnp.int32).reshape(1), lengths, page_table,
            q.reshape(b, kv, g, h),
            k_pages.reshape(rows, kv, ps, h), v_pages.reshape(rows, kv, ps, h)]
    in_specs = [pl.BlockSpec((1,), lambda i, j, p: (0,)),
                pl.BlockSpec((None,), lambda i, j, p: (i,)),
                pl.BlockSpec((None, max_pages), lambda i, j, p: (i, 0)),
                pl.BlockSpec((None, None, t.g_pad, t.h_pad), lambda i, j, p: (i, j, 0, 0)),
                pool_spec(), pool_spec()]
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(jnp.float32).reshape(kv, g))
        in_specs.append(pl.BlockSpec((None, t.g_pad), lambda i, j, p: (j, 0)))
    if quantized:
        args += [k_scale.astype(jnp.float32).reshape(rows, kv, ps),
                 v_scale.astype(jnp.float32).reshape(rows, kv, ps)]
        in_specs += [scale_spec(), scale_spec()]

    kernel = functools.partial(_kernel, t=t, num_pages=num_pages, g=g, h=h,
                               has_alibi=alibi_slopes is not None, has_scale=quantized)
    out = split_call(kernel, args, in_specs, t=t, part=(b, kv, t.num_splits, g), h=h,
                     dtype=q.dtype, num_warps=num_warps, num_stages=num_stages,
                     interpret=interpret, name="ftjax_paged_attention")
    return out.reshape(b, n, h)


def gather_pages(pages, page_table, layer=0):
    """Contiguous view of one layer's pages: `[L, P, K, ps, ...]` -> `[B, K, M * ps, ...]`.

    Works for pools (trailing H) and their scales (no trailing axis).
    """
    x = jnp.take(pages[layer], page_table, axis=0)        # [B, M, K, ps, ...]
    x = jnp.moveaxis(x, 2, 1)                             # [B, K, M, ps, ...]
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, layer=None,
                              alibi_slopes=None, k_scale=None, v_scale=None):
    """Plain-jnp paged attention with `paged_attention`'s arguments (float32 math):
    gathers the row's pages into a contiguous cache, then `decode_attention_reference`."""
    layer, k_pages, v_pages, k_scale, v_scale = _as_stacked(layer, k_pages, v_pages,
                                                            k_scale, v_scale)
    _check(q, k_pages, v_pages, page_table, lengths, alibi_slopes, k_scale, v_scale)
    page_table = jnp.clip(page_table, 0, k_pages.shape[1] - 1)
    k, v = gather_pages(k_pages, page_table, layer), gather_pages(v_pages, page_table, layer)
    if k_scale is not None:
        k_scale = gather_pages(k_scale, page_table, layer)
        v_scale = gather_pages(v_scale, page_table, layer)
    out = decode_attention_reference(q, k, v, lengths, alibi_slopes=alibi_slopes,
                                     k_scale=k_scale, v_scale=v_scale, layout="BKSH")
    # A row with no tokens attends to nothing: zeros, as the kernel (not 0 / 0).
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)
