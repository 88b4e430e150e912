"""Few-row matmuls on CPU as an XLA FFI custom call: a decode step's weight reads.

A decode step multiplies a few activation rows (the batch) by every weight once, so its
time is the time to stream the weights from memory. XLA:CPU streams gpt2's float32
weights at 27-30 GB/s for one row but 12-18 GB/s for 2 to 16 rows (YNNPACK), and bf16 /
int8 weights at 0.3-1.8 GB/s (it converts them to float32 in memory first); measured
with `examples/dot_roofline.py` on a 2-core AMD EPYC. This kernel (`cpu_matmul.cc`)
reads each weight once per call, widens bf16 / int8 to float32 in registers, and takes
every row's products from it there, shared over XLA's intra-op thread pool: `[K, N]`
weights by ranges of weight rows (each thread streams one contiguous stretch into its own
partial sums), `[N, K]` tables by items of rows. Built with ftjax's other CPU kernels (`pallas_kernels.cpu_native`).

bf16 rows against a bf16 weight (a bf16 model's decode) stay bf16: at 2+ rows the kernel
multiplies bf16 pairs with `vdpbf16ps` where the CPU has AVX-512 BF16 (the widened path
is compute-bound at 8 rows: 8 float32 FMAs per 16 weights; the pairs take half the
instructions): at 8 rows on gpt2-124m shapes 12.9-21.4 vs 7.3-9.0 GB/s of bf16 weight
(`examples/dot_roofline.py --variants cpu-bf16`, which feeds bf16 rows as the model does;
the LM head `[N, K]` 8-11 GB/s either way).

Semantics: `y = x @ w` (w `[K, N]`), or `x @ w.T` (w `[N, K]`, `nk=True`: an embedding
table used as the LM head), times an optional per-output `scale [N]`, accumulated in
float32 (products of bf16 / int8 / float32 values exact or rounded once in float32);
float32 result.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.cpu_native import available

TARGET = "FtjaxSmallMatmul"
# Rows (M) up to which callers take this kernel: a decode step's batch. Above it the
# weight is read once for many rows anyway and XLA's GEMM (YNNPACK) is compute-bound.
MAX_ROWS = 16
DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)
# Most rows of a float32 `[N, K]` matmul the kernel takes in vector lanes (`cpu_matmul.cc`).
NK_LANE_ROWS = 8


__all__ = ["MAX_ROWS", "available", "preferred", "supported", "matmul"]


def preferred(rows: int, dtype, nk: bool = False) -> bool:
    """Whether a matmul of `rows` rows against a `dtype` weight (`[N, K]` with nk) is
    faster here than XLA's dot, as measured (`examples/dot_roofline.py`, gpt2-124m
    shapes, 2-core AMD EPYC, GB/s of weight read): bf16 / int8 weights at any rows up to
    MAX_ROWS (XLA converts them in memory first: 0.3-1.8 GB/s; the kernel 13-25 bf16,
    7-24 int8); float32 `[K, N]` at 2..16 rows (17-23 vs 12-19 GB/s); float32 `[N, K]`
    tables (a tied LM head) at 4..8 rows, the rows in a vector's lanes (gpt2 heads at 8
    rows 14.2-17.0 vs 11.0-12.8 GB/s, at 4 rows 12.6-15.7 vs 13.0-14.1; at 2 rows equal);
    float32 at one row stays on XLA (its matrix-vector code: 25-30 GB/s).
    `FTJAX_CPU_MATMUL=0` turns the kernel off (an A/B switch)."""
    if rows > MAX_ROWS or os.environ.get("FTJAX_CPU_MATMUL", "1") == "0":
        return False
    if jnp.dtype(dtype) == jnp.float32:
        return 4 <= rows <= NK_LANE_ROWS if nk else rows >= 2
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8))


def supported(x, w, scale=None, *, nk: bool = False) -> Optional[str]:
    """None if the kernel takes these arguments, else why not."""
    if x.ndim != 2 or w.ndim != 2:
        return f"x {x.shape} and w {w.shape} must be 2-D"
    if w.dtype not in DTYPES:
        return f"weights are {w.dtype}, the kernel takes float32, bfloat16 or int8"
    k, n = (w.shape[1], w.shape[0]) if nk else w.shape
    if x.shape[1] != k:
        return f"x {x.shape} does not contract with w {w.shape} (nk={nk})"
    if scale is not None and scale.shape != (n,):
        return f"scale {scale.shape} is not one value per output ({n})"
    return None


def matmul(x, w, scale=None, *, nk: bool = False):
    """`x [M, K] @ w [K, N]` (or `w [N, K]` with nk) `* scale [N]`, float32 `[M, N]`.

    x is taken in float32 (cast here), or as bf16 when both x and w are bf16. ValueError
    for arguments the kernel does not take; RuntimeError when the kernels are not built
    on this machine / are off.
    """
    why = supported(x, w, scale, nk=nk)
    if why:
        raise ValueError(f"cpu matmul: {why}")
    if not available():
        raise RuntimeError("cpu matmul: the kernels are not built on this machine "
                           "(see the warning above, or FTJAX_CPU_KERNELS=0)")
    n = w.shape[0] if nk else w.shape[1]
    scale = (jnp.zeros((0,), jnp.float32) if scale is None
             else scale.astype(jnp.float32))
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    # bf16 rows against a bf16 weight stay bf16: the kernel multiplies bf16 pairs
    # (`vdpbf16ps`) where the CPU has them, else widens x itself (exact either way).
    keep = x.dtype == jnp.bfloat16 and w.dtype == jnp.bfloat16
    return jax.ffi.ffi_call(TARGET, out)(x if keep else x.astype(jnp.float32), w, scale,
                                         nk=int(nk))
