"""Mosaic GPU (Hopper, sm90+) variants of decode attention and the int8 weight-only matmul.

Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`) is the Pallas GPU backend jax picks
by default since 0.11 (the Triton one is deprecated): kernels are written per CUDA
block ("kernel" + grid), operands move GMEM -> SMEM by TMA copies with barriers, and
the tensor cores run through `wgmma` (64-row warpgroup tiles, SMEM operands). jax's
own `pallas/ops/gpu/attention_mgpu.py` and `hopper_mixed_type_matmul_mgpu.py` are the
idiom references.

decode_attention: one block per (row, kv head, split of S): its G query heads padded
to the 64-row wgmma tile; a two-slot TMA ring over the split's key/value blocks, issued
one block ahead and only for blocks below the row's length; online softmax in float32;
the splits merged in jnp (as the Triton kernel: `decode_attention._merge`).

int8_matmul: one block per (64 rows of x, tile_n columns); `emit_pipeline` streams x and
int8 weight tiles over K; each weight tile is converted to x's dtype in SMEM (int8 ->
bf16 is exact) and fed to wgmma; the per-channel scale multiplies the float32 result.
(Decode batches use 64 rows of the tile however few they need: the kernel is bound by
the weight read, which it halves against bf16.)

Limits (checked: `decode_supported` / `int8_matmul_supported` give the reason, and
callers fall back to the Triton kernels): bfloat16 / float16 only; decode: "BKSH"
layout, float caches, G <= 64, S a multiple of 16; matmul: per-channel scales,
K and N multiples of 64.

Numerics are proven on CPU with jax's Mosaic GPU interpreter (jax >= 0.12); its
wgmma takes SMEM operands only, so the probabilities go through SMEM (one 64 x block_s
store per block). CUDA lowering (the `mosaic_gpu` custom call) is checked on every jax.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_attention import _merge

ROWS = 64          # wgmma's warpgroup tile: rows of the A operand
DTYPES = (jnp.bfloat16, jnp.float16)
CUSTOM_CALL = "mosaic_gpu"   # prefix of the custom call target (mosaic_gpu_v2 today)
# plgpu.load(src, idx, ...) on jax 0.10; plgpu.load(src, ...) on jax 0.12.
_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters


def has_interpreter() -> bool:
    """Whether this jax can run Mosaic GPU kernels without a GPU (jax >= 0.12)."""
    return hasattr(plgpu, "InterpretGPUParams")


def _interpret(interpret: bool):
    if not interpret:
        return None
    if not has_interpreter():
        raise NotImplementedError(
            f"Mosaic GPU kernels run off GPU only in jax's Mosaic GPU interpreter "
            f"(jax >= 0.12); this is jax {jax.__version__}. Use kernels='pallas' (Triton).")
    return plgpu.InterpretGPUParams()


def _swizzled(cols: int, dtype):
    """Tiling + swizzle transforms of an SMEM tile with `cols` columns (wgmma operands)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _load(ref, layout):
    if _LOAD_TAKES_IDX:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


# -- decode attention ---------------------------------------------------------------

def _block_s(s: int, block_s: int) -> Optional[int]:
    """The largest of block_s, block_s / 2, ... >= 16 that divides S (None: none does)."""
    while block_s >= 16:
        if s % block_s == 0:
            return block_s
        block_s //= 2
    return None


def decode_supported(q, k_cache, *, k_scale=None, kv_head=None, layout: str = "BKSH",
                     block_s: int = 64) -> Optional[str]:
    """None if `decode_attention` takes these arguments, else the reason it does not."""
    if layout != "BKSH":
        return f"layout {layout!r} (Mosaic kernel: 'BKSH')"
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype:
        return f"dtypes q {q.dtype}, cache {k_cache.dtype} (Mosaic kernel: bf16/fp16 caches)"
    n, s, h = q.shape[1], k_cache.shape[-2], k_cache.shape[-1]
    kv = 1 if kv_head is not None else k_cache.shape[-3]
    if n % kv or n // kv > ROWS:
        return f"{n // max(kv, 1)} query heads per kv head (Mosaic kernel: <= {ROWS})"
    if _block_s(s, block_s) is None:
        return f"cache length S={s} (Mosaic kernel: a multiple of 16)"
    if h % 16:
        return f"head width {h} (Mosaic kernel: a multiple of 16)"
    return None


@functools.partial(jax.jit, static_argnames=("layout", "block_s", "num_splits", "interpret"))
def decode_attention(q, k_cache, v_cache, lengths, *, alibi_slopes=None, k_scale=None,
                     v_scale=None, layer=None, kv_head=None, layout: str = "BKSH",
                     block_s: int = 64, num_splits=None, interpret: bool = False):
    """`pallas_kernels.decode_attention` on Mosaic GPU (same arguments and result).

    Args:
      q: `[B, N, H]` bfloat16 / float16.
      k_cache, v_cache: `[B, K, S, H]`, or `[L, B, K, S, H]` with `layer`; q's dtype.
      lengths: int32 `[B]`; alibi_slopes: optional `[N]`; layer, kv_head: optional int32
        scalars (may be traced), see `pallas_kernels.decode_attention`.
      block_s: slots per TMA block (16..64, dividing S); num_splits: blocks along S.
      interpret: run in jax's Mosaic GPU interpreter (jax >= 0.12; CPU tests).
    Returns:
      `[B, N, H]` in q's dtype.
    Raises:
      ValueError: arguments outside the kernel's limits (`decode_supported` says which).
    """
    reason = decode_supported(q, k_cache, k_scale=k_scale, kv_head=kv_head, layout=layout,
                              block_s=block_s)
    if k_scale is not None or v_scale is not None:
        reason = "int8 caches (Mosaic kernel: float caches; use the Triton kernel)"
    if reason:
        raise ValueError(f"mosaic.decode_attention: unsupported {reason}")
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    if k_cache.shape != v_cache.shape or k_cache.ndim != 5:
        raise ValueError(f"caches must be [L, B, K, S, H] and equal, got {k_cache.shape}, "
                         f"{v_cache.shape}")
    b, n, h = q.shape
    _, _, kv_cache, s, _ = k_cache.shape
    kv = 1 if kv_head is not None else kv_cache
    g = n // kv
    dtype = q.dtype
    block_s = _block_s(s, block_s)
    if num_splits is None:
        num_splits = max(1, min(16, s // (4 * block_s)))
    split_len = block_s * pl.cdiv(pl.cdiv(s, num_splits), block_s)
    num_splits = pl.cdiv(s, split_len)
    has_alibi = alibi_slopes is not None
    # Query groups padded to the 64-row wgmma tile (a few KB; the cache is not touched).
    qp = jnp.pad(q.reshape(b, kv, g, h), ((0, 0), (0, 0), (0, ROWS - g), (0, 0)))
    slopes = jnp.zeros((n,), jnp.float32) if alibi_slopes is None else alibi_slopes
    slopes = jnp.pad(slopes.astype(jnp.float32).reshape(kv, g), ((0, 0), (0, ROWS - g)))
    # [layer, first kv head, lengths...]: read as scalars from GMEM.
    scalars = jnp.concatenate([
        jnp.stack([jnp.asarray(layer, jnp.int32),
                   jnp.asarray(0 if kv_head is None else kv_head, jnp.int32)]),
        jnp.minimum(lengths.astype(jnp.int32), s)])
    sm_scale = 1.0 / math.sqrt(h)

    def kernel(sc_ref, q_ref, k_ref, v_ref, sl_ref, o_ref, m_ref, l_ref, *, q_smem, k_smem,
               v_smem, p_smem, o_smem, sl_smem, ml_smem, q_bar, k_bars, v_bars):
        bi = jax.lax.axis_index("b")
        j = jax.lax.axis_index("kv")
        split = jax.lax.axis_index("split")
        layer_i, head = sc_ref[0], sc_ref[1] + j
        length = sc_ref[2 + bi]
        start = split * split_len
        end = jnp.minimum(start + split_len, length)
        n_blocks = pl.cdiv(jnp.maximum(end - start, 0), block_s)
        # Separate barriers: each completes on its own copy's bytes.
        plgpu.copy_gmem_to_smem(q_ref.at[bi, j], q_smem, q_bar.at[0])
        plgpu.copy_gmem_to_smem(sl_ref.at[j], sl_smem, q_bar.at[1])

        def fetch(i, slot):
            rows = pl.ds(start + i * block_s, block_s)
            plgpu.copy_gmem_to_smem(k_ref.at[layer_i, bi, head, rows], k_smem.at[slot],
                                    k_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[layer_i, bi, head, rows], v_smem.at[slot],
                                    v_bars.at[slot])

        @pl.when(n_blocks > 0)
        def _():
            fetch(0, 0)

        plgpu.barrier_wait(q_bar.at[0])
        plgpu.barrier_wait(q_bar.at[1])
        slope = _load(sl_smem, plgpu.Layout.WGMMA.reduce(1))

        def body(i, carry):
            acc, m_i, l_i = carry
            slot = jax.lax.rem(i, 2)

            # The next block streams in while this one is computed (its slot was
            # consumed by the previous iteration, whose wgmmas have completed).
            @pl.when(i + 1 < n_blocks)
            def _():
                fetch(i + 1, 1 - slot)

            plgpu.barrier_wait(k_bars.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            sc = pl.run_scoped(qk, plgpu.ACC((ROWS, block_s), jnp.float32)) * sm_scale
            slots = start + i * block_s + plgpu.broadcasted_iota(
                jnp.int32, (ROWS, block_s), 1, layout=plgpu.Layout.WGMMA)
            if has_alibi:
                dist = (slots - (length - 1)).astype(jnp.float32)
                sc = sc + jax.lax.broadcast_in_dim(slope, sc.shape, [0]) * dist
            sc = jnp.where(slots < end, sc, -1e30)
            m_new = jnp.maximum(m_i, sc.max(axis=1))
            corr = jnp.exp(m_i - m_new)
            p = jnp.exp(sc - jax.lax.broadcast_in_dim(m_new, sc.shape, [0]))
            l_i = l_i * corr + p.sum(axis=1)
            acc = acc * jax.lax.broadcast_in_dim(corr, acc.shape, [0])
            # Probabilities through SMEM: wgmma's register-A form is not interpretable.
            p_smem[...] = p.astype(dtype)
            plgpu.commit_smem()
            plgpu.barrier_wait(v_bars.at[slot])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, h), jnp.float32))
            return acc, m_new, l_i

        acc0 = plgpu.layout_cast(jnp.zeros((ROWS, h), jnp.float32), plgpu.Layout.WGMMA)
        row = plgpu.Layout.WGMMA.reduce(1)
        m0 = plgpu.layout_cast(jnp.full((ROWS,), -1e30, jnp.float32), row)
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row)
        acc, m_i, l_i = jax.lax.fori_loop(0, n_blocks, body, (acc0, m0, l0))
        o_smem[...] = acc
        ml_smem[0] = m_i
        ml_smem[1] = l_i
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, j, split])
        plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[bi, j, split])
        plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[bi, j, split])
        plgpu.wait_smem_to_gmem(0)

    part = (b, kv, num_splits, ROWS)
    run = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(part + (h,), jnp.float32),
                  jax.ShapeDtypeStruct(part, jnp.float32),
                  jax.ShapeDtypeStruct(part, jnp.float32)),
        grid=(b, kv, num_splits), grid_names=("b", "kv", "split"),
        scratch_types=dict(
            q_smem=plgpu.SMEM((ROWS, h), dtype, transforms=_swizzled(h, dtype)),
            k_smem=plgpu.SMEM((2, block_s, h), dtype, transforms=_swizzled(h, dtype)),
            v_smem=plgpu.SMEM((2, block_s, h), dtype, transforms=_swizzled(h, dtype)),
            p_smem=plgpu.SMEM((ROWS, block_s), dtype, transforms=_swizzled(block_s, dtype)),
            o_smem=plgpu.SMEM((ROWS, h), jnp.float32),
            sl_smem=plgpu.SMEM((ROWS,), jnp.float32),
            ml_smem=plgpu.SMEM((2, ROWS), jnp.float32),
            q_bar=plgpu.Barrier(num_barriers=2),
            k_bars=plgpu.Barrier(num_barriers=2),
            v_bars=plgpu.Barrier(num_barriers=2)),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret(interpret),
        kernel_name="ftjax_mosaic_decode_attention")
    o, m, l = run(scalars, qp, k_cache, v_cache, slopes)
    o, m, l = o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]
    return _merge(o, m, l, dtype).reshape(b, n, h)


# -- int8 weight-only matmul --------------------------------------------------------

def int8_matmul_supported(x, w_q, scale, group_size=None, tile_n: int = 64,
                          tile_k: int = 64) -> Optional[str]:
    """None if `int8_matmul` takes these arguments, else the reason it does not."""
    if x.dtype not in DTYPES:
        return f"x dtype {x.dtype} (Mosaic kernel: bf16/fp16)"
    if group_size is not None:
        return "per-group scales (Mosaic kernel: per channel)"
    k, n = w_q.shape
    if k % tile_k or n % tile_n:
        return f"K={k}, N={n} (Mosaic kernel: multiples of {tile_k} and {tile_n})"
    return None


@functools.partial(jax.jit, static_argnames=("group_size", "tile_n", "tile_k", "interpret"))
def int8_matmul(x, w_q, scale, *, group_size=None, tile_n: int = 64, tile_k: int = 64,
                interpret: bool = False):
    """`pallas_kernels.int8_matmul` on Mosaic GPU: `x @ (w_q * scale)`.

    Args:
      x: `[M, K]` bfloat16 / float16; w_q: int8 `[K, N]`; scale: float `[N]`.
      group_size: must be None (per-channel scales).
      tile_n, tile_k: output columns per block, contraction per pipeline step.
      interpret: run in jax's Mosaic GPU interpreter (jax >= 0.12; CPU tests).
    Returns:
      `[M, N]` in x's dtype; float32 accumulation, the scale applied in float32.
    """
    if x.ndim != 2 or w_q.ndim != 2 or x.shape[1] != w_q.shape[0] or w_q.dtype != jnp.int8:
        raise ValueError(f"mosaic.int8_matmul: x [M, K] and int8 w_q [K, N] must agree, got "
                         f"x {x.shape}, w_q {w_q.dtype} {w_q.shape}")
    reason = int8_matmul_supported(x, w_q, scale, group_size, tile_n, tile_k)
    if reason:
        raise ValueError(f"mosaic.int8_matmul: unsupported {reason}")
    if scale.shape != (w_q.shape[1],):
        raise ValueError(f"mosaic.int8_matmul: scale must be [N]=[{w_q.shape[1]}], "
                         f"got {scale.shape}")
    m, k = x.shape
    n = w_q.shape[1]
    dtype = x.dtype
    mp = pl.cdiv(m, ROWS) * ROWS
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))

    def kernel(x_gmem, w_gmem, o_gmem, *, w16_smem, o_smem):
        mi, ni = jax.lax.axis_index("m"), jax.lax.axis_index("n")

        @functools.partial(pl.run_scoped, acc=plgpu.ACC((ROWS, tile_n), jnp.float32))
        def _(acc):
            def step(_, x_smem, w_smem):
                # int8 -> x's dtype is exact (|w| <= 127); wgmma reads both from SMEM.
                w16_smem[...] = w_smem[...].astype(dtype)
                plgpu.commit_smem()
                plgpu.wgmma(acc, x_smem, w16_smem)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step, grid=(k // tile_k,),
                in_specs=[plgpu.BlockSpec((ROWS, tile_k), lambda kk: (0, kk),
                                          transforms=_swizzled(tile_k, dtype)),
                          plgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0))],
                max_concurrent_steps=2,
            )(x_gmem.at[pl.ds(mi * ROWS, ROWS)], w_gmem.at[:, pl.ds(ni * tile_n, tile_n)])
            o_smem[...] = acc[...]

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * ROWS, ROWS),
                                                  pl.ds(ni * tile_n, tile_n)])
        plgpu.wait_smem_to_gmem(0)

    run = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        grid=(mp // ROWS, n // tile_n), grid_names=("m", "n"),
        scratch_types=dict(
            w16_smem=plgpu.SMEM((tile_k, tile_n), dtype, transforms=_swizzled(tile_n, dtype)),
            o_smem=plgpu.SMEM((ROWS, tile_n), jnp.float32)),
        # Warpgroup semantics: layouts of the SMEM int8 -> bf16 conversion are inferred.
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret(interpret),
        kernel_name="ftjax_mosaic_int8_matmul")
    y = run(xp, w_q)[:m]
    return (y * scale.astype(jnp.float32)[None, :]).astype(dtype)
