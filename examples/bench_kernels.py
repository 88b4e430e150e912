"""Times the Pallas kernels against the XLA path on a GPU; reports achieved bandwidth.

    python examples/bench_kernels.py [--dtype bfloat16] [--repeats 50]

Decode attention (`pallas_kernels.decode_attention`, the model's BKSH cache layout) is
timed against `ftjax.model.attend` on the same cache, prefill attention likewise (in
TFLOP/s: it is compute-bound); the int8 weight-only matmul
against XLA's `x @ dequantize(w_q, scale)` and against a plain bf16/fp16 `x @ w`.
Both are memory-bound at decode sizes, so the figure of merit is bytes moved / time
against the device's peak HBM bandwidth (a table of common GPUs; "?" when unknown).

Without a GPU it says so and exits 0 (the kernels only run interpreted on CPU).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.gpu_check import peak_gbps  # peak HBM bandwidth by device kind
from pallas_kernels import mosaic


def _mosaic_runs(interpret: bool) -> bool:
    """Mosaic GPU kernels run on a GPU, or interpreted on jax >= 0.12."""
    return mosaic.has_interpreter() or not interpret


def timeit(fn, *args, repeats: int) -> float:
    """Median wall time in seconds of `fn(*args)` (compiled first, then `repeats` runs)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def report(name: str, seconds: float, nbytes: int, peak):
    gbps = nbytes / seconds / 1e9
    frac = f"{100 * gbps / peak:5.1f}% of peak" if peak else "peak ?"
    print(f"  {name:<34} {seconds * 1e6:9.1f} us  {gbps:8.1f} GB/s  {frac}")


ATTN_SHAPES = [(1, 32, 32, 4096, 128), (8, 32, 8, 4096, 128), (32, 12, 12, 1024, 64),
               (4, 32, 32, 8192, 80)]                       # (B, N, K, S, H)
MATMUL_SHAPES = [(1, 4096, 11008, None), (16, 4096, 11008, None), (1, 4096, 11008, 128),
                 (64, 4096, 4096, None)]                    # (M, K, N, group_size)
# --smoke: tiny shapes, kernels interpreted; checks this script runs (times meaningless).
SMOKE_ATTN = [(2, 4, 2, 64, 16)]
SMOKE_MATMUL = [(2, 64, 48, None), (2, 64, 48, 32), (2, 64, 64, None)]


def bench_attention(dtype, repeats, peak, shapes=ATTN_SHAPES, interpret=False):
    from ftjax.model import attend
    from pallas_kernels import decode_attention

    print("decode attention (one token per row over a [B, K, S, H] cache, lengths = S):")
    rng = np.random.default_rng(0)
    for b, n, kv, s, h in shapes:
        q = jnp.asarray(rng.standard_normal((b, n, h)), dtype)
        k = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
        v = jnp.asarray(rng.standard_normal((b, kv, s, h)), dtype)
        lengths = jnp.full((b,), s, jnp.int32)
        nbytes = 2 * k.size * k.dtype.itemsize + 2 * q.size * q.dtype.itemsize
        pallas = functools.partial(decode_attention, layout="BKSH", interpret=interpret)
        xla = jax.jit(lambda q, k, v, lens: attend(q[:, None], k, v, (lens - 1)[:, None],
                                                   jnp.arange(k.shape[2]), heads_first=True))
        print(f" B={b} N={n} K={kv} S={s} H={h}  ({nbytes / 1e6:.1f} MB of cache)")
        report("pallas decode_attention", timeit(pallas, q, k, v, lengths, repeats=repeats),
               nbytes, peak)
        if _mosaic_runs(interpret) and mosaic.decode_supported(q, k) is None:
            mgpu = functools.partial(mosaic.decode_attention, interpret=interpret)
            report("mosaic decode_attention", timeit(mgpu, q, k, v, lengths, repeats=repeats),
                   nbytes, peak)
        report("xla ftjax.model.attend", timeit(xla, q, k, v, lengths, repeats=repeats),
               nbytes, peak)


PREFILL_SHAPES = [(1, 2048, 32, 32, 128), (4, 512, 32, 8, 128)]   # (B, T, N, K, H), S = T
SMOKE_PREFILL = [(1, 20, 4, 2, 16)]


def bench_prefill(dtype, repeats, peak, shapes=PREFILL_SHAPES, interpret=False):
    """Prefill is compute-bound: reports TFLOP/s (causal: half of the 4*B*N*T*S*H flops)."""
    from ftjax.model import attend
    from pallas_kernels import prefill_attention

    print("prefill attention (causal, prompt of T tokens written at slots 0..T-1):")
    rng = np.random.default_rng(2)
    for b, t, n, kv, h in shapes:
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
        k = jnp.asarray(rng.standard_normal((b, kv, t, h)), dtype)
        v = jnp.asarray(rng.standard_normal((b, kv, t, h)), dtype)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        flops = 2 * b * n * t * t * h          # causal half of QK^T and PV
        pallas = functools.partial(prefill_attention, layout="BKSH", interpret=interpret)
        xla = jax.jit(lambda q, k, v, pos: attend(q, k, v, pos, jnp.arange(k.shape[2]),
                                                  heads_first=True))
        print(f" B={b} T={t} N={n} K={kv} H={h}")
        for name, fn in (("pallas prefill_attention", pallas), ("xla ftjax.model.attend", xla)):
            sec = timeit(fn, q, k, v, pos, repeats=repeats)
            print(f"  {name:<34} {sec * 1e6:9.1f} us  {flops / sec / 1e12:8.2f} TFLOP/s")


def bench_matmul(dtype, repeats, peak, shapes=MATMUL_SHAPES, interpret=False):
    from pallas_kernels import dequantize_int8, int8_matmul, quantize_int8

    print("int8 weight-only matmul (x [M, K] @ w [K, N]):")
    rng = np.random.default_rng(1)
    for m, k, n, gs in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        w_q, scale = quantize_int8(rng.standard_normal((k, n)) * 0.02, gs)
        w = dequantize_int8(w_q, scale, gs).astype(dtype)
        int8_bytes = w_q.size + scale.size * 4 + (x.size + m * n) * x.dtype.itemsize
        dense_bytes = w.size * w.dtype.itemsize + (x.size + m * n) * x.dtype.itemsize
        pallas = functools.partial(int8_matmul, group_size=gs, interpret=interpret)
        xla_deq = jax.jit(lambda x, w_q, s, gs=gs: x @ dequantize_int8(w_q, s, gs).astype(x.dtype))
        dense = jax.jit(lambda x, w: x @ w)
        print(f" M={m} K={k} N={n} group_size={gs}")
        report("pallas int8_matmul", timeit(pallas, x, w_q, scale, repeats=repeats),
               int8_bytes, peak)
        if _mosaic_runs(interpret) and mosaic.int8_matmul_supported(x, w_q, scale, gs) is None:
            mgpu = functools.partial(mosaic.int8_matmul, interpret=interpret)
            report("mosaic int8_matmul", timeit(mgpu, x, w_q, scale, repeats=repeats),
                   int8_bytes, peak)
        report("xla x @ dequantize(w_q)", timeit(xla_deq, x, w_q, scale, repeats=repeats),
               int8_bytes, peak)
        report(f"xla x @ w ({jnp.dtype(dtype).name} weight)",
               timeit(dense, x, w, repeats=repeats), dense_bytes, peak)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, kernels interpreted on any backend: checks that "
                             "this script runs; the times mean nothing")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)  # Triton backend, jax >= 0.11
    dtype = jnp.dtype(args.dtype)
    if args.smoke:
        print("smoke run: interpreted kernels, times are meaningless")
        bench_attention(dtype, 2, None, SMOKE_ATTN, interpret=True)
        bench_prefill(dtype, 2, None, SMOKE_PREFILL, interpret=True)
        bench_matmul(dtype, 2, None, SMOKE_MATMUL, interpret=True)
        return 0
    gpus = [d for d in jax.devices() if d.platform == "gpu"] if jax.default_backend() == "gpu" \
        else []
    if not gpus:
        print(f"No GPU present (jax backend: {jax.default_backend()}); the Pallas kernels "
              "run on GPUs only (tests run them interpreted). Nothing to time.")
        return 0
    kind = gpus[0].device_kind
    peak = peak_gbps(kind)
    print(f"device: {kind}, peak bandwidth: {peak or '?'} GB/s, jax {jax.__version__}, "
          f"dtype {args.dtype}")
    bench_attention(dtype, args.repeats, peak)
    bench_prefill(dtype, args.repeats, peak)
    bench_matmul(dtype, args.repeats, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
