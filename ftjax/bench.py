"""`ftjax bench`: FasterTransformer-style latency / throughput tables.

For each batch size: end-to-end latency of `generate` (input_len prompt,
output_len generated tokens, eos ignored), first-token (prefill) latency,
generated tokens/s, decode tokens/s against the memory-bandwidth roofline,
and peak resident memory. `--compare hf` times HuggingFace `generate()` on the
same weights in the same run.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ftjax
from ftjax.api import DTYPES, Model
from ftjax.config import preset
from ftjax.sharding import mesh_for
from ftjax.specs import init_params, n_params


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
    itemsize = jnp.dtype(model.engine.dtype).itemsize
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * itemsize
    return weights + kv


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(fn, repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load(args):
    mesh = mesh_for(tensor=args.tp, data=args.dp, pipe=getattr(args, "pp", 1))
    if args.model:
        return ftjax.load(args.model, dtype=args.dtype, mesh=mesh)
    cfg = preset(args.preset or "gpt2-124m")
    params = init_params(cfg, seed=0, dtype=DTYPES[args.dtype])
    if mesh is not None:  # placed shard by shard from host copies
        params = jax.tree_util.tree_map(np.asarray, params)
    return Model(cfg, params, args.dtype, path=f"preset:{args.preset or 'gpt2-124m'}", mesh=mesh)


def _hf_model(model, dtype: str):
    """The same weights as a HuggingFace torch model (`ftjax.hf_reference`, as eval uses)."""
    from ftjax.hf_reference import hf_causal_lm

    return hf_causal_lm(model, dtype)


def run_bench(args) -> int:
    model = _load(args)
    cfg = model.config
    if args.input_len + args.output_len > cfg.max_positions:
        raise ValueError(f"--input-len + --output-len = {args.input_len + args.output_len} "
                         f"exceeds the model's max_positions {cfg.max_positions}")
    rng = np.random.default_rng(0)
    sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])  # exactly output_len tokens
    bandwidth = measure_bandwidth()
    print(f"model: {model.path}  ({n_params(cfg) / 1e6:.1f}M params, {args.dtype}); "
          f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
          f"tp={args.tp} dp={args.dp} pp={getattr(args, 'pp', 1)}")
    print(f"measured memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    hf = _hf_model(model, args.dtype) if args.compare == "hf" else None
    header = (f"{'batch':>5} {'in':>5} {'out':>5} {'latency ms':>11} {'1st tok ms':>11} "
              f"{'tok/s':>8} {'decode tok/s':>13} {'roofline tok/s':>15} {'% roof':>7} "
              f"{'peak RSS MiB':>13}")
    if hf is not None:
        header += f" {'HF latency ms':>14} {'HF tok/s':>9} {'speedup':>8}"
    print(header)
    for batch in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.input_len)).tolist()

        def run():
            return model.generate(prompts, max_new_tokens=args.output_len, sampling=sp)

        def prefill():
            return model.generate(prompts, max_new_tokens=1, sampling=sp)

        latency = _time(run, args.repeats)
        first = _time(prefill, args.repeats)
        decode_s = max(latency - first, 1e-9)
        decode_tps = batch * (args.output_len - 1) / decode_s
        context = args.input_len + args.output_len // 2
        roofline = batch * bandwidth / decode_bytes_per_step(model, batch, context)
        row = (f"{batch:>5} {args.input_len:>5} {args.output_len:>5} {latency * 1e3:>11.1f} "
               f"{first * 1e3:>11.1f} {batch * args.output_len / latency:>8.1f} "
               f"{decode_tps:>13.1f} {roofline:>15.1f} {100 * decode_tps / roofline:>6.0f}% "
               f"{_peak_rss_mib():>13.0f}")
        if hf is not None:
            import torch

            ids = torch.tensor(prompts)
            mask = torch.ones_like(ids)

            def run_hf():
                with torch.no_grad():
                    hf.generate(ids, attention_mask=mask, max_new_tokens=args.output_len,
                                min_new_tokens=args.output_len, do_sample=False,
                                pad_token_id=0)

            hf_latency = _time(run_hf, args.repeats)
            row += (f" {hf_latency * 1e3:>14.1f} {batch * args.output_len / hf_latency:>9.1f} "
                    f"{hf_latency / latency:>7.2f}x")
        print(row)
        sys.stdout.flush()
    return 0
