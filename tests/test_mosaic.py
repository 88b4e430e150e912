"""Mosaic GPU kernels (`pallas_kernels.mosaic`), proven without a GPU as far as jax allows:

1. numerics in jax's Mosaic GPU interpreter (jax >= 0.12: `InterpretGPUParams`; skipped on
   older jax, which has none) against the jnp references;
2. CUDA lowering on every jax: the Pallas -> Mosaic GPU lowering (layouts, wgmma shapes,
   TMA transforms) must succeed and emit the `mosaic_gpu` custom call. PTX compilation and
   running on a real Hopper are left to `python -m ftjax.gpu_check`.
"""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    decode_attention_reference,
    int8_matmul_reference,
    mosaic,
    quantize_int8,
    select,
)

# `python -m ftjax.gpu_check` sets FTJAX_GPU_CHECK=1: the kernels run on the GPU for real.
INTERPRET = os.environ.get("FTJAX_GPU_CHECK") != "1"
needs_interpreter = pytest.mark.skipif(INTERPRET and not mosaic.has_interpreter(),
                                       reason="no Mosaic GPU interpreter in this jax (< 0.12)")
TRITON_CALL = "__gpu$xla.gpu.triton"
# As test_kernels (bf16 / fp16 rows): the probabilities meet V in the input dtype and the
# output is rounded once. Measured here: bf16 7.8e-3, fp16 9.8e-4 (attention);
# matmul: 0 (bf16) and <= 1 ulp of fp16 (the scale is applied after the float32 sum).
ATTN_TOL = {jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}
MATMUL_RTOL = {jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


def _rand(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


@needs_interpreter
@pytest.mark.parametrize("dtype,n,kv,alibi,splits", [
    (jnp.bfloat16, 8, 2, True, 2),     # GQA G=4, ALiBi, two splits merged
    (jnp.float16, 4, 4, False, 1),     # MHA, one split
])
def test_mosaic_decode_attention_matches_reference(dtype, n, kv, alibi, splits):
    """Stacked [L, B, K, S, H] cache with a traced layer; lengths 1 (one block), 70 (ends
    inside a block of the second split) and S."""
    rng = np.random.default_rng(0)
    n_layers, b, s, h = 2, 3, 128, 64
    q = _rand(rng, (b, n, h), dtype)
    k, v = _rand(rng, (n_layers, b, kv, s, h), dtype), _rand(rng, (n_layers, b, kv, s, h), dtype)
    lengths = jnp.asarray([1, 70, s], jnp.int32)
    slopes = jnp.asarray(rng.uniform(0.05, 0.3, n), jnp.float32) if alibi else None
    out = mosaic.decode_attention(q, k, v, lengths, alibi_slopes=slopes, layer=jnp.int32(1),
                                  num_splits=splits, interpret=INTERPRET)
    ref = decode_attention_reference(q, k, v, lengths, alibi_slopes=slopes, layer=1,
                                     layout="BKSH")
    assert out.dtype == dtype and out.shape == q.shape
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= ATTN_TOL[dtype], err


@needs_interpreter
def test_mosaic_decode_attention_reads_one_kv_head():
    """kv_head= (a tensor rank with replicated kv heads): all query heads over that head."""
    rng = np.random.default_rng(1)
    b, n, kv, s, h = 2, 4, 3, 64, 64
    q = _rand(rng, (b, n, h), jnp.bfloat16)
    k, v = _rand(rng, (b, kv, s, h), jnp.bfloat16), _rand(rng, (b, kv, s, h), jnp.bfloat16)
    lengths = jnp.asarray([9, 64], jnp.int32)
    out = mosaic.decode_attention(q, k, v, lengths, kv_head=jnp.int32(2), interpret=INTERPRET)
    ref = decode_attention_reference(q, k[:, 2:], v[:, 2:], lengths, layout="BKSH")
    assert float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()) <= 1.6e-2


@needs_interpreter
@pytest.mark.parametrize("m,k,n,dtype", [(1, 128, 192, jnp.bfloat16),
                                         (70, 64, 128, jnp.float16)])   # two row tiles
def test_mosaic_int8_matmul_matches_reference(m, k, n, dtype):
    rng = np.random.default_rng(2)
    x = _rand(rng, (m, k), dtype)
    w_q, scale = quantize_int8(rng.standard_normal((k, n)))
    out = mosaic.int8_matmul(x, w_q, scale, interpret=INTERPRET)
    ref = int8_matmul_reference(x, w_q, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= MATMUL_RTOL[dtype] * float(jnp.abs(ref.astype(jnp.float32)).max()), err


def test_mosaic_limits_are_named_and_select_falls_back_to_triton():
    q = jnp.zeros((2, 8, 64), jnp.bfloat16)
    cache = jnp.zeros((2, 2, 100, 64), jnp.bfloat16)
    assert "multiple of 16" in mosaic.decode_supported(q, cache)
    assert "bf16/fp16" in mosaic.decode_supported(q.astype(jnp.float32),
                                                  cache.astype(jnp.float32))
    assert "layout" in mosaic.decode_supported(q, cache, layout="BSKH")
    with pytest.raises(ValueError, match="unsupported cache length S=100"):
        mosaic.decode_attention(q, cache, cache, jnp.ones(2, jnp.int32))
    x, w = jnp.zeros((1, 64), jnp.bfloat16), jnp.zeros((64, 100), jnp.int8)
    assert "K=64, N=100" in mosaic.int8_matmul_supported(x, w, jnp.ones(100))
    assert "per-group" in mosaic.int8_matmul_supported(x, w, jnp.ones((1, 100)), 64)
    # impl="mosaic" outside Mosaic's limits (an int8 cache; ragged N) lowers to Triton.
    k8 = jnp.zeros((2, 2, 128, 64), jnp.int8)
    s8 = jnp.zeros((2, 2, 128), jnp.float32)
    text = _lower(lambda q, k, s: select.decode_attention(q, k, k, jnp.ones(2, jnp.int32),
                                                          impl="mosaic", k_scale=s, v_scale=s,
                                                          layout="BKSH"), q, k8, s8)
    assert TRITON_CALL in text and mosaic.CUSTOM_CALL not in text
    text = _lower(lambda x, w: select.int8_matmul(x, w, jnp.ones(100), impl="mosaic"), x, w)
    assert TRITON_CALL in text and mosaic.CUSTOM_CALL not in text
    with pytest.raises(ValueError, match="implementation must be one of"):
        select.int8_matmul(x, w, jnp.ones(100), impl="cuda")


@pytest.mark.skipif(mosaic.has_interpreter(), reason="this jax has the interpreter")
def test_mosaic_without_interpreter_says_so():
    x, w = jnp.zeros((1, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.int8)
    with pytest.raises(NotImplementedError, match="jax >= 0.12"):
        mosaic.int8_matmul(x, w, jnp.ones(64), interpret=True)


def _lower(fn, *args):
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132,
                                      platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("h,n,kv,dtype", [(128, 32, 8, jnp.bfloat16),   # Llama-2-70B-like
                                          (64, 12, 12, jnp.float16),    # GPT-2
                                          (128, 64, 1, jnp.bfloat16)])  # MQA, G = 64
def test_mosaic_decode_attention_lowers_for_cuda(h, n, kv, dtype):
    """The model's call: a 24-layer [L, B, K, S, H] cache, traced layer, ALiBi."""
    b, s, n_layers = 4, 2048, 24
    cache = _sds((n_layers, b, kv, s, h), dtype)
    text = _lower(lambda q, k, v, lengths, layer, slopes: mosaic.decode_attention(
        q, k, v, lengths, alibi_slopes=slopes, layer=layer),
        _sds((b, n, h), dtype), cache, cache, _sds((b,), jnp.int32), _sds((), jnp.int32),
        _sds((n,), jnp.float32))
    assert mosaic.CUSTOM_CALL in text and TRITON_CALL not in text


@pytest.mark.parametrize("m,k,n,dtype", [(1, 768, 2304, jnp.float16),      # GPT-2 QKV
                                         (16, 4096, 11008, jnp.bfloat16),  # Llama-7B MLP
                                         (128, 5120, 1024, jnp.bfloat16)])
def test_mosaic_int8_matmul_lowers_for_cuda(m, k, n, dtype):
    text = _lower(lambda x, w, s: mosaic.int8_matmul(x, w, s), _sds((m, k), dtype),
                  _sds((k, n), jnp.int8), _sds((n,), jnp.float32))
    assert mosaic.CUSTOM_CALL in text and TRITON_CALL not in text


@needs_interpreter
def test_model_through_mosaic_matches_triton_kernels():
    """generate() in bfloat16 with kernels="mosaic" (Mosaic decode attention and int8
    matmuls, interpreted; Triton prefill) = kernels="pallas" (all Triton): same greedy
    tokens; log-probs within 0.05 (bf16: the two kernels round the attention output and
    the matmul's scaled result at different points, ~1 bf16 ulp of O(1) values)."""
    import ftjax
    from ftjax import quant
    from ftjax.api import Model
    from tiny import tiny_config, tiny_params

    cfg = tiny_config(n_layers=1, vocab_size=97, d_model=64, d_ff=128, n_heads=4,
                      n_kv_heads=2, head_dim=64, positions="alibi")
    # bf16 before quantizing: float leaves of quantized params are not cast by Model (on
    # main, 2026-12-02: a float32 bias then turns the scanned bf16 carry into float32).
    params = quant.quantize_params(
        cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), tiny_params(cfg)))
    sp = ftjax.SamplingParams(stop_token_ids=[])
    prompts = [[5, 1, 7], [9, 2, 4, 4, 8]]
    a = Model(cfg, params, "bfloat16", kernels="pallas").generate(prompts, 3, sp)
    b = Model(cfg, params, "bfloat16", kernels="mosaic").generate(prompts, 3, sp)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.concatenate(b.log_probs), np.concatenate(a.log_probs),
                               atol=5e-2)
