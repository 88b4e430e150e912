"""`ftjax bench`: FasterTransformer-style latency / throughput tables.

For each batch size (one "cell"): end-to-end latency of `generate` (input_len prompt,
output_len generated tokens, eos ignored), first-token (prefill) latency, generated
tokens/s, decode tokens/s against the memory-bandwidth roofline, and peak resident
memory. `--compare hf` times HuggingFace `generate()` on the same weights in a separate
process (`ftjax.bench_hf`): XLA's and torch's thread pools starve each other on a small
CPU when both live in one process. `--json FILE` writes every number for scripts
(`examples/bench_cpu_table.py` builds the README table from it).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ftjax
from ftjax import quant as q
from ftjax.api import DTYPES, Model
from ftjax.config import preset
from ftjax.sharding import mesh_for
from ftjax.specs import init_params, n_params
from ftjax.timing import median_time

# /proc/cpuinfo flag -> the name tables use, in the order printed.
_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512F"), ("avx512bw", "BW"), ("avx512_vnni", "VNNI"),
        ("avx512_bf16", "BF16"), ("amx_tile", "AMX"), ("asimd", "NEON"), ("sve", "SVE"))


def cpu_description() -> str:
    """"<model name>, <cores> cores, <ISA>" from /proc/cpuinfo (platform's name elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    isa = [label for flag, label in _ISA if flag in flags]
    if "AMX" not in isa and flags and "avx512f" in flags:
        isa.append("no AMX")
    return f"{name}, {os.cpu_count()} cores, {' '.join(isa) or 'ISA unknown'}"


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth (bytes/s) of a jitted reduction over a large array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    del x
    return n_bytes / min(times)


def decode_bytes_per_step(model, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight once, plus the KV cache in use."""
    cfg = model.config
    params = model.params
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    if cfg.positions == "learned":  # one row of the position table, not all of it
        weights -= params["pos_embed"].nbytes
    if model.kv_cache_dtype == "int8":  # int8 values + one float32 scale per head vector
        per_vector = cfg.head_dim + 4
    else:
        per_vector = cfg.head_dim * jnp.dtype(model.engine.dtype).itemsize
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * per_vector
    return weights + kv


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args):
    mesh = mesh_for(tensor=args.tp, data=args.dp, pipe=getattr(args, "pp", 1))
    quant = getattr(args, "quant", None)
    kv = getattr(args, "kv_cache_dtype", None)
    if args.model:
        return ftjax.load(args.model, dtype=args.dtype, mesh=mesh, quant=quant,
                          kv_cache_dtype=kv)
    name = args.preset or "gpt2-124m"
    cfg = preset(name)
    params = init_params(cfg, seed=0, dtype=DTYPES[args.dtype])
    if quant is not None:
        q.check_mode(quant)
        if quant == "w8a8":
            raise ValueError("bench --quant w8a8 needs calibration text: convert a checkpoint "
                             "with `ftjax convert --quant w8a8` and bench it with --model")
        params = q.quantize_params(cfg, jax.tree_util.tree_map(jnp.asarray, params),
                                   128 if quant == "int8-g128" else 0)
    if mesh is not None:  # placed shard by shard from host copies
        params = jax.tree_util.tree_map(np.asarray, params)
    return Model(cfg, params, args.dtype, path=f"preset:{name}", mesh=mesh, kv_cache_dtype=kv)


def time_hf(args, prompts: dict) -> dict:
    """HF generate() timings per batch, measured by `python -m ftjax.bench_hf` (a separate
    process: this one waits idle meanwhile). HF runs float weights in --dtype."""
    job = {"model": args.model, "preset": None if args.model else (args.preset or "gpt2-124m"),
           "dtype": args.dtype, "seed": 0, "prompts": {str(b): p for b, p in prompts.items()},
           "output_len": args.output_len, "repeats": args.repeats}
    r = subprocess.run([sys.executable, "-m", "ftjax.bench_hf"], input=json.dumps(job),
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"bench --compare hf: the HF process failed (exit {r.returncode}):\n"
                           f"{r.stderr[-2000:]}")
    lines = r.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"bench --compare hf: the HF process printed no result; stderr:\n"
                           f"{r.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["rows"] = {int(b): v for b, v in out["rows"].items()}
    return out


def _header(hf: bool) -> str:
    h = (f"{'batch':>5} {'in':>5} {'out':>5} {'latency ms':>11} {'1st tok ms':>11} "
         f"{'tok/s':>8} {'decode tok/s':>13} {'roofline tok/s':>15} {'% roof':>7} "
         f"{'peak RSS MiB':>13}")
    if hf:
        h += (f" {'HF latency ms':>14} {'HF 1st ms':>10} {'HF tok/s':>9} {'HF dec tok/s':>13} "
              f"{'x HF':>6} {'dec x HF':>9}")
    return h


def _row(r: dict) -> str:
    s = (f"{r['batch']:>5} {r['input_len']:>5} {r['output_len']:>5} {r['latency_ms']:>11.1f} "
         f"{r['first_token_ms']:>11.1f} {r['tok_s']:>8.1f} {r['decode_tok_s']:>13.1f} "
         f"{r['roofline_tok_s']:>15.1f} {r['roofline_pct']:>6.0f}% {r['peak_rss_mib']:>13.0f}")
    if "hf_latency_ms" in r:
        s += (f" {r['hf_latency_ms']:>14.1f} {r['hf_first_token_ms']:>10.1f} {r['hf_tok_s']:>9.1f} "
              f"{r['hf_decode_tok_s']:>13.1f} {r['speedup']:>5.2f}x {r['decode_speedup']:>8.2f}x")
    return s


def _decode_tps(batch: int, out_len: int, latency: float, first: float) -> float:
    # the first token comes out of the prefill; the rest are decode steps
    return batch * (out_len - 1) / max(latency - first, 1e-9)


def run_bench(args) -> int:
    model = _load(args)
    cfg = model.config
    if args.input_len + args.output_len > cfg.max_positions:
        raise ValueError(f"--input-len + --output-len = {args.input_len + args.output_len} "
                         f"exceeds the model's max_positions {cfg.max_positions}")
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.input_len)).tolist()
               for b in args.batch}
    sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])  # exactly output_len tokens
    bandwidth = measure_bandwidth()
    meta = {"model": model.path, "params_m": n_params(cfg) / 1e6, "dtype": args.dtype,
            "quant": model.quant, "kv_cache_dtype": model.kv_cache_dtype,
            "jax": jax.__version__, "python": platform.python_version(),
            "platform": jax.devices()[0].platform, "devices": jax.device_count(),
            "cpu": cpu_description(), "bandwidth_gbs": bandwidth / 1e9,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "pid": os.getpid(),
            # the library's own A/B switches (FTJAX_LAYER_LOOP, ...)
            "ftjax_env": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith("FTJAX_") and k != "FTJAX_CACHE_DIR"}}
    extra = "".join(f", {k} {meta[k]}" for k in ("quant", "kv_cache_dtype") if meta[k])
    print(f"model: {model.path}  ({meta['params_m']:.1f}M params, {args.dtype}{extra}); "
          f"jax {jax.__version__} on {meta['platform']} x{meta['devices']}, "
          f"tp={args.tp} dp={args.dp} pp={getattr(args, 'pp', 1)}")
    print(f"cpu: {meta['cpu']}")
    print(f"measured memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    hf = None
    if args.compare == "hf":
        print(f"HF: timed in a separate process (float weights, {args.dtype})")
        sys.stdout.flush()
        hf_run = time_hf(args, prompts)
        hf = hf_run["rows"]
        meta.update(hf_pid=hf_run["pid"], hf_peak_rss_mib=hf_run["peak_rss_mib"])
    print(_header(hf is not None))
    rows = []
    for batch in args.batch:
        ids = prompts[batch]

        def run():
            return model.generate(ids, max_new_tokens=args.output_len, sampling=sp)

        def prefill():
            return model.generate(ids, max_new_tokens=1, sampling=sp)

        latency = median_time(run, args.repeats)
        first = median_time(prefill, args.repeats)
        decode_tps = _decode_tps(batch, args.output_len, latency, first)
        context = args.input_len + args.output_len // 2
        roofline = batch * bandwidth / decode_bytes_per_step(model, batch, context)
        r = {"batch": batch, "input_len": args.input_len, "output_len": args.output_len,
             "latency_ms": latency * 1e3, "first_token_ms": first * 1e3,
             "tok_s": batch * args.output_len / latency, "decode_tok_s": decode_tps,
             "decode_step_ms": 1e3 * batch / decode_tps, "roofline_tok_s": roofline,
             "roofline_pct": 100 * decode_tps / roofline, "peak_rss_mib": _peak_rss_mib()}
        if hf is not None:
            h = hf[batch]
            r.update(hf_latency_ms=h["latency_s"] * 1e3, hf_first_token_ms=h["first_s"] * 1e3,
                     hf_tok_s=batch * args.output_len / h["latency_s"],
                     hf_decode_tok_s=_decode_tps(batch, args.output_len, h["latency_s"],
                                                 h["first_s"]))
            r.update(speedup=r["tok_s"] / r["hf_tok_s"],
                     decode_speedup=decode_tps / r["hf_decode_tok_s"])
        rows.append(r)
        print(_row(r))
        sys.stdout.flush()
    # torch must never have run here (it would share the cores with XLA's threads)
    meta["torch_imported"] = "torch" in sys.modules
    if getattr(args, "json", None):
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0
