"""The paged KV cache as a model cache: `update` / `attend` over pools + a page table.

`ftjax.model.Transformer` only asks its cache to `update(layer, k, v, positions)` and
`attend(layer, q, positions, slopes)`, so the same model runs over the contiguous
`ftjax.cache.KVCache` or over this view of the shared page pools
(`ftjax.paged_kv.PagedKV`). The page table `[B, M]` names each batch row's pages
(page 0 = the null page: writes there are dropped, reads masked); it is decided on
the host (`ftjax.blocks.BlockManager`) and passed in per call, so rows can change
owners between calls with nothing recompiled.

Attention (`ftjax.paged_kv.attend`): "xla" streams each row's own blocks of pages with an
online softmax; "pallas" runs the paged decode kernel for single-token queries
(interpreted off GPU); "cpu" (the engine's choice on one CPU device, see
`paged_kv.kernels_for`) runs prefill and decode through the native kernel that reads the
pages in place (`pallas_kernels.cpu_paged_attention`).
"""

from __future__ import annotations

import flax.struct
import jax

from ftjax import paged_kv
from ftjax.paged_kv import PagedKV


@flax.struct.dataclass
class PagedCache:
    """Pools + the batch's page-table rows.

    Attributes:
      kv: the page pools of every layer.
      table: int32 `[B, M]`, row b's pages in order.
      max_len: static, key slots the XLA path gathers per row (<= M * page_size).
      kernels: static, "xla", "pallas" or "cpu".
    """

    kv: PagedKV
    table: jax.Array
    max_len: int = flax.struct.field(pytree_node=False, default=0)
    kernels: str = flax.struct.field(pytree_node=False, default="xla")

    def update(self, layer, k, v, positions) -> "PagedCache":
        """Writes keys / values `[B, T, K, H]` at `positions` `[B, T]` (negative positions,
        and positions on unallocated pages, are dropped)."""
        return self.replace(kv=paged_kv.write(self.kv, layer, self.table, None, positions, k, v))

    def attend(self, layer, q, positions, slopes=None):
        """Causal attention of `q` `[B, T, N, H]` at `positions` over the rows' pages."""
        return paged_kv.attend(self.kv, layer, q, positions, self.table, slopes,
                               max_len=self.max_len, kernels=self.kernels)
