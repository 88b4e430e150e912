"""Checks on loaded weights: every float value finite.

A NaN or Inf weight (a corrupt file, flipped bytes, a diverged training run) loads
without complaint and turns every logit into NaN; `check_finite` names the first
tensor holding one. `ftjax convert` runs it by default, `ftjax.load(check_finite=True)`
on request (it reads every byte, which a memory-mapped load otherwise avoids).
"""

from __future__ import annotations

import jax
import numpy as np

from ftjax.errors import CheckpointError

_CHUNK_BYTES = 64 << 20  # numpy arrays are checked in slices: no full-size temporaries


def _path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def _count_bad(x) -> int:
    """How many values of one leaf are NaN or +-Inf (0 for integer leaves)."""
    if isinstance(x, jax.Array):
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.inexact):
            return 0
        n = jax.jit(lambda a: jax.numpy.sum(~jax.numpy.isfinite(a)))(x)
        return int(np.asarray(n.addressable_data(0)))  # replicated: any shard tells
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.inexact) or arr.dtype.kind == "V"
            or "float" in arr.dtype.name):
        return 0
    if arr.ndim == 0 or arr.nbytes <= _CHUNK_BYTES:
        return int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
    rows = max(1, _CHUNK_BYTES // max(1, arr[0].nbytes))
    bad = 0
    for i in range(0, arr.shape[0], rows):
        part = arr[i:i + rows]
        bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    return bad


def check_finite(params, where: str) -> None:
    """Raises CheckpointError naming the first param (and `where`) with NaN / Inf values.

    Args:
      params: a params pytree of numpy or jax arrays (int8 weights' float scales are
        checked; their int8 values cannot be non-finite).
      where: the checkpoint, for the message.
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        bad = _count_bad(leaf)
        if bad:
            raise CheckpointError(
                f"{where}: tensor {_path_name(path)!r} holds {bad} non-finite (NaN or Inf) "
                f"value(s) of {int(np.size(leaf))}; refusing to load weights that give NaN "
                "logits")
