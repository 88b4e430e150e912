"""The KV cache: an explicit pytree passed into the model and returned, never module state.

A cache owns how it is written and how attention reads it (XLA einsums or the Pallas
kernels, float or int8 with scales), so the model's `Attention` only asks it to
`update` and `attend`; it never asks which platform it runs on.

Shape legend: L layers, B batch rows, K kv heads, S slots, H head width, T new tokens,
N query heads.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from ftjax.config import ModelConfig
from ftjax import numerics
from ftjax.numerics import quantize_vectors
from pallas_kernels import cpu_paged_attention, prefill_attention, select, sharded

KERNELS = ("xla", "pallas", "mosaic")
# What a cache may be told to run: the user's choices, and "cpu" (the native CPU kernel,
# chosen by the engine on one CPU device: `ftjax.paged_kv.kernels_for`).
CACHE_KERNELS = KERNELS + ("cpu",)
KV_DTYPES = (None, "int8")


def _attend_xla(q, positions, slopes, arrays, layer):
    """`numerics.attend_blocks` over layer `layer` of the cache's `(k, v, k_scale,
    v_scale)` (`[L, B, K, S, H]`, scales `[L, B, K, S]` or None), sliced one block of
    slots at a time as far as the furthest query reaches: a step's cost follows the
    tokens in the cache, not its capacity, and nothing is copied whole."""
    s = arrays[0].shape[3]
    n = min(numerics.KEY_BLOCK, s)

    def block(i):
        start = jnp.minimum(i * n, s - n)     # a last partial block overlaps (skipped)

        def take(a):
            if a is None:
                return None
            idx = (layer, 0, 0, start) + (0,) * (a.ndim - 4)
            return jax.lax.dynamic_slice(a, idx, (1,) + a.shape[1:3] + (n,) + a.shape[4:])[0]

        return (start,) + tuple(take(a) for a in arrays)

    return numerics.attend_blocks(q, positions, block, n, -(-s // n), slopes)


@flax.struct.dataclass
class KVCache:
    """Contiguous keys and values of every layer: `k`, `v` are `[L, B, K, S, H]`.

    Heads before slots: attention then reads each head's keys as one contiguous
    `[S, H]` matrix, with no transpose copy per step.

    int8 cache: `k`, `v` are int8 and `k_scale`, `v_scale` float32 `[L, B, K, S]`
    hold one scale per written token and kv head (absmax / 127, set when written).

    kernels: "xla" (einsum attention over the layer's slots), "pallas" (the Triton
    decode / prefill kernels read the layer in place; interpreted off GPU) or "mosaic"
    (Mosaic GPU decode where it applies, see `pallas_kernels.select`) or "cpu" (float32
    queries: `pallas_kernels.cpu_paged_attention`, each row's slots one page read in
    place; other dtypes take the XLA path).
    mesh: the `pallas_kernels.sharded.KernelMesh` the cache is sharded on: each kernel
    call then runs per shard (shard_map), never on a gathered cache. None: one device.
    """

    k: jax.Array
    v: jax.Array
    k_scale: Optional[jax.Array] = None
    v_scale: Optional[jax.Array] = None
    kernels: str = flax.struct.field(pytree_node=False, default="xla")
    mesh: Optional[sharded.KernelMesh] = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, kv_dtype=None,
              kernels: str = "xla", mesh: Optional[sharded.KernelMesh] = None) -> "KVCache":
        """kv_dtype: None (the model dtype) or "int8"."""
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
        if kernels not in CACHE_KERNELS:
            raise ValueError(f"kernels must be one of {CACHE_KERNELS}, got {kernels!r}")
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        # jnp.zeros, not jnp.empty: new jax returns uninitialized memory for empty.
        if kv_dtype == "int8":
            return cls(k=jnp.zeros(shape, jnp.int8), v=jnp.zeros(shape, jnp.int8),
                       k_scale=jnp.zeros(shape[:-1], jnp.float32),
                       v_scale=jnp.zeros(shape[:-1], jnp.float32), kernels=kernels, mesh=mesh)
        dtype = numerics.kv_storage(dtype, kernels)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), kernels=kernels,
                   mesh=mesh)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(self, layer, k, v, positions) -> "KVCache":
        """Writes this step's keys / values `[B, T, K, H]` at their positions `[B, T]`.

        Decode (T == 1): the engine keeps positions inside the cache (the clamp makes
        it certain), so the scatter needs no bounds handling. Prefill: padding past
        the cache end (a session's last chunk) and negative positions are dropped.
        """
        rows = jnp.arange(k.shape[0])[:, None]
        if k.shape[1] == 1:
            slots, mode = jnp.minimum(positions, self.max_len - 1), "promise_in_bounds"
        else:
            # (a -1 index would wrap to the last slot before "drop" sees it)
            slots, mode = jnp.where(positions < 0, self.max_len, positions), "drop"

        # [B, T, K, H] written at [layer, b, :, slot]: index order puts (B, T) first.
        def put(a, x):
            return numerics.scatter_set(a, (layer, rows, slice(None), slots), x, mode)

        if self.k_scale is None:
            return self.replace(k=put(self.k, k), v=put(self.v, v))
        (kq, ks), (vq, vs) = quantize_vectors(k), quantize_vectors(v)
        return self.replace(k=put(self.k, kq), v=put(self.v, vq),
                            k_scale=put(self.k_scale, ks), v_scale=put(self.v_scale, vs))

    def attend(self, layer, q, positions, slopes=None):
        """Attention of queries `[B, T, N, H]` at `positions` `[B, T]` over this layer's
        slots (slots after a query's position are masked). Returns `[B, T, N, H]`."""
        decode = q.shape[1] == 1
        if self.kernels == "cpu":
            if cpu_paged_attention.supported(q, self.k, self.k_scale) is None:
                # [L, B, K, S, H] is a pool of B pages of S tokens; row b owns page b.
                table = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]
                return cpu_paged_attention.paged_attention(
                    q, self.k, self.v, table, positions, layer, slopes, self.k_scale,
                    self.v_scale).astype(q.dtype)
        # The prefill kernel has no int8 path: XLA attends there.
        elif self.kernels != "xla" and (decode or self.k_scale is None):
            interpret = sharded.interpret(self.mesh)
            if decode:
                lengths = jnp.minimum(positions[:, 0] + 1, self.max_len)
                kernel = functools.partial(select.decode_attention, impl=self.kernels)
                return sharded.decode_attention(
                    q[:, 0], self.k, self.v, lengths, mesh=self.mesh, kernel=kernel,
                    alibi_slopes=slopes, k_scale=self.k_scale, v_scale=self.v_scale,
                    layer=layer, layout="BKSH", interpret=interpret)[:, None]
            return sharded.prefill_attention(q, self.k, self.v, positions, mesh=self.mesh,
                                             kernel=prefill_attention, alibi_slopes=slopes,
                                             layer=layer, layout="BKSH", interpret=interpret)
        return _attend_xla(q, positions, slopes, (numerics.kv_values(self.k),
                                                  numerics.kv_values(self.v), self.k_scale,
                                                  self.v_scale), layer)

    def rows(self, start, size: int) -> "KVCache":
        """Rows `[start, start + size)` (a pipeline micro-batch; start may be traced)."""
        return jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=1), self)

    def put_rows(self, start, part: "KVCache") -> "KVCache":
        """This cache with rows from `start` replaced by `part`'s (inverse of `rows`)."""
        return jax.tree_util.tree_map(
            lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, start, axis=1), self, part)

    def take_rows(self, rows) -> "KVCache":
        """The cache of rows `rows` `[B']` (shared prefill, beams following parents)."""
        return jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=1), self)
