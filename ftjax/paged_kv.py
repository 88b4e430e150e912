"""The paged KV cache on device: a pool of fixed-size pages shared by all sequences.

Layout: `k`, `v` are `[L, P, K, page_size, H]`; with an int8 cache, `k_scale`,
`v_scale` are float32 `[L, P, K, page_size]` (one absmax / 127 scale per written token
and kv head, as the contiguous `KVCache`). A page table `[slots, M]` (int32, M max pages
per sequence) maps a sequence's i-th page to a pool page: token position t of the
sequence in page-table row r lives at `page_table[r, t // page_size]`, offset
`t % page_size`. Page 0 is a reserved null page: unused page-table entries point at
it; writes aimed at it are dropped, reads of it are always masked.

Everything here is a pure, jittable function of arrays (pytree in, pytree out); which
pages a sequence owns is decided on the host (`ftjax.blocks.BlockManager`).

Shape legend as `ftjax.model`: B batch, T tokens per row, L layers, K kv heads, H head
width, N query heads, S contiguous key slots; P pool pages, M page-table width.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax import numerics
from ftjax.numerics import quantize_vectors
from pallas_kernels import cpu_paged_attention, paged_attention
from pallas_kernels.paged_attention import gather_pages

KV_DTYPES = (None, "int8")


@flax.struct.dataclass
class PagedKV:
    """The page pools of every layer (see the module docstring for the layout)."""

    k: jax.Array
    v: jax.Array
    k_scale: Optional[jax.Array] = None
    v_scale: Optional[jax.Array] = None

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


def _check_kv_dtype(kv_dtype):
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")


def zeros(cfg: ModelConfig, num_pages: int, page_size: int, dtype,
          kv_dtype=None, kernels: str = "xla") -> PagedKV:
    """An empty pool of `num_pages` pages (page 0 included: it is the null page).

    Args:
      cfg: the model (L, K, H).
      num_pages: P >= 2. page_size: tokens per page, a power of two (the kernel's).
      dtype: the model dtype; kv_dtype: None (pages in `dtype`) or "int8" (+ scales).
      kernels: the `attend` kernels, for the storage dtype (`numerics.kv_storage`).
    """
    _check_kv_dtype(kv_dtype)
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    shape = (cfg.n_layers, num_pages, cfg.n_kv_heads, page_size, cfg.head_dim)
    # jnp.zeros, not jnp.empty: new jax returns uninitialized memory for empty.
    if kv_dtype == "int8":
        return PagedKV(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
                       k_scale=jnp.zeros(shape[:-1], jnp.float32),
                       v_scale=jnp.zeros(shape[:-1], jnp.float32))
    dtype = numerics.kv_storage(dtype, kernels)
    return PagedKV(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def page_bytes(cfg: ModelConfig, page_size: int, dtype, kv_dtype=None) -> int:
    """Bytes of one page across all layers, keys and values (int8: with its scales)."""
    _check_kv_dtype(kv_dtype)
    tokens = cfg.n_layers * cfg.n_kv_heads * page_size
    if kv_dtype == "int8":
        return 2 * tokens * (cfg.head_dim + 4)      # int8 values + a float32 scale each
    return 2 * tokens * cfg.head_dim * jnp.dtype(dtype).itemsize


def pages_for_budget(cfg: ModelConfig, kv_memory: int, page_size: int, dtype,
                     kv_dtype=None) -> int:
    """How many pages (the null page included) fit in `kv_memory` bytes of cache.

    Raises:
      ValueError: the budget holds fewer than 2 pages (the null page and one more).
    """
    per_page = page_bytes(cfg, page_size, dtype, kv_dtype)
    pages = int(kv_memory) // per_page
    if pages < 2:
        raise ValueError(f"kv_memory={kv_memory} bytes holds {pages} page(s) of {per_page} "
                         f"bytes (page_size={page_size}); at least 2 are needed (page 0 is "
                         f"the null page)")
    return pages


def _locate(kv: PagedKV, page_table, slots, positions):
    """Pool page and offset of each (row, position); dropped writes get page P."""
    if slots is not None:
        page_table = page_table[slots]
    m, ps = page_table.shape[1], kv.page_size
    positions = positions.astype(jnp.int32)
    idx = jnp.clip(positions // ps, 0, m - 1)
    page = jnp.take_along_axis(page_table.astype(jnp.int32), idx, axis=1)
    ok = (positions >= 0) & (positions < m * ps) & (page > 0)
    return jnp.where(ok, page, kv.num_pages), positions % ps


def write(kv: PagedKV, layer, page_table, slots, positions, k, v) -> PagedKV:
    """Writes one layer's new keys / values into their pages.

    Args:
      kv: the pools.
      layer: int32 scalar (may be traced).
      page_table: int32 `[slots, M]`.
      slots: int32 `[B]`: the page-table row of each batch row, or None (row b = b).
      positions: int32 `[B, T]`: the token positions written. Positions < 0 (padding),
        past the table (>= M * page_size), or whose page entry is 0 (unallocated) are
        dropped. Two tokens aimed at one slot in one call: which one lands is undefined.
      k, v: `[B, T, K, H]` (int8 pools: quantized here, absmax / 127 per token and head).
    Returns:
      The updated `PagedKV` (the pools are donated by a jitted caller).
    """
    page, off = _locate(kv, page_table, slots, positions)

    def put(a, x):
        # [B, T, K, H] lands at [layer, page, :, off]: the (B, T) index dims come first.
        return numerics.scatter_set(a, (layer, page, slice(None), off), x, "drop")

    if kv.k_scale is None:
        return PagedKV(k=put(kv.k, k), v=put(kv.v, v))
    (kq, ks), (vq, vs) = quantize_vectors(k), quantize_vectors(v)
    return PagedKV(k=put(kv.k, kq), v=put(kv.v, vq),
                   k_scale=put(kv.k_scale, ks), v_scale=put(kv.v_scale, vs))


def gather(kv: PagedKV, layer, page_table, max_len: int):
    """A contiguous copy of one layer's keys / values (the `KVCache` layout), to inspect
    or check the pools; attention itself streams the pages (`attend_pages`).

    Args:
      kv: the pools. layer: int32 scalar (may be traced).
      page_table: int32 `[B, M]` (the rows of the batch, e.g. `table[slots]`).
      max_len: S, slots returned per row (static; <= M * page_size).
    Returns:
      (k, v) `[B, K, S, H]` and (k_scale, v_scale) float32 `[B, K, S]` (None for a
      float cache): the layout of one layer of the contiguous `KVCache`. Slots of
      unallocated pages hold the null page's (masked by position in attention).
    """
    m, ps = page_table.shape[1], kv.page_size
    if max_len > m * ps:
        raise ValueError(f"max_len={max_len} exceeds the page table's {m} pages x "
                         f"{ps} tokens")
    table = jnp.clip(page_table[:, :-(-max_len // ps)], 0, kv.num_pages - 1)

    def one(pool):
        return None if pool is None else gather_pages(pool, table, layer)[:, :, :max_len]

    return one(kv.k), one(kv.v), one(kv.k_scale), one(kv.v_scale)


def copy_pages(kv: PagedKV, src, dst) -> PagedKV:
    """Copies pool pages `src[i]` -> `dst[i]` in every layer (copy-on-write of a shared
    last page). src, dst: int32 `[n]`; pairs with dst <= 0 are padding (dropped), so a
    fixed-size list keeps one compiled shape. Destinations must be distinct."""
    src = jnp.clip(src.astype(jnp.int32), 0, kv.num_pages - 1)
    dst = jnp.where(dst > 0, dst, kv.num_pages).astype(jnp.int32)

    def one(a):
        return None if a is None else numerics.scatter_set(a, (slice(None), dst), a[:, src], "drop")

    return PagedKV(k=one(kv.k), v=one(kv.v), k_scale=one(kv.k_scale), v_scale=one(kv.v_scale))


def kernels_for(kernels: str, sharded: bool) -> str:
    """The `attend` kernels for an engine's `kernels` value: "cpu" (the native paged
    attention of `pallas_kernels.cpu_paged_attention`) in place of "xla" when the
    default backend is the CPU, the cache is not sharded over a mesh (the custom call
    has no partitioning rule) and the kernel builds on this machine; else `kernels`."""
    if (kernels == "xla" and not sharded and jax.default_backend() == "cpu"
            and cpu_paged_attention.available()):
        return "cpu"
    return kernels


def attend(kv: PagedKV, layer, q, q_pos, page_table, slopes=None, *, max_len: int,
           kernels: str = "xla", interpret: Optional[bool] = None):
    """Causal attention of queries over their rows' pages (after `write`).

    Args:
      kv: the pools. layer: int32 scalar (may be traced).
      q: `[B, T, N, H]`; q_pos: int32 `[B, T]` absolute positions (a key at position
        p is attended iff p <= the query's position).
      page_table: int32 `[B, M]`, the batch's rows.
      slopes: optional ALiBi slopes `[N]`.
      max_len: S, the key slots the XLA path may visit (static; >= every q_pos + 1).
      kernels: "xla" (`attend_pages`: the pages streamed block by block), "pallas" (decode,
        T == 1: `pallas_kernels.paged_attention` reads the pages in place; T > 1 falls
        back to the XLA path) or "cpu" (float32 queries, any T:
        `pallas_kernels.cpu_paged_attention` reads the pages in place; other dtypes
        take the XLA path; see `kernels_for`).
      interpret: run the Pallas kernel interpreted (default: off GPU).
    Returns:
      `[B, T, N, H]` in q's dtype.
    """
    if kernels not in ("xla", "pallas", "cpu"):
        raise ValueError(f"kernels must be 'xla', 'pallas' or 'cpu', got {kernels!r}")
    if kernels == "cpu" and cpu_paged_attention.supported(q, kv.k, kv.k_scale) is None:
        table = jnp.clip(page_table[:, :-(-max_len // kv.page_size)], 0, kv.num_pages - 1)
        return cpu_paged_attention.paged_attention(
            q, kv.k, kv.v, table, q_pos, layer, slopes, kv.k_scale, kv.v_scale).astype(q.dtype)
    if kernels == "pallas" and q.shape[1] == 1:
        if interpret is None:
            interpret = jax.default_backend() != "gpu"
        kv = _values(kv)
        out = paged_attention(q[:, 0], kv.k, kv.v, page_table, q_pos[:, 0] + 1, layer=layer,
                              alibi_slopes=slopes, k_scale=kv.k_scale, v_scale=kv.v_scale,
                              interpret=interpret)
        return out[:, None]
    return attend_pages(_values(kv), layer, q, q_pos, page_table, slopes, max_len=max_len)


def _values(kv: PagedKV) -> PagedKV:
    """Pools stored as bf16 bits (`numerics.kv_storage`) as bf16 values."""
    return kv.replace(k=numerics.kv_values(kv.k), v=numerics.kv_values(kv.v))


# Queries per row and kv head up to which `attend_pages` attends page by page.
PAGE_DOT_QUERIES = 8


def attend_pages(kv: PagedKV, layer, q, q_pos, page_table, slopes=None, *, max_len: int):
    """The XLA path of `attend`: `numerics.attend_ragged` over blocks of
    `numerics.KEY_BLOCK` keys (whole pages), each row only as far as its own queries
    reach, a block gathered at a time.

    Few queries per row (decode) see a block as its pages (`numerics._page_scores`,
    no copy of the block); many (prefill) see one contiguous copy of it, as per-page
    dots would copy the queries once per page instead. Measured against visiting every
    row up to the furthest one (gpt2-124m, 2-core AMD EPYC, in-process A/B): decode at
    8 rows of 50..600 tokens 0.92-0.93x the step time (8 rows of 330: 1.03x, the
    merge's cost); prefill calls of 4 x 64 tokens 0.93-0.99x."""
    m, ps = page_table.shape[1], kv.page_size
    if max_len > m * ps:
        raise ValueError(f"max_len={max_len} exceeds the page table's {m} pages x "
                         f"{ps} tokens")
    pages = -(-max_len // ps)
    blk = min(max(1, numerics.KEY_BLOCK // ps), pages)
    nb = -(-pages // blk)
    table = jnp.clip(page_table[:, :pages], 0, kv.num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, nb * blk - pages)))     # the null page
    table = table.reshape(table.shape[0], nb, blk)
    as_pages = q.shape[1] * q.shape[2] // kv.k.shape[2] <= PAGE_DOT_QUERIES

    def pairs(rows, blocks):
        ids = table[rows, blocks]                                              # [B, blk]
        # ids are clipped above: no out-of-range fill (a select per element)
        return tuple(None if pool is None else
                     pool[layer].at[ids].get(mode="promise_in_bounds") if as_pages else
                     gather_pages(pool, ids, layer)
                     for pool in (kv.k, kv.v, kv.k_scale, kv.v_scale))

    return numerics.attend_ragged(q, q_pos, pairs, blk * ps, nb, slopes)
