"""Will a request fit in memory? An estimate checked before anything is allocated.

The KV cache and the per-row buffers of a call grow with the rows (prompts x n x
beams) and the cache length; a request far past the device's memory would otherwise
grow until the OOM killer ends the process. The estimate is compared with what the
device reports it can hold (an accelerator's `bytes_limit`, or the host's available
memory for CPU devices) and refused with the numbers when it cannot fit.
"""

from __future__ import annotations

import os
from typing import Optional

import jax


def available_bytes() -> Optional[int]:
    """Memory one device can still use: the accelerator's limit, or the host's
    MemAvailable (Linux) for CPU devices; None when unknown."""
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return None if limit is None else int(limit) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def call_bytes(cfg, rows: int, cache_len: int, width: int, dtype_bytes: int,
               kv_bytes: Optional[int] = None) -> int:
    """Estimated bytes of one call's state: KV cache `[L, rows, K, S, H]` x 2, the
    float32 logits of every row, and the int32 token / history buffers."""
    kv = 2 * cfg.n_layers * rows * cfg.n_kv_heads * cache_len * cfg.head_dim
    kv *= kv_bytes or dtype_bytes
    logits = 3 * rows * cfg.vocab_size * 4  # logits, processed logits, log-probs
    buffers = rows * (cache_len + width) * 4 * 4
    return int(kv + logits + buffers)


def check_fits(nbytes: int, what: str, available: Optional[int] = None) -> None:
    """ValueError naming `what`, the estimate and the limit when it cannot fit."""
    available = available_bytes() if available is None else available
    if available is not None and nbytes > available:
        raise ValueError(f"{what} needs about {nbytes / 2**30:.2f} GiB (KV cache and buffers) "
                         f"but the device has {available / 2**30:.2f} GiB available; use fewer "
                         "prompts, samples or beams, or shorter outputs")


__all__ = ["available_bytes", "call_bytes", "check_fits"]
