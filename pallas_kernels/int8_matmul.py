"""Int8 weight-only matmul: `x @ dequantize(w_q, scale)` with the dequantization fused.

FasterTransformer's weight-only GEMM on the Pallas Triton backend: the weight travels
from HBM as int8 (half of bf16's bytes, a quarter of fp32's), is converted to x's
dtype in registers, and multiplied on the tensor cores with float32 accumulation.
At decode batch sizes the matmul is bound by reading the weight, so this halves
its time against a bf16 weight.

Shape legend: M rows of x, K contraction, N output features, gs group size.

Scales: per output channel `[N]` (applied once to the accumulator: exact, since the
scale does not depend on k), or per group of `gs` consecutive k `[K // gs, N]`
(each K block lies inside one group and its partial dot is scaled before adding).

Tiling (`_tiles`) is separate from the kernel body: small M (decode, M <= 16) uses
one 16-row tile and wide K blocks; larger M uses 64-row tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ftjax.numerics import quantize_int8

_MIN_DOT = 16   # tl.dot needs every operand dimension >= 16
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    bm: int
    bn: int
    bk: int


def _tiles(m: int, n: int, k: int, group_size) -> _Tiles:
    """Power-of-two tiles; every K block lies inside one scale group."""
    if m <= 16:
        # Decode: the weight read dominates; wide K blocks keep loads long and
        # 64-column tiles give N / 64 programs to spread the weight over the SMs.
        tiles = _Tiles(bm=_MIN_DOT, bn=64, bk=128)
    else:
        tiles = _Tiles(bm=64, bn=64, bk=32)
    bk = min(tiles.bk, max(_MIN_DOT, pl.next_power_of_2(k)))
    if group_size is not None:
        bk = min(bk, group_size)
    bn = min(tiles.bn, max(_MIN_DOT, pl.next_power_of_2(n)))
    return _Tiles(bm=tiles.bm, bn=bn, bk=bk)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, t: _Tiles, m: int, n: int, k: int, group_size):
    """One `[bm, bn]` output tile: loop over K in blocks of bk.

    Refs: x `[bm, K]`, w `[K, bn]` int8, scale `[bn]` or `[K // gs, bn]`, out `[bm, bn]`.
    """
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * t.bm + jnp.arange(t.bm) < m
    cols = j * t.bn + jnp.arange(t.bn) < n
    dtype = x_ref.dtype

    def body(kb, acc):
        ks = kb * t.bk + jnp.arange(t.bk) < k
        x = plgpu.load(x_ref.at[:, pl.ds(kb * t.bk, t.bk)], mask=rows[:, None] & ks[None, :],
                       other=0)
        w = plgpu.load(w_ref.at[pl.ds(kb * t.bk, t.bk), :], mask=ks[:, None] & cols[None, :],
                       other=0)
        # int8 -> x's dtype is exact (|w| <= 127 fits every float mantissa here).
        part = plgpu.dot(x, w.astype(dtype), allow_tf32=False if dtype == jnp.float32 else None)
        if group_size is not None:
            g = (kb * t.bk) // group_size
            sc = plgpu.load(s_ref.at[g, :], mask=cols, other=0.0)
            part = part * sc[None, :]
        return acc + part

    acc = jax.lax.fori_loop(0, pl.cdiv(k, t.bk), body, jnp.zeros((t.bm, t.bn), jnp.float32))
    if group_size is None:
        acc = acc * plgpu.load(s_ref, mask=cols, other=0.0)[None, :]
    plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=rows[:, None] & cols[None, :])


def _check(x, w_q, scale, group_size):
    if x.ndim != 2 or w_q.ndim != 2 or x.shape[1] != w_q.shape[0]:
        raise ValueError(f"int8_matmul: x [M, K] and w_q [K, N] must agree, got x {x.shape}, "
                         f"w_q {w_q.shape}")
    if w_q.dtype != jnp.int8:
        raise ValueError(f"int8_matmul: w_q must be int8, got {w_q.dtype}")
    if x.dtype not in DTYPES:
        raise ValueError(f"int8_matmul: x must be float32/bfloat16/float16, got {x.dtype}")
    k, n = w_q.shape
    if group_size is None:
        if scale.shape != (n,):
            raise ValueError(f"int8_matmul: per-channel scale must be [N]=[{n}], "
                             f"got {scale.shape}")
        return
    if group_size < _MIN_DOT or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"int8_matmul: group_size must be a power of two >= {_MIN_DOT} that "
                         f"divides K={k}, got {group_size}")
    if scale.shape != (k // group_size, n):
        raise ValueError(f"int8_matmul: per-group scale must be [K // group_size, N]="
                         f"[{k // group_size}, {n}], got {scale.shape}")


@functools.partial(jax.jit, static_argnames=("group_size", "num_warps", "num_stages",
                                             "interpret"))
def int8_matmul(x, w_q, scale, *, group_size=None, num_warps: int = 4, num_stages: int = 3,
                interpret: bool = False):
    """`x @ (w_q * scale)` with the int8 weight dequantized inside the kernel.

    Args:
      x: `[M, K]` float32 / bfloat16 / float16.
      w_q: int8 `[K, N]`.
      scale: float `[N]` (per output channel, group_size None) or `[K // group_size, N]`.
      group_size: None, or scale-group length along K (power of two >= 16 dividing K).
      num_warps, num_stages: Triton launch parameters.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      `[M, N]` in x's dtype; products accumulate in float32. Any M, N, K: tails are
      masked inside the kernel, nothing is padded in memory.
    """
    _check(x, w_q, scale, group_size)
    m, k = x.shape
    n = w_q.shape[1]
    t = _tiles(m, n, k, group_size)
    if group_size is None:
        s_spec = pl.BlockSpec((t.bn,), lambda i, j: (j,))
    else:
        s_spec = pl.BlockSpec((k // group_size, t.bn), lambda i, j: (0, j))
    kernel = functools.partial(_kernel, t=t, m=m, n=n, k=k, group_size=group_size)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, t.bm), pl.cdiv(n, t.bn)),
        in_specs=[pl.BlockSpec((t.bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((k, t.bn), lambda i, j: (0, j)),
                  s_spec],
        out_specs=pl.BlockSpec((t.bm, t.bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ftjax_int8_matmul",
    )(x, w_q, scale.astype(jnp.float32))


def dequantize(w_q, scale, group_size=None):
    """int8 `[K, N]` and its scale -> float32 `[K, N]`."""
    w = w_q.astype(jnp.float32)
    if group_size is None:
        return w * scale.astype(jnp.float32)[None, :]
    return w * jnp.repeat(scale.astype(jnp.float32), group_size, axis=0)


def int8_matmul_reference(x, w_q, scale, *, group_size=None):
    """Plain-jnp `x @ dequantize(w_q, scale)` in float32, cast to x's dtype."""
    _check(x, w_q, scale, group_size)
    y = jnp.dot(x.astype(jnp.float32), dequantize(w_q, scale, group_size),
                precision="highest")
    return y.astype(x.dtype)


def quantize(w, group_size=None):
    """Symmetric int8 quantization of a float `[K, N]` weight (for tests and benchmarks),
    by the one int8 quantizer (`ftjax.numerics.quantize_int8`: absmax / 127, an all-zero
    column or group gets scale 1).

    Returns:
      (w_q int8 `[K, N]`, scale float32 `[N]` or `[K // group_size, N]`).
    """
    w = jnp.asarray(w, jnp.float32)
    k, n = w.shape
    w_q, scale = quantize_int8(w.reshape(k // (group_size or k), group_size or k, n), (1,))
    scale = scale[:, 0]
    return w_q.reshape(k, n), (scale[0] if group_size is None else scale)
