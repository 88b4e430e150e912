"""A decode step's weight matmuls alone, through the native CPU kernel, weights cold.

Chains every layer's matmuls of a preset (q, k, v, o, MLP in, MLP out; the LM head is
left out: `examples/dot_roofline.py` covers it) at a few rows in one jitted call, each
call's input depending on the previous output, so the weights stream from memory as in a
decode step (more bytes than the CPU's caches) and nothing else runs. Prints the median
and best time of a step's matmuls and the GB/s of weights read:

    python examples/bench_step_matmuls.py --preset gpt2-124m --rows 8 --dtype float32
    python examples/bench_step_matmuls.py --rows 1,8 --dtype bfloat16 --repeats 30

Use it to A/B a change of `pallas_kernels/cpu_matmul.cc` (two checkouts, alternating):
whole-model decode timings on a shared 2-core VM drift more than a kernel change moves.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ftjax.config import preset  # noqa: E402
from pallas_kernels import cpu_matmul  # noqa: E402


def step_weights(cfg, dtype, rng):
    """Every layer's projection weights, `[K, N]`, in layer order."""
    d, f = cfg.d_model, cfg.d_ff
    qkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = [(d, qkv[0]), (d, qkv[1]), (d, qkv[1]), (qkv[0], d), (d, f), (f, d)]
    return [jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
            for _ in range(cfg.n_layers) for s in shapes]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--rows", default="8", help="comma list of rows (the decode batch)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    if not cpu_matmul.available():
        print("the native CPU kernels are not available here", file=sys.stderr)
        return 1
    cfg = preset(args.preset)
    rng = np.random.default_rng(0)
    int8 = args.dtype == "int8"
    ws = step_weights(cfg, jnp.int8 if int8 else jnp.dtype(args.dtype), rng)
    scales = [jnp.ones((w.shape[1],), jnp.float32) if int8 else None for w in ws]
    act = jnp.float32 if int8 else jnp.dtype(args.dtype)
    gb = sum(w.size * w.dtype.itemsize for w in ws) / 1e9

    def step(x, ws, scales):
        h = x
        for w, s in zip(ws, scales):
            inp = h if h.shape[1] == w.shape[0] else x[:, :1] * 0 + h[:, :w.shape[0]]
            h = (cpu_matmul.matmul(inp, w, s) * 1e-3).astype(act)
        return h

    f = jax.jit(step)
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, cfg.d_model)), act)
        f(x, ws, scales).block_until_ready()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f(x, ws, scales).block_until_ready()
            ts.append(time.perf_counter() - t0)
        med = float(np.median(ts))
        print(f"{args.preset} {args.dtype} rows {rows}: {len(ws)} matmuls, {gb * 1e3:.0f} MB: "
              f"median {med * 1e3:.2f} ms, best {min(ts) * 1e3:.2f} ms, {gb / med:.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
