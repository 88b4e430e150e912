"""The best XLA:CPU dot for decode-shaped matmuls, in isolation (issue 19's measurement).

Decode reads every weight once per step, so a decode step can only be as fast as the
dots that read them. This times `x [M, K] @ w [K, N]` for the gpt2 weight shapes at
M = 1 and M = 8 with float32, bfloat16 and int8 weights, and reports GB/s of WEIGHT
bytes against the machine's measured read bandwidth (a jitted sum over 1 GiB):

    f32           x f32 @ w f32
    bf16          x bf16 @ w bf16 -> f32 (preferred_element_type)
    bf16-upcast   x f32 @ w.astype(f32) (XLA may fuse the convert into the dot)
    int8          x f32 @ w.astype(f32), per-column scale applied after the dot
    int8-w8a8     x quantized per row to int8, int8 x int8 -> int32 dot, then scales
    bf16-copy     w upcast to an f32 copy first (an optimization_barrier keeps the convert
                  out of the dot), then the f32 dot: "one layer's f32 copy at a time"
    int8-copy     the same for int8 weights, per-column scale after the dot
    *-NK          f32 / bf16 / int8 weights stored transposed, `[N, K]`: the dot
                  contracts each weight row's contiguous K (x @ w.T, w upcast in the dot)
    cpu-*         ftjax's native few-row matmul (`pallas_kernels.cpu_matmul`, what the
                  engine's decode step runs on one CPU device) on the same weights

Each XLA flag set runs in its own process (XLA_FLAGS is read once per process; an
unknown flag or value aborts it, reported as "rejected"). Weights are replicated into
enough unrolled copies that one call reads >= 256 MB, so no copy stays in cache.

    python examples/dot_roofline.py [--flags default,onednn,ynn-dot] [--m 1,8]
        [--shapes ffn_up,lm_head] [--presets gpt2-124m,gpt2-774m] [--repeats 5]

Timings on a shared machine are noisy: compare variants within one run (one process
measures all of them back to back), and say the load beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "ynn-dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn-individual-dot": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "xnn-greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn-custom-call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn-fusion-dot": "--xla_cpu_experimental_onednn_fusion_type=dot",
}
VARIANTS = ("f32", "bf16", "bf16-upcast", "int8", "int8-w8a8", "bf16-copy", "int8-copy",
            "f32-NK", "bf16-NK", "int8-NK", "cpu-f32", "cpu-bf16", "cpu-int8", "cpu-f32-NK",
            "cpu-bf16-NK", "cpu-int8-NK")
DIMS = {"gpt2-124m": 768, "gpt2-774m": 1280}
VOCAB = 50257
MIN_BYTES = 256 << 20


def _shape(name: str, d: int) -> tuple:
    return {"qkv": (d, 3 * d), "ffn_up": (d, 4 * d), "ffn_down": (4 * d, d),
            "lm_head": (d, VOCAB)}[name]


def _fn(variant: str):
    """(weights-maker, jitted f(x, ws)) for one variant; ws is a tuple of copies."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32

    def over(one):  # unrolled over the copies, as the model's per-layer loop
        return jax.jit(lambda x, ws: [one(x, w) for w in ws])

    if variant == "f32":
        return (lambda w: (w,)), over(lambda x, w: jnp.dot(x, w[0]))
    if variant == "bf16":
        return ((lambda w: (w.astype(jnp.bfloat16),)),
                over(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w[0],
                                          preferred_element_type=f32)))
    if variant == "bf16-upcast":
        return ((lambda w: (w.astype(jnp.bfloat16),)),
                over(lambda x, w: jnp.dot(x, w[0].astype(f32))))

    def copy32(w):
        return jax.lax.optimization_barrier(w.astype(f32))

    if variant == "bf16-copy":
        return ((lambda w: (w.astype(jnp.bfloat16),)),
                over(lambda x, w: jnp.dot(x, copy32(w[0]))))

    def quantize(w):
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        return jnp.round(w / scale).astype(jnp.int8), scale

    if variant == "int8":
        return quantize, over(lambda x, w: jnp.dot(x, w[0].astype(f32)) * w[1])
    if variant == "int8-w8a8":
        def w8a8(x, w):
            xs = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
            xq = jnp.round(x / xs).astype(jnp.int8)
            acc = jax.lax.dot(xq, w[0], preferred_element_type=jnp.int32)
            return acc.astype(f32) * xs * w[1]
        return quantize, over(w8a8)
    if variant == "f32-NK":
        return (lambda w: (w.T.copy(),)), over(lambda x, w: jnp.dot(x, w[0].T))
    if variant == "bf16-NK":
        return ((lambda w: (w.T.astype(jnp.bfloat16),)),
                over(lambda x, w: jnp.dot(x, w[0].astype(f32).T)))
    if variant == "int8-NK":
        def make(w):
            q, scale = quantize(w)
            return q.T.copy(), scale
        return make, over(lambda x, w: jnp.dot(x, w[0].astype(f32).T) * w[1])
    if variant == "int8-copy":
        return quantize, over(lambda x, w: jnp.dot(x, copy32(w[0])) * w[1])
    if variant.startswith("cpu-"):
        from pallas_kernels import cpu_matmul

        base, nk = variant[4:].replace("-NK", ""), variant.endswith("-NK")
        if base == "int8":
            def make(w):
                q, scale = quantize(w)
                return (q.T.copy() if nk else q), scale
        else:
            dt = jnp.bfloat16 if base == "bf16" else f32
            make = (lambda w: ((w.T if nk else w).astype(dt).copy(),))
        # a bf16 model's rows are bf16 (the kernel then multiplies bf16 pairs)
        cast = (lambda x: x.astype(jnp.bfloat16)) if base == "bf16" else (lambda x: x)
        return make, over(lambda x, w: cpu_matmul.matmul(cast(x), w[0],
                                                         w[1] if len(w) > 1 else None, nk=nk))
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def child(args) -> dict:
    """Measures every (preset, shape, M, variant) in this process's XLA flags."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ftjax.bench import measure_bandwidth

    bandwidth = measure_bandwidth()
    rows = []
    rng = np.random.default_rng(0)
    for preset in args.presets.split(","):
        for shape_name in args.shapes.split(","):
            k, n = _shape(shape_name, DIMS[preset])
            w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
            for variant in args.variants.split(","):
                make, f = _fn(variant)
                one = make(w)
                nbytes = sum(a.nbytes for a in one)
                copies = max(1, -(-MIN_BYTES // nbytes))
                # distinct buffers (a scaled copy), so no copy is the previous one in cache
                ws = tuple(jax.tree_util.tree_map(lambda a: a + 0 * i, one)
                           for i in range(copies))
                for m in (int(v) for v in args.m.split(",")):
                    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                    jax.block_until_ready(f(x, ws))
                    times = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        jax.block_until_ready(f(x, ws))
                        times.append(time.perf_counter() - t0)
                    best = min(times)
                    rows.append(dict(preset=preset, shape=f"{shape_name} {k}x{n}", m=m,
                                     variant=variant, ms=1e3 * best / copies,
                                     gbs=nbytes * copies / best / 1e9))
                del ws, one
    return {"jax": jax.__version__, "bandwidth_gbs": bandwidth / 1e9, "rows": rows}


def run_flag_set(name: str, argv, timeout: float) -> dict:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " +
                                      FLAG_SETS[name]).strip())
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                           env=env, capture_output=True, text=True, check=False,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rejected": f"timed out after {timeout:.0f} s (some dot pathologically slow)"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"rejected": f"exit {r.returncode}: {tail}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def render(results: dict) -> str:
    lines = []
    for name, res in results.items():
        flags = FLAG_SETS[name] or "(none)"
        if "rejected" in res:
            lines.append(f"### {name}: `{flags}`: no result ({res['rejected']})\n")
            continue
        bw = res["bandwidth_gbs"]
        lines += [f"### {name}: XLA_FLAGS `{flags}` (jax {res['jax']}, read bandwidth "
                  f"{bw:.1f} GB/s)", "",
                  "| model | weight K x N | M | " + " | ".join(VARIANTS) + " |",
                  "|---|---|---|" + "---|" * len(VARIANTS)]
        cells = {}
        for r in res["rows"]:
            cells.setdefault((r["preset"], r["shape"], r["m"]), {})[r["variant"]] = r
        for (preset, shape, m), by in cells.items():
            row = [f"{by[v]['gbs']:.1f} GB/s ({100 * by[v]['gbs'] / bw:.0f}%)" if v in by else "-"
                   for v in VARIANTS]
            lines.append(f"| {preset} | {shape} | {m} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flags", default=",".join(FLAG_SETS),
                   help=f"comma list of flag sets: {', '.join(FLAG_SETS)}")
    p.add_argument("--presets", default="gpt2-124m,gpt2-774m")
    p.add_argument("--shapes", default="ffn_up,lm_head", help="qkv, ffn_up, ffn_down, lm_head")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--m", default="1,8", help="rows of x (the decode batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=300, help="seconds per flag set")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    unknown = set(args.flags.split(",")) - set(FLAG_SETS)
    if unknown:
        raise SystemExit(f"unknown flag sets {sorted(unknown)}; known: {list(FLAG_SETS)}")
    passthrough = ["--presets", args.presets, "--shapes", args.shapes, "--variants",
                   args.variants, "--m", args.m, "--repeats", str(args.repeats)]
    for name in args.flags.split(","):  # each section printed as soon as it is measured
        t0 = time.perf_counter()
        res = run_flag_set(name, passthrough, args.timeout)
        print(render({name: res}), flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
