"""Paged attention on CPU as an XLA FFI custom call: the pages are read in place.

XLA:CPU cannot fuse a gather into a dot, so its paged attention (`ftjax.paged_kv.
attend_pages`) copies every block of pages it visits before scoring it; on the serving
engine's decode step that copy and the small dots around it were ~40 ms of an ~80 ms
step at 8 rows of 50..600 tokens (gpt2-124m, 2-core AMD EPYC; `examples/
profile_engine_decode.py --profile`). This kernel (`cpu_paged_attention.cc`, beside this
file) walks each (row, kv head)'s pages through the page table with an online softmax,
items shared over XLA's intra-op thread pool.

It is C++ built on first use with ftjax's other CPU kernels (`pallas_kernels.cpu_native`:
the machine's C++ compiler, a per-user cache keyed by source, jax version and CPU).
Without a compiler (or with `FTJAX_CPU_KERNELS=0`), `available()` is False and callers
keep the XLA path.

Semantics are `ftjax.numerics.attend`'s over the row's keys in page order: float32
queries `[B, T, N, H]` at positions `[B, T]` (< 0: padding, zeros out) see the keys at
positions <= their own; float32 or bfloat16 pools (bf16 queries are taken in float32),
or int8 pools with float32 per-(token, kv head) scales; ALiBi slopes optional; MHA / GQA / MQA (N a multiple of K).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_native import available

TARGETS = {"float32": "FtjaxPagedAttentionF32", "int8": "FtjaxPagedAttentionI8"}

__all__ = ["TARGETS", "available", "supported", "paged_attention"]


def supported(q, k_pool, k_scale=None) -> Optional[str]:
    """None if the kernel takes these arguments, else why not."""
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"queries are {q.dtype}, the kernel takes float32 or bfloat16"
    if k_scale is None and k_pool.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16):
        return (f"the pools are {k_pool.dtype}, the kernel takes float32, bfloat16 (or its "
                f"uint16 bits) or int8 with scales")
    if k_scale is not None and k_pool.dtype != jnp.int8:
        return f"scaled pools are {k_pool.dtype}, the kernel takes int8"
    if q.shape[2] % k_pool.shape[2]:
        return f"{q.shape[2]} query heads are not a multiple of {k_pool.shape[2]} kv heads"
    return None


def paged_attention(q, k_pool, v_pool, page_table, q_pos, layer, slopes=None,
                    k_scale=None, v_scale=None):
    """Attention of `q [B, T, N, H]` (float32 or bf16, taken in float32) at `q_pos [B, T]`
    over layer `layer`'s
    pages `k_pool`, `v_pool` `[L, P, K, page_size, H]` (float32, bf16, uint16 holding
    bf16 bits, or int8) through `page_table [B, M]`.

    Args:
      slopes: ALiBi slopes `[N]` or None. k_scale, v_scale: `[L, P, K, page_size]` for
        int8 pools. layer: int32 scalar, may be traced. Table entries are clipped to the
        pool; keys past the table (M * page_size) are not seen.
    Returns:
      float32 `[B, T, N, H]`. RuntimeError when the kernel cannot be built / is off.
    """
    why = supported(q, k_pool, k_scale)
    if why:
        raise ValueError(f"cpu paged_attention: {why}")
    if not available():
        raise RuntimeError("cpu paged_attention: the kernel is not built on this machine "
                           "(see the warning above, or FTJAX_CPU_KERNELS=0)")
    n = q.shape[2]
    slopes = jnp.zeros((n,), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
    q = q.astype(jnp.float32)
    common = (page_table.astype(jnp.int32), q_pos.astype(jnp.int32), slopes,
              jnp.asarray(layer, jnp.int32))
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    if k_scale is None:
        return jax.ffi.ffi_call(TARGETS["float32"], out)(q, k_pool, v_pool, *common)
    return jax.ffi.ffi_call(TARGETS["int8"], out)(
        q, k_pool, v_pool, k_scale.astype(jnp.float32), v_scale.astype(jnp.float32), *common)
