"""`ftjax plan`: per-device memory of a sharded model, computed without weights.

Two sources, both per device:
  1. arithmetic on the sharded abstract shapes: every param's
     `jax.ShapeDtypeStruct` (from the parameter spec table) and its
     NamedSharding give the shard each device holds; the same for the KV cache;
  2. XLA's own `memory_analysis()` of prefill and decode, compiled for the mesh
     from ShapeDtypeStructs (nothing is allocated; on a CPU-only machine the
     mesh is made of virtual CPU devices), where the backend reports it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.config import ModelConfig
from ftjax.engine import DECODE_CHUNK, Engine, Features
from ftjax.sampling import SamplingArrays, SamplingParams
from ftjax.sharding import Layout, make_mesh, nbytes_per_device
from ftjax.specs import n_params, shapes as param_shapes


@dataclasses.dataclass
class MemoryPlan:
    """Per-device bytes (see the module docstring); compiled figures may be None."""

    weights: int
    kv_cache: int
    weights_total: int
    kv_cache_total: int
    prefill: Optional[dict] = None
    decode: Optional[dict] = None


def _analysis(compiled) -> Optional[dict]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend / version implements it
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.replace("_size_in_bytes", ""): int(getattr(m, f, 0) or 0) for f in fields}
    # Peak estimate: live arguments + outputs (minus what aliases / donation reuses) + scratch.
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def plan_memory(cfg: ModelConfig, tensor: int = 1, pipe: int = 1, data: int = 1,
                batch: int = 1, max_len: Optional[int] = None, dtype=jnp.float16,
                input_len: Optional[int] = None, compile: bool = True) -> MemoryPlan:
    """Per-device memory of `cfg` on a (data, pipe, tensor) mesh.

    Args:
      cfg: the model shape.
      tensor, pipe, data: mesh sizes (pipe shards the stacked layers axis).
      batch: sequences served together (padded to a multiple of `data`).
      max_len: KV cache slots per sequence (default: cfg.max_positions).
      dtype: weights, activations and cache dtype.
      input_len: prompt length compiled for prefill (default: max_len // 2).
      compile: also compile prefill and decode for the memory analysis.
    Raises:
      ValueError: fewer devices than data * pipe * tensor, or shapes that do not divide.
    """
    max_len = min(max_len or cfg.max_positions, cfg.max_positions)
    layout = Layout(make_mesh(tensor=tensor, data=data, pipe=pipe), cfg)
    b = layout.batch_size(batch)
    abstract = param_shapes(cfg, dtype, layout.padded_vocab)  # from the spec table
    shapes = layout.param_shapes()
    shardings = layout.param_shardings()
    itemsize = np.dtype(dtype).itemsize
    weights = nbytes_per_device(shapes, shardings, dtype)
    weights_total = sum(int(np.prod(s)) * itemsize for s in jax.tree_util.tree_leaves(
        shapes, is_leaf=lambda x: isinstance(x, tuple)))
    cache_shape = (cfg.n_layers, b, cfg.n_kv_heads, max_len, cfg.head_dim)
    cache_sharding = layout.cache_sharding(b, max_len)
    kv = 2 * nbytes_per_device(cache_shape, cache_sharding, dtype)
    kv_total = 2 * int(np.prod(cache_shape)) * itemsize
    result = MemoryPlan(weights=weights, kv_cache=kv, weights_total=weights_total,
                        kv_cache_total=kv_total)
    if not compile:
        return result

    engine = Engine(cfg, dtype, layout=layout)
    params = jax.tree_util.tree_map(
        lambda s, x, sh: _sds(s, x.dtype, sh), shapes, abstract, shardings,
        is_leaf=lambda x: isinstance(x, tuple))
    t = min(input_len or max_len // 2, max_len - 1)
    width = max_len - t + DECODE_CHUNK
    sp = SamplingArrays.build([SamplingParams()] * b, b, cfg.vocab_size, cfg.eos_token_ids,
                              [max_len - t] * b)
    batch_sds = lambda x: _sds(x.shape, x.dtype, layout.batch_sharding(x.shape))  # noqa: E731
    sp = jax.tree_util.tree_map(batch_sds, sp)
    i32 = lambda *shape: batch_sds(jax.ShapeDtypeStruct(shape, jnp.int32))  # noqa: E731
    # Every row its own prompt (no shared prefill): the largest prefill of this batch.
    args = dict(tokens=i32(b, t), start=i32(b), lengths=i32(b), rows=i32(b),
                hist=i32(b, t + width))
    feat = Features()
    prefill = engine.prefill.lower(params, **args, sp=sp, max_len=max_len, width=width,
                                   feat=feat).compile()
    result.prefill = _analysis(prefill)
    state_shape, _ = jax.eval_shape(lambda: engine.prefill(
        params, **args, sp=sp, max_len=max_len, width=width, feat=feat))
    state = jax.tree_util.tree_map(lambda x, sh: _sds(x.shape, x.dtype, sh), state_shape,
                                   prefill.output_shardings[0])
    decode = engine.decode.lower(params, state, sp, feat=feat, chunk=DECODE_CHUNK).compile()
    result.decode = _analysis(decode)
    return result


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_plan(name: str, cfg: ModelConfig, p: MemoryPlan, tensor: int, pipe: int, data: int,
                batch: int, max_len: int, dtype_name: str) -> str:
    lines = [f"plan: {name} ({n_params(cfg) / 1e9:.1f}B params, {dtype_name}), "
             f"tp={tensor} pp={pipe} dp={data} ({tensor * pipe * data} devices), "
             f"batch={batch} max_len={max_len}",
             f"{'per device':<34} {'bytes':>16} {'':>12}",
             f"{'weights (sharded shapes)':<34} {p.weights:>16,} {_gib(p.weights):>12}",
             f"{'KV cache (sharded shapes)':<34} {p.kv_cache:>16,} {_gib(p.kv_cache):>12}",
             f"{'weights + KV cache':<34} {p.weights + p.kv_cache:>16,} "
             f"{_gib(p.weights + p.kv_cache):>12}"]
    for what, a in (("prefill", p.prefill), ("decode", p.decode)):
        if a is None:
            continue
        for k in ("argument", "output", "alias", "temp", "peak"):
            lines.append(f"{f'XLA {what}: {k}':<34} {a[k]:>16,} {_gib(a[k]):>12}")
    lines.append(f"{'total over all devices':<34} "
                 f"{p.weights_total + p.kv_cache_total:>16,} "
                 f"{_gib(p.weights_total + p.kv_cache_total):>12}")
    return "\n".join(lines)
