"""The one-command GPU proof: `python -m ftjax.gpu_check` (or `examples/gpu_check.sh`).

On an NVIDIA GPU it
  1. runs the kernel tests for real (`FTJAX_GPU_CHECK=1`: kernels compiled and run on the
     GPU, not interpreted) and stops with a non-zero status on any mismatch;
  2. times each kernel against the XLA path and the GPU's HBM peak (% of roofline):
     `examples/bench_kernels.py`, Triton and Mosaic GPU variants;
  3. prints one FasterTransformer-style table for a 1.5B-class GPT-2 and a 7B-class Llama
     (random weights; bf16, int8 weights, int8 KV cache; batch 1/8/32; input 128/512,
     output 32): end-to-end latency, first-token latency, tokens/s, decode tokens/s and
     the memory-bandwidth roofline (weights + KV cache read per step / peak HBM).
Without a GPU it says so and exits 0 at once. `--smoke` runs steps 2 and 3 at toy sizes
on any backend (interpreted kernels, tiny models; the numbers mean nothing): it checks
this script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_mosaic.py", "tests/test_kernels_mesh.py"]

# Peak HBM / GDDR bandwidth in GB/s (vendor data sheets), matched against device_kind.
PEAK_GBPS = [("H200", 4800), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
             ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
             ("L40", 864), ("L4", 300), ("A10", 600), ("RTX 4090", 1008), ("T4", 320),
             ("V100", 900), ("B200", 8000)]


def peak_gbps(kind: str) -> Optional[float]:
    for name, gbps in PEAK_GBPS:
        if name in kind:
            return gbps
    return None


def _env(**extra) -> dict:
    """The environment for child processes: this checkout's ftjax first on the path."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def gpu_devices():
    """The jax GPU devices, or [] (no GPU backend, or jax without CUDA support)."""
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


# -- 1. the kernel tests, for real --------------------------------------------------

def run_kernel_tests() -> int:
    tests = [t for t in KERNEL_TESTS if os.path.exists(os.path.join(REPO, t))]
    if not tests:
        print("kernel tests: not found next to this ftjax (run from a source checkout)")
        return 1
    env = _env(FTJAX_GPU_CHECK="1")
    print(f"== 1. kernel tests on the GPU (not interpreted): {' '.join(tests)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "not torch", *tests],
                           cwd=REPO, env=env)


# -- 2. kernel benchmarks -----------------------------------------------------------

def run_kernel_bench(smoke: bool) -> int:
    path = os.path.join(REPO, "examples", "bench_kernels.py")
    if not os.path.exists(path):
        print("kernel benchmarks: examples/bench_kernels.py not found")
        return 0
    print("== 2. kernels against XLA and the HBM roofline", flush=True)
    return subprocess.call([sys.executable, path] + (["--smoke"] if smoke else []), cwd=REPO,
                           env=_env())


# -- 3. the model table -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    dtype: str = "bfloat16"
    quant: Optional[str] = None
    kv: Optional[str] = None


MODES = [Mode("bf16"), Mode("int8", quant="int8"), Mode("int8 KV", kv="int8")]


def llama_7b():
    from ftjax.config import ModelConfig

    return ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                       head_dim=128, d_ff=11008, max_positions=4096, norm="rmsnorm",
                       activation="silu", glu=True, positions="rotary", attn_bias=False,
                       mlp_bias=False, tied_embeddings=False, eos_token_id=None)


def models(smoke: bool):
    from ftjax.config import ModelConfig, preset

    if smoke:
        tiny = dict(vocab_size=97, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4,
                    head_dim=16, d_ff=128, max_positions=64, eos_token_id=None)
        return [("tiny gpt2", ModelConfig(**tiny)),
                ("tiny llama", ModelConfig(**tiny, norm="rmsnorm", activation="silu", glu=True,
                                           positions="rotary", attn_bias=False,
                                           mlp_bias=False))]
    return [("gpt2-1.5b", preset("gpt2-1.5b")), ("llama-7b", llama_7b())]


def random_params(cfg, dtype):
    """Random params drawn on the device (a 7B model's host-side draw would take minutes
    and 28 GB of host memory): normal(0.02) weights, zero biases, unit norm scales."""
    import jax
    import jax.numpy as jnp

    from ftjax.specs import INIT_STDDEV, is_spec, param_specs

    specs, treedef = jax.tree_util.tree_flatten(param_specs(cfg), is_leaf=is_spec)
    key = jax.random.PRNGKey(0)
    out = []
    for i, s in enumerate(specs):
        if s.init == "zeros":
            out.append(jnp.zeros(s.shape, dtype))
        elif s.init == "ones":
            out.append(jnp.ones(s.shape, dtype))
        else:
            out.append(jax.random.normal(jax.random.fold_in(key, i), s.shape, dtype)
                       * INIT_STDDEV)
    return jax.tree_util.tree_unflatten(treedef, out)


def step_bytes(cfg, params, batch: int, context: int, kv: Optional[str], itemsize: int) -> int:
    """Bytes one decode step reads: every weight once (one row of a learned position
    table) and the KV cache in use (int8: 1 byte a value plus a float32 scale a vector)."""
    import jax

    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    if "pos_embed" in params:
        weights -= params["pos_embed"].nbytes
    vectors = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads
    per_vector = cfg.head_dim + 4 if kv == "int8" else cfg.head_dim * itemsize
    return weights + vectors * per_vector


def _median_time(fn, repeats: int):
    fn()   # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_model_table(smoke: bool, batches: List[int], input_lens: List[int], output_len: int,
                    repeats: int, budget_s: float, peak: Optional[float],
                    only: Optional[List[str]] = None) -> int:
    """Prints the model table (`only`: these model names). Returns 0; rows that fail to
    build or run (e.g. out of memory) are reported in the table."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ftjax
    from ftjax import quant
    from ftjax.api import Model

    print(f"== 3. models (random weights), output {output_len} tokens, peak HBM "
          f"{peak or '?'} GB/s", flush=True)
    header = (f"{'model':<11} {'mode':<8} {'batch':>5} {'in':>4} {'out':>4} {'latency ms':>11} "
              f"{'1st tok ms':>11} {'tok/s':>9} {'decode tok/s':>13} {'roofline':>10} "
              f"{'% roof':>7}")
    print(header)
    sp = ftjax.SamplingParams(temperature=0.0, stop_token_ids=[])
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for name, cfg in models(smoke):
        if only and name not in only:
            continue
        base = None
        for mode in MODES:
            if time.perf_counter() - start > budget_s:
                print(f"{name:<11} {mode.name:<8} skipped: the {budget_s:.0f} s budget is spent "
                      "(--budget-s)")
                continue
            try:
                if base is None:
                    base = random_params(cfg, jnp.bfloat16)
                params = quant.quantize_params(cfg, base) if mode.quant else base
                model = Model(cfg, params, mode.dtype, kv_cache_dtype=mode.kv,
                              path=f"random:{name}")
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, go on
                print(f"{name:<11} {mode.name:<8} failed to build: {type(e).__name__}: {e}")
                continue
            itemsize = jnp.dtype(model.engine.dtype).itemsize
            for t in input_lens:
                for b in batches:
                    if time.perf_counter() - start > budget_s:
                        print(f"{name:<11} {mode.name:<8} {b:>5} {t:>4} skipped (budget)")
                        continue
                    prompts = rng.integers(0, cfg.vocab_size, (b, t)).tolist()

                    def run():
                        t0, first = time.perf_counter(), None
                        for _ in model.stream(prompts, output_len, sp):
                            first = first or time.perf_counter() - t0
                        return first

                    try:
                        latency, first = _median_time(run, repeats)
                    except Exception as e:  # noqa: BLE001
                        print(f"{name:<11} {mode.name:<8} {b:>5} {t:>4} failed: "
                              f"{type(e).__name__}: {str(e)[:80]}")
                        continue
                    decode_tps = b * (output_len - 1) / max(latency - first, 1e-9)
                    context = t + output_len // 2
                    roof = (b * peak * 1e9 / step_bytes(cfg, model.params, b, context, mode.kv,
                                                        itemsize)) if peak else None
                    print(f"{name:<11} {mode.name:<8} {b:>5} {t:>4} {output_len:>4} "
                          f"{latency * 1e3:>11.1f} {first * 1e3:>11.1f} "
                          f"{b * output_len / latency:>9.1f} {decode_tps:>13.1f} "
                          f"{roof or float('nan'):>10.1f} "
                          f"{(100 * decode_tps / roof) if roof else float('nan'):>6.0f}%",
                          flush=True)
            del model, params
        del base
        jax.clear_caches()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes on any backend (interpreted kernels): checks this "
                             "script; the numbers mean nothing")
    parser.add_argument("--skip-tests", action="store_true", help="skip step 1")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="time for the model table; rows past it are listed as skipped")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    gpus = [] if args.smoke else gpu_devices()
    if not args.smoke and not gpus:
        import jax

        print(f"No NVIDIA GPU visible to jax (backend: {jax.default_backend()}, jax "
              f"{jax.__version__}): nothing to check. On a GPU machine: "
              f"pip install -e '.[gpu]' and run again.")
        return 0
    import jax

    kind = gpus[0].device_kind if gpus else jax.devices()[0].device_kind
    peak = peak_gbps(kind) if gpus else None
    cc = getattr(gpus[0], "compute_capability", "?") if gpus else "-"
    print(f"ftjax gpu_check: {kind} (compute capability {cc}), jax {jax.__version__}, "
          f"{len(gpus)} GPU(s)", flush=True)
    status = 0
    if not args.smoke and not args.skip_tests:
        status = run_kernel_tests()
        if status:
            print("gpu_check: kernel tests FAILED (numerical mismatch or error); stopping.")
            return status
    if run_kernel_bench(args.smoke):
        print("gpu_check: kernel benchmark failed")
        status = 1
    if args.smoke:
        run_model_table(True, [1, 2], [8], 4, 1, args.budget_s, None)
    else:
        run_model_table(False, [1, 8, 32], [128, 512], 32, args.repeats, args.budget_s, peak)
    print(f"gpu_check: done in {time.perf_counter() - t0:.0f} s, status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
