"""Which kernel implementation runs: ftjax's `kernels=` value -> a kernel function.

  "pallas": the Triton-backend kernels (Ampere and Hopper);
  "mosaic": the Mosaic GPU kernels (Hopper+: `pallas_kernels.mosaic`) where they take
            the arguments (bf16/fp16, float KV cache, per-channel int8, ...), else the
            Triton kernel: prefill attention and the cases outside Mosaic's limits;
  "auto" picks "mosaic" on sm90+ GPUs, "pallas" on older GPUs, "xla" elsewhere.
"""

from __future__ import annotations

from typing import Optional

import importlib

import jax

from pallas_kernels.decode_attention import decode_attention as triton_decode_attention
from pallas_kernels.int8_matmul import int8_matmul as triton_int8_matmul

IMPLS = ("pallas", "mosaic")


def auto(devices: Optional[list] = None) -> str:
    """"mosaic" on NVIDIA compute capability >= 9.0, "pallas" on other GPUs, else "xla"."""
    if jax.default_backend() != "gpu":
        return "xla"
    dev = (devices or jax.devices())[0]
    try:
        major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
    except ValueError:
        major = 0
    return "mosaic" if major >= 9 else "pallas"


def mosaic():
    """`pallas_kernels.mosaic`, imported on first use: Mosaic GPU's modules take ~0.2 s
    to import, which every start-up off Hopper GPUs would pay for nothing."""
    return importlib.import_module("pallas_kernels.mosaic")


def _check(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"kernel implementation must be one of {IMPLS}, got {impl!r}")


def decode_attention(q, k_cache, v_cache, lengths, *, impl: str = "pallas", alibi_slopes=None,
                     k_scale=None, v_scale=None, layer=None, kv_head=None,
                     layout: str = "BSKH", interpret: bool = False):
    """`pallas_kernels.decode_attention`'s arguments; `impl` picks the backend."""
    _check(impl)
    kw = dict(alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale, layer=layer,
              kv_head=kv_head, layout=layout, interpret=interpret)
    if impl == "mosaic" and k_scale is None and mosaic().decode_supported(
            q, k_cache, kv_head=kv_head, layout=layout) is None:
        return mosaic().decode_attention(q, k_cache, v_cache, lengths, **kw)
    return triton_decode_attention(q, k_cache, v_cache, lengths, **kw)


def int8_matmul(x, w_q, scale, *, impl: str = "pallas", group_size=None,
                interpret: bool = False):
    """`pallas_kernels.int8_matmul`'s arguments; `impl` picks the backend."""
    _check(impl)
    if impl == "mosaic" and mosaic().int8_matmul_supported(x, w_q, scale, group_size) is None:
        return mosaic().int8_matmul(x, w_q, scale, interpret=interpret)
    return triton_int8_matmul(x, w_q, scale, group_size=group_size, interpret=interpret)
