"""Checkpoint tensor shapes, derived from the parameter spec table (`ftjax.specs`).

Checkpoints store a matmul kernel as one 2-D tensor: its input axis is the kernel's
contraction axes flattened, its output axis the output axes of every param fused
into it (q, k, v -> qkv; gate, up -> fc1) flattened and concatenated. torch
`nn.Linear` stores `[out, in]`, GPT-2's `Conv1D` `[in, out]`. Biases are stored
flat, concatenated the same way. Split over `tp` tensor-parallel ranks, every axis
whose logical name `ftjax.sharding.RULES` maps to "tensor" holds 1/tp of its size
on each rank (the Megatron convention too).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

from ftjax.sharding import RULES
from ftjax.specs import ParamSpec

KINDS = ("kernel", "bias", "table")


def local_dims(spec: ParamSpec, tp: int = 1) -> Tuple[int, ...]:
    """One layer's (no "layers" axis) dims of `spec` on one of `tp` tensor-parallel ranks."""
    dims = []
    for n, axis in zip(spec.shape, spec.axes):
        if axis == "layers":
            continue
        dims.append(n // tp if RULES.get(axis) == "tensor" else n)
    return tuple(dims)


def stored_shape(specs: Sequence[ParamSpec], kind: str, tp: int = 1,
                 out_first: bool = True) -> Tuple[int, ...]:
    """Shape of the checkpoint tensor that holds `specs` (fused, in that order).

    Args:
      specs: the params the tensor holds; several only for a fused kernel or bias.
      kind: "kernel" (2-D, contraction axes -> in), "bias" (1-D) or "table"
        (an embedding or norm: the param's own dims; one spec).
      tp: tensor-parallel ranks the tensor is split over.
      out_first: kernel layout, `[out, in]` (nn.Linear) or `[in, out]` (Conv1D).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    dims = [local_dims(s, tp) for s in specs]
    if kind == "table":
        if len(specs) != 1:
            raise ValueError("a table is one param")
        return dims[0]
    if kind == "bias":
        return (sum(math.prod(d) for d in dims),)
    c = specs[0].contract
    if c <= 0 or any(s.contract != c for s in specs):
        raise ValueError(f"fused kernels must share one contraction count > 0: {specs}")
    ins = {math.prod(d[:c]) for d in dims}
    if len(ins) != 1:
        raise ValueError(f"fused kernels must share their input size: {specs}")
    (n_in,) = ins
    n_out = sum(math.prod(d[c:]) for d in dims)
    return (n_out, n_in) if out_first else (n_in, n_out)


def _sharded(dims_axes) -> bool:
    return any(RULES.get(a) == "tensor" for a in dims_axes)


def split_axis(specs: Sequence[ParamSpec], kind: str, out_first: bool = True):
    """The axis of the `stored_shape` tensor that tensor-parallel ranks split (their
    shards concatenate along it), or None for a tensor every rank holds whole."""
    axes = [tuple(a for a in s.axes if a != "layers") for s in specs]
    if kind == "table":
        hits = [i for i, a in enumerate(axes[0]) if RULES.get(a) == "tensor"]
        return hits[0] if hits else None
    if kind == "bias":
        return 0 if any(_sharded(a) for a in axes) else None
    c = specs[0].contract
    if any(_sharded(a[c:]) for a in axes):
        return 0 if out_first else 1
    if any(_sharded(a[:c]) for a in axes):
        return 1 if out_first else 0
    return None
