"""Pallas kernels, proven without a GPU two ways:

1. numerics: the kernel runs in the Pallas interpreter (`interpret=True`) and is
   compared with its plain-jnp reference (float32 math);
2. CUDA lowering: `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs the
   real Triton lowering (power-of-two blocks, supported ops, dot shapes) and the module
   must contain the Triton custom call.

Interpreter cost grows with grid steps x array size, so shapes are tiny.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lowering import lower_for_cuda

from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    int8_matmul,
    int8_matmul_reference,
    prefill_attention,
    prefill_attention_reference,
    quantize_int8,
)

TRITON_CALL = "__gpu$xla.gpu.triton"
# `python -m ftjax.gpu_check` sets FTJAX_GPU_CHECK=1: the kernels then compile and run on
# the GPU instead of the interpreter (same cases, same tolerances).
INTERPRET = os.environ.get("FTJAX_GPU_CHECK") != "1"

# Tolerances (max abs error for attention, outputs O(1); max error relative to max |y|
# for the matmul), about 2-6x the error measured on jax 0.10 and 0.12:
# - float32: both sides accumulate in fp32; only summation order and the online
#   softmax's rescaling differ: measured <= 3e-7 (attention), <= 4e-7 (matmul).
# - bfloat16 / float16: the kernel feeds the softmax probabilities to the second dot in
#   the input dtype (as FlashAttention does) and rounds the output once; bf16 has an
#   8-bit mantissa (step 2^-7 = 7.8e-3 at |y| in [1, 2)), fp16 11 bits. Measured:
#   attention bf16 7.8e-3, fp16 4.9e-4; matmul bf16 0 (same rounding), fp16 1.6e-5.
ATTN_TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}
MATMUL_RTOL = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-4}


def _rand(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _quantize_cache(x, axis=-1):
    """Per-(slot, head) symmetric int8: scale over the head-width axis."""
    scale = jnp.maximum(jnp.abs(x).max(axis=axis), 1e-6) / 127.0
    q = jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(jnp.float32)


def _attn_case(layout, n, kv, dtype, alibi=False, int8=False, b=3, s=40, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = _rand(rng, (b, n, h), dtype)
    shape = (b, s, kv, h) if layout == "BSKH" else (b, kv, s, h)
    k, v = _rand(rng, shape, dtype), _rand(rng, shape, dtype)
    kw = {"layout": layout}
    if int8:
        (k, kw["k_scale"]), (v, kw["v_scale"]) = _quantize_cache(k), _quantize_cache(v)
    if alibi:
        kw["alibi_slopes"] = jnp.asarray(rng.uniform(0.05, 0.5, n), jnp.float32)
    # Length 1, one ending inside a block, and the full S (40 = 2.5 blocks of 16).
    lengths = jnp.asarray([1, 17, s][:b], jnp.int32)
    return (q, k, v, lengths), kw


@pytest.mark.parametrize("layout,n,kv,dtype,alibi,int8", [
    ("BSKH", 4, 4, jnp.float32, False, False),    # MHA
    ("BKSH", 4, 1, jnp.float32, False, False),    # MQA, the model's cache layout
    ("BKSH", 8, 2, jnp.float32, True, False),     # GQA (G=4) + ALiBi
    ("BSKH", 4, 2, jnp.bfloat16, False, False),
    ("BKSH", 4, 2, jnp.float16, True, False),
    ("BSKH", 4, 2, jnp.float32, False, True),     # int8 caches
    ("BKSH", 8, 2, jnp.bfloat16, True, True),
])
def test_decode_attention_matches_reference(layout, n, kv, dtype, alibi, int8):
    args, kw = _attn_case(layout, n, kv, dtype, alibi, int8)
    out = decode_attention(*args, **kw, block_s=16, num_splits=2, interpret=INTERPRET)
    ref = decode_attention_reference(*args, **kw)
    assert out.dtype == dtype and out.shape == args[0].shape
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= ATTN_TOL[dtype], err


def test_decode_attention_one_split_and_tiny_cache():
    """A single split (no flash-decoding merge), and a cache shorter than one block
    (S=5, lengths 1 and 17: a length past S counts as S; nothing past S is read)."""
    args, kw = _attn_case("BKSH", 4, 2, jnp.float32, alibi=True)
    out = decode_attention(*args, **kw, block_s=16, num_splits=1, interpret=INTERPRET)
    assert float(jnp.abs(out - decode_attention_reference(*args, **kw)).max()) <= 2e-6
    args, kw = _attn_case("BSKH", 2, 1, jnp.float32, b=2, s=5)
    out = decode_attention(*args, **kw, interpret=INTERPRET)
    assert float(jnp.abs(out - decode_attention_reference(*args, **kw)).max()) <= 2e-6


def test_decode_attention_reads_one_layer_of_a_stacked_cache():
    """layer=: caches [L, B, K, S, H] (the model's KVCache) and their int8 scales
    [L, B, K, S], layer traced under jit. (The float cache is the model tests' path.)"""
    rng = np.random.default_rng(4)
    b, n, kv, s, h, n_layers = 2, 4, 2, 40, 8, 3
    q = _rand(rng, (b, n, h))
    k, v = _rand(rng, (n_layers, b, kv, s, h)), _rand(rng, (n_layers, b, kv, s, h))
    kw = {"layout": "BKSH"}
    (k, kw["k_scale"]), (v, kw["v_scale"]) = _quantize_cache(k), _quantize_cache(v)
    lengths = jnp.asarray([5, 40], jnp.int32)
    run = jax.jit(lambda layer: decode_attention(q, k, v, lengths, layer=layer, **kw,
                                                 block_s=16, interpret=INTERPRET))
    for layer in (0, 2):
        ref = decode_attention_reference(q, k, v, lengths, layer=layer, **kw)
        assert float(jnp.abs(run(jnp.int32(layer)) - ref).max()) <= ATTN_TOL[jnp.float32]


def test_decode_attention_masks_slots_past_length():
    """Garbage (huge values) past a row's length must not change its output."""
    args, kw = _attn_case("BKSH", 4, 2, jnp.float32)
    q, k, v, lengths = args
    slot = jnp.arange(k.shape[2])[None, None, :, None]
    beyond = slot >= lengths[:, None, None, None]
    out = decode_attention(q, k, v, lengths, **kw, block_s=16, interpret=INTERPRET)
    k2, v2 = jnp.where(beyond, 1e4, k), jnp.where(beyond, -1e4, v)
    out2 = decode_attention(q, k2, v2, lengths, **kw, block_s=16, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))


def test_decode_attention_rejects_bad_input():
    args, kw = _attn_case("BSKH", 4, 2, jnp.float32)
    with pytest.raises(ValueError, match="layout"):
        decode_attention(*args, layout="SBKH", interpret=INTERPRET)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(args[0][:, :3], *args[1:], **kw, interpret=INTERPRET)
    with pytest.raises(ValueError, match="int8 caches need"):
        k8, _ = _quantize_cache(args[1])
        decode_attention(args[0], k8, k8, args[3], **kw, interpret=INTERPRET)


@pytest.mark.parametrize("layout,dtype,stacked", [
    ("BKSH", jnp.float32, True),      # the model's call: [L, B, K, S, H], layer traced
    ("BSKH", jnp.bfloat16, False),
])
def test_prefill_attention_matches_reference(layout, dtype, stacked):
    """Causal by position (rows start at 0 and 7), lengths, GQA (G=2), ALiBi; T=20 and
    S=40 are not multiples of the 16-wide blocks."""
    rng = np.random.default_rng(5)
    b, t, n, kv, s, h, n_layers = 2, 20, 4, 2, 40, 8, 2
    q = _rand(rng, (b, t, n, h), dtype)
    shape = (b, s, kv, h) if layout == "BSKH" else (b, kv, s, h)
    shape = (n_layers,) + shape if stacked else shape
    k, v = _rand(rng, shape, dtype), _rand(rng, shape, dtype)
    positions = jnp.arange(t)[None, :] + jnp.asarray([[0], [7]])
    kw = {"alibi_slopes": jnp.asarray([0.5, 0.25, 0.125, 0.0625]), "layout": layout,
          "layer": jnp.int32(1) if stacked else None}
    lengths = jnp.asarray([12, 40], jnp.int32)
    out = prefill_attention(q, k, v, positions, lengths, **kw, block_q=16, block_k=16,
                            interpret=INTERPRET)
    ref = prefill_attention_reference(q, k, v, positions, lengths, **kw)
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= ATTN_TOL[dtype], err


@pytest.mark.parametrize("m,k,n,group_size,dtype", [
    (1, 96, 80, None, jnp.float32),      # decode tile, N not a multiple of 64
    (3, 100, 70, None, jnp.bfloat16),    # K not a multiple of the K block
    (5, 96, 64, 32, jnp.float16),        # per-group
    (40, 72, 50, None, jnp.float32),     # large-M tiles, every dim ragged
    (33, 64, 48, 16, jnp.bfloat16),      # large-M per-group
])
def test_int8_matmul_matches_reference(m, k, n, group_size, dtype):
    rng = np.random.default_rng(1)
    x = _rand(rng, (m, k), dtype)
    w_q, scale = quantize_int8(rng.standard_normal((k, n)), group_size)
    out = int8_matmul(x, w_q, scale, group_size=group_size, interpret=INTERPRET)
    ref = int8_matmul_reference(x, w_q, scale, group_size=group_size)
    assert out.dtype == dtype and out.shape == (m, n)
    # Relative to the output's scale (|y| ~ sqrt(K) * |w|).
    err = float(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max())
    assert err <= MATMUL_RTOL[dtype] * float(jnp.abs(ref.astype(jnp.float32)).max()), err


def test_int8_matmul_dequantizes():
    """Against an independent float computation: x @ (w_q * scale), both scale kinds."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64))
    w_q = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    per_channel = rng.uniform(0.01, 0.1, 32)
    per_group = rng.uniform(0.01, 0.1, (4, 32))
    for scale, gs, w in [(per_channel, None, w_q * per_channel),
                         (per_group, 16, w_q * np.repeat(per_group, 16, axis=0))]:
        out = int8_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w_q),
                          jnp.asarray(scale, jnp.float32), group_size=gs, interpret=INTERPRET)
        np.testing.assert_allclose(np.asarray(out), x @ w, rtol=1e-4, atol=1e-4)


def test_int8_matmul_rejects_bad_input():
    x = jnp.zeros((2, 64), jnp.float32)
    w = jnp.zeros((64, 32), jnp.int8)
    with pytest.raises(ValueError, match="group_size"):
        int8_matmul(x, w, jnp.ones((3, 32)), group_size=24, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"per-channel scale must be \[N\]"):
        int8_matmul(x, w, jnp.ones((2, 32)), interpret=INTERPRET)
    with pytest.raises(ValueError, match="must be int8"):
        int8_matmul(x, w.astype(jnp.float32), jnp.ones(32), interpret=INTERPRET)


# -- CUDA lowering -------------------------------------------------------------



def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# (head_dim, query heads, kv heads, dtype, int8 cache, layout): GPT-2/OPT (64), GPT-NeoX
# 2.8B-style 80 (not a power of two: padded inside the block), Llama (128); MHA, GQA
# groups 4 and 8, MQA.
LOWER_ATTN = [
    (64, 12, 12, jnp.float16, False, "BKSH"),
    (80, 32, 32, jnp.bfloat16, False, "BKSH"),
    (128, 32, 8, jnp.bfloat16, False, "BKSH"),
    (128, 64, 8, jnp.float16, False, "BSKH"),
    (64, 16, 1, jnp.bfloat16, True, "BKSH"),
    (80, 8, 2, jnp.float32, False, "BSKH"),
]
# The model's call: the whole [L, B, K, S, H] cache of 24 layers, a traced layer index.
LOWER_ATTN_LAYER = [(128, 32, 8, jnp.bfloat16, False), (64, 16, 16, jnp.float16, True)]


@pytest.mark.parametrize("h,n,kv,dtype,int8,layout", LOWER_ATTN)
def test_decode_attention_lowers_for_cuda(h, n, kv, dtype, int8, layout):
    b, s = 2, 1000
    cache = (b, s, kv, h) if layout == "BSKH" else (b, kv, s, h)
    sc = cache[:3]
    args = [_sds((b, n, h), dtype), _sds(cache, jnp.int8 if int8 else dtype),
            _sds(cache, jnp.int8 if int8 else dtype), _sds((b,), jnp.int32),
            _sds((n,), jnp.float32)]
    if int8:
        args += [_sds(sc, jnp.float32), _sds(sc, jnp.float32)]

    def f(q, k, v, lengths, slopes, ks=None, vs=None):
        return decode_attention(q, k, v, lengths, alibi_slopes=slopes, k_scale=ks,
                                v_scale=vs, layout=layout)

    text = lower_for_cuda(f, *args)
    assert TRITON_CALL in text


@pytest.mark.parametrize("h,n,kv,dtype,int8", LOWER_ATTN_LAYER)
def test_decode_attention_on_stacked_cache_lowers_for_cuda(h, n, kv, dtype, int8):
    b, s, n_layers = 4, 2048, 24
    cache = _sds((n_layers, b, kv, s, h), jnp.int8 if int8 else dtype)
    scale = _sds((n_layers, b, kv, s), jnp.float32) if int8 else None

    def f(q, k, v, lengths, layer, ks=None, vs=None):
        return decode_attention(q, k, v, lengths, k_scale=ks, v_scale=vs, layer=layer,
                                layout="BKSH")

    args = [_sds((b, n, h), dtype), cache, cache, _sds((b,), jnp.int32), _sds((), jnp.int32)]
    text = lower_for_cuda(f, *args, *([scale, scale] if int8 else []))
    assert TRITON_CALL in text


@pytest.mark.parametrize("h,n,kv,dtype", [(64, 12, 12, jnp.float16), (80, 32, 32, jnp.bfloat16),
                                          (128, 32, 8, jnp.bfloat16)])
def test_prefill_attention_lowers_for_cuda(h, n, kv, dtype):
    b, t, s, n_layers = 2, 300, 1000, 12
    cache = _sds((n_layers, b, kv, s, h), dtype)

    def f(q, k, v, positions, layer, slopes):
        return prefill_attention(q, k, v, positions, alibi_slopes=slopes, layer=layer)

    text = lower_for_cuda(f, _sds((b, t, n, h), dtype), cache, cache, _sds((b, t), jnp.int32),
                           _sds((), jnp.int32), _sds((n,), jnp.float32))
    assert TRITON_CALL in text


@pytest.mark.parametrize("m,k,n,group_size,dtype", [
    (1, 768, 2304, None, jnp.float16),       # GPT-2 QKV at batch 1
    (16, 4096, 11008, 128, jnp.bfloat16),    # Llama-7B MLP, decode batch 16
    (128, 5120, 1000, 64, jnp.bfloat16),     # prefill-sized M, ragged N
    (5, 100, 70, None, jnp.float32),         # every dim ragged
])
def test_int8_matmul_lowers_for_cuda(m, k, n, group_size, dtype):
    sshape = (n,) if group_size is None else (k // group_size, n)
    text = lower_for_cuda(lambda x, w, s: int8_matmul(x, w, s, group_size=group_size),
                           _sds((m, k), dtype), _sds((k, n), jnp.int8),
                           _sds(sshape, jnp.float32))
    assert TRITON_CALL in text


# -- the model through the kernels --------------------------------------------

def _tiny(n_layers=1, **overrides):
    """A tiny config and random params (shapes by eval_shape: nothing compiled)."""
    from tiny import tiny_config

    from ftjax.specs import shapes as param_shapes

    cfg = tiny_config(n_layers=n_layers, **overrides)
    rng = np.random.default_rng(3)

    def draw(path, x):
        noise = rng.standard_normal(x.shape) * 0.3
        # Norm gains near 1, the rest wide enough that greedy text varies.
        return (noise * 0.2 + 1.0 if path[-1].key == "scale" else noise).astype(np.float32)

    return cfg, jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def test_model_through_pallas_matches_xla():
    """generate() with attention in the Pallas kernels (interpreted: prefill_attention for
    the prompt, decode_attention per step) equals XLA's: MHA, learned positions, the
    CPU model's per-layer loop. (GQA + ALiBi: the scanned-layers test below.)

    Tokens must be identical; log-probs agree to 1e-4 (float32; they differ only in
    the softmax's summation order).
    """
    import ftjax
    from ftjax.api import Model

    cfg, params = _tiny()
    xla, pallas = Model(cfg, params, kernels="xla"), Model(cfg, params, kernels="pallas")
    assert pallas.engine.model.kernels == "pallas" and xla.engine.kernels == "xla"
    # "xla" on one CPU device: the native CPU kernels where they build (paged_kv.kernels_for)
    assert xla.engine.model.kernels == xla.engine.cache_kernels in ("xla", "cpu")
    # Ragged prompts (1 to 11 tokens): each row's kernel length differs every step.
    prompts = [[5, 1, 7], [9, 2, 4, 4, 8, 1, 3, 6, 2, 11, 30], [42]]
    sp = ftjax.SamplingParams(stop_token_ids=[])
    a = xla.generate(prompts, max_new_tokens=6, sampling=sp)
    b = pallas.generate(prompts, max_new_tokens=6, sampling=sp)
    assert a.tokens == b.tokens
    assert len({tuple(t) for t in a.tokens}) > 1
    np.testing.assert_allclose(np.concatenate(b.log_probs), np.concatenate(a.log_probs),
                               atol=1e-4)
    # Same buckets again: nothing retraced (jax 0.12 would retrace once if tracing the
    # first pallas_call changed the jit cache key; pallas_kernels guards against it).
    counts = dict(pallas.engine.trace_counts)
    assert pallas.generate(prompts, max_new_tokens=6, sampling=sp).tokens == b.tokens
    assert dict(pallas.engine.trace_counts) == counts


def test_scanned_layers_through_pallas_match_xla():
    """The accelerator path: one scan over stacked layers, so the kernels get a traced
    layer index into the [L, B, K, S, H] cache (2 layers: a wrong layer shows); GQA
    (G=2) and ALiBi. Same tolerances as above."""
    import ftjax
    from ftjax.api import Model
    from ftjax.engine import Engine
    from ftjax import batching

    cfg, params = _tiny(n_layers=2, n_kv_heads=2, positions="alibi", norm="rmsnorm")
    ids = np.asarray([[5, 1, 7, 9, 2, 4]], np.int32)
    sp = ftjax.SamplingParams(stop_token_ids=[])
    ref = Model(cfg, params, kernels="xla").generate([ids[0].tolist()], max_new_tokens=6,
                                                     sampling=sp)
    scan = Engine(cfg, jax.numpy.float32, kernels="pallas")
    batch = batching.build([batching.Request(ids[0].tolist(), sp, 6)], [1], cfg, 6)
    state, _ = scan.prefill(params, **batch.prefill_args, sp=batch.sp, max_len=batch.max_len,
                            width=batch.width, feat=batch.feat)
    state = scan.decode(params, state, batch.sp, feat=batch.feat, chunk=6)
    assert np.asarray(state.tokens)[0, :6].tolist() == ref.tokens[0]
    np.testing.assert_allclose(np.asarray(state.log_probs)[0, :6], ref.log_probs[0], atol=1e-4)


def test_kernels_value_is_checked():
    import ftjax
    from ftjax.api import Model

    cfg, params = _tiny()
    with pytest.raises(ValueError, match=r"kernels must be one of \('auto', 'xla', 'pallas', "
                                         r"'mosaic'\)"):
        Model(cfg, params, kernels="triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        ftjax.load("/nonexistent-checkpoint", kernels="cuda")   # checked before reading
    # auto: XLA on this CPU-only machine (its model then takes the native CPU kernels).
    assert Model(cfg, params).engine.kernels == "xla"


@pytest.mark.parametrize("quant, kv", [  # ~10 CPU-s each in the Pallas interpreter
    ("int8", None), pytest.param("int8-g128", None, marks=pytest.mark.slow),
    pytest.param(None, "int8", marks=pytest.mark.slow)])
def test_quantized_model_through_pallas_matches_xla(quant, kv):
    """Int8 weights through int8_matmul, and the int8 KV cache through decode_attention
    (interpreted), give XLA's tokens (dequantize-then-dot, scaled cache reads); log-probs
    to 1e-4 (float32, summation order only). d_ff 256 so int8-g128 has two groups.

    Each is tested alone: with both, the ~5e-6 differences of the int8 matmul's k/v can
    flip one int8 rounding of the cache (a step of 1/254 of the row's range), which
    moves a log-prob by ~6e-3 (seen on jax 0.12): rounding, not a kernel error."""
    import ftjax
    from ftjax import quant as q
    from ftjax.api import Model

    cfg, params = _tiny(n_layers=2, n_kv_heads=2, d_model=128, d_ff=256, head_dim=32)
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
    if quant:
        params = q.quantize_params(cfg, params, 128 if quant == "int8-g128" else 0)
    sp = ftjax.SamplingParams(stop_token_ids=[])
    prompts = [[5, 1, 7], [9, 2, 4, 4, 8]]
    a = Model(cfg, params, kernels="xla", kv_cache_dtype=kv).generate(prompts, 5, sp)
    b = Model(cfg, params, kernels="pallas", kv_cache_dtype=kv).generate(prompts, 5, sp)
    assert a.tokens == b.tokens
    np.testing.assert_allclose(np.concatenate(b.log_probs), np.concatenate(a.log_probs),
                               atol=1e-4)
