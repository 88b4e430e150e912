"""Pipeline parallelism: the stacked layers run stage by stage over the mesh's "pipe" axis.

The layer params `[L, ...]` and the KV cache's layer axis are sharded over "pipe"
(`ftjax.sharding.RULES`: "layers" -> "pipe"), so device p of the axis holds layers
`[p * L/P, (p + 1) * L/P)` and their cache, and nothing else. `run_stages` runs the
model's `stage` function inside `jax.shard_map`, manual over "pipe" only (the "data"
and "tensor" axes stay with XLA's partitioner, so tensor parallelism inside a stage
is unchanged): stage p runs its L/P layers when the activations reach it, then
`lax.ppermute` hands them to stage p + 1. Weights never move; a forward moves P - 1
activation hops and one all-reduce that gives every stage the last stage's output
(the head runs replicated over "pipe", as the embedding does).

Micro-batches (`micro` > 1, FasterTransformer's `getLocalBatchSize`): the batch is
split in M parts that follow each other through the stages (the JAX shard_map
documentation's `spmd_pipeline` schedule): M + P - 1 iterations, at iteration t
stage p works on micro-batch t - p. Each stage is busy M of the M + P - 1
iterations, so the bubble is (P - 1) / (M + P - 1) of a call (`bubble_fraction`).
Micro-batching needs a cache whose rows can be sliced (`KVCache`); a cache without
`rows` / `put_rows` runs with M = 1.

A stage that has no micro-batch in an iteration skips its layers (`lax.cond` on
its own stage index), so no device computes on padding and no cache is written
twice. Results are exact: every layer runs the same arithmetic as on one device.

Shape legend as `ftjax.model`: B batch, T tokens, D model width, L layers, P stages,
M micro-batches.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

AXIS = "pipe"
# Cache fields stacked on a leading layers axis (contiguous `KVCache` and paged
# `PagedKV` pools, with their int8 scales); any other cache leaf (a page table) is
# the same on every stage.
STACKED_FIELDS = ("k", "v", "k_scale", "v_scale")


def stages(mesh: Optional[Mesh]) -> int:
    """The mesh's pipe size (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape.get(AXIS, 1))


def allowed_pipe_sizes(n_layers: int) -> list:
    """Pipe sizes that give every stage the same number of whole layers."""
    return [p for p in range(1, n_layers + 1) if n_layers % p == 0]


def check_layers(n_layers: int, pipe: int) -> None:
    """ValueError naming the allowed sizes when `pipe` does not divide the layers."""
    if n_layers % pipe:
        raise ValueError(f"pipe size {pipe} does not divide n_layers ({n_layers}); allowed pipe "
                         f"sizes: {allowed_pipe_sizes(n_layers)}")


def bubble_fraction(pipe: int, micro: int) -> float:
    """Idle share of each stage in one pipelined call: (P - 1) / (M + P - 1)."""
    return (pipe - 1) / (micro + pipe - 1)


def _is_stacked(path) -> bool:
    name = getattr(path[-1], "name", None) if path else None
    return name in STACKED_FIELDS


def _cache_specs(cache, batch):
    """Stacked fields: layers on "pipe" (and rows on `batch`); the rest replicated."""
    stacked = PartitionSpec(AXIS, batch)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: stacked if _is_stacked(path) else PartitionSpec(), cache)


def _has_rows(cache) -> bool:
    """A cache whose stacked fields are `[L, B, ...]` with the batch's rows (contiguous)."""
    return cache is None or hasattr(cache, "rows")


def _data_axis(mesh: Mesh, batch: int, cache) -> Optional[str]:
    """"data" when the batch's rows are split over it and can stay split inside the
    stages (then "data" is manual there too), else None (left to XLA).

    Why manual: XLA's partitioner aborts (a failed CHECK in spmd_partitioner_util, jax
    0.10 and 0.12) on the cache scatter when "pipe" is manual and the cache's batch
    axis is auto-sharded on "data". Rows are independent in every layer, so splitting
    them by hand is exact. A paged pool has no row axis: it stays replicated over "data".
    """
    d = int(mesh.shape.get("data", 1))
    if d > 1 and batch % d == 0 and _has_rows(cache):
        return "data"
    return None


def _micro_batches(batch: int, micro: int, cache) -> int:
    """The number of micro-batches actually used (1 when the batch or cache cannot split)."""
    if micro <= 1 or not _has_rows(cache):
        return 1
    return micro if batch % micro == 0 else 1


def run_stages(stage: Callable, mesh: Mesh, layers, x, positions, cache=None, micro: int = 1):
    """Runs `stage` over the pipe-sharded layer stack, stage after stage.

    Args:
      stage: `stage(layers, x, positions, cache) -> (x, cache)` for a local stack of
        layers `[L/P, ...]` and the matching local cache (`ftjax.model.Transformer.stage`).
      mesh: a mesh with a "pipe" axis; `layers` and the cache's stacked fields are
        sharded over it on their leading axis.
      layers: the stacked block params `[L, ...]`.
      x: activations `[B, T, D]`; positions: int `[B, T]`.
      cache: a KV cache (`ftjax.cache.KVCache` or `ftjax.paged_cache.PagedCache`) or None.
      micro: micro-batches M to split B into (used when M divides B and the cache
        can slice rows; else 1).
    Returns:
      (activations `[B, T, D]` after the last layer, replicated over "pipe";
       the updated cache)
    """
    n = stages(mesh)
    data = _data_axis(mesh, x.shape[0], cache)
    local_batch = x.shape[0] // (int(mesh.shape["data"]) if data else 1)
    m = _micro_batches(local_batch, micro, cache)
    layer_specs = jax.tree_util.tree_map(lambda _: PartitionSpec(AXIS), layers)
    cache_specs = None if cache is None else _cache_specs(cache, data)
    rows_spec = PartitionSpec(data)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def local(layers, x, positions, cache):
        me = jax.lax.axis_index(AXIS)
        b = x.shape[0] // m

        def rows(a, j):
            return jax.lax.dynamic_slice_in_dim(a, j * b, b, axis=0)

        def work(j, h, cache):
            """This stage's layers on micro-batch j (activations h `[B/M, T, D]`)."""
            if m == 1:
                return stage(layers, h, positions, cache)
            sub = None if cache is None else cache.rows(j * b, b)
            h, sub = stage(layers, h, rows(positions, j), sub)
            return h, None if cache is None else cache.put_rows(j * b, sub)

        def step(t, carry):
            h, out, cache = carry
            j = t - me                       # this stage's micro-batch at iteration t
            # Stage 0 takes micro-batch t from the input; others what came down the ring.
            h = jnp.where(me == 0, rows(x, jnp.minimum(t, m - 1)), h)
            busy = (j >= 0) & (j < m)
            h, cache = jax.lax.cond(busy, lambda: work(jnp.clip(j, 0, m - 1), h, cache),
                                    lambda: (h, cache))
            done = busy & (me == n - 1)       # the last stage's output is final
            out = jnp.where(done, jax.lax.dynamic_update_slice_in_dim(
                out, h, jnp.clip(j, 0, m - 1) * b, axis=0), out)
            return jax.lax.ppermute(h, AXIS, ring), out, cache

        h0 = jnp.zeros((b,) + x.shape[1:], x.dtype)
        _, out, cache = jax.lax.fori_loop(0, m + n - 1, step, (h0, jnp.zeros_like(x), cache))
        # Only the last stage holds the output: the sum over stages (others add
        # zeros, exactly) hands it to every stage for the head.
        out = jax.lax.psum(jnp.where(me == n - 1, out, jnp.zeros_like(out)), AXIS)
        return out, cache

    manual = frozenset({AXIS} | ({data} if data else set()))
    fn = jax.shard_map(local, mesh=mesh, axis_names=manual, check_vma=False,
                       in_specs=(layer_specs, rows_spec, rows_spec, cache_specs),
                       out_specs=(rows_spec, cache_specs))
    return fn(layers, x, positions, cache)
