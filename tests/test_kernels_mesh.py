"""The Pallas kernels on device meshes (`pallas_kernels.sharded`), proven two ways:

1. numerics: `kernels="pallas"` on TP x DP meshes of 8 virtual CPU devices generates
   what one device generates (interpreted kernels, so XLA could partition them anyway:
   this checks the wrappers' specs, the replicated-kv-head offsets and the psum);
2. the GPU program: a full prefill and decode step of the model (stacked layers, one
   scan) lowered for CUDA on an abstract 8-GPU mesh. Every kernel custom call must sit
   inside a manually-sharded region (`sdy.manual_computation`, i.e. shard_map) with
   local shapes (batch / DP, kv heads / TP), and the region must take the cache with
   the sharding it already has, so XLA has nothing to gather around the kernel.
"""

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ftjax
from ftjax import quant
from ftjax.api import Model
from ftjax.cache import KVCache
from ftjax.model import Transformer
from ftjax.numerics import quantize_vectors
from ftjax.sharding import RULES, Layout, make_mesh
from ftjax.specs import flatten, shapes, unflatten
from pallas_kernels import (
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
    sharded,
)
from tiny import tiny_config, tiny_params

NO_STOP = ftjax.SamplingParams(stop_token_ids=[])
TRITON_CALL = "__gpu$xla.gpu.triton"
# `python -m ftjax.gpu_check` sets FTJAX_GPU_CHECK=1: kernels run on the GPU for real.
INTERPRET = os.environ.get("FTJAX_GPU_CHECK") != "1"
# The mesh numerics use 8 devices: the virtual CPU devices of conftest (a one-GPU
# machine has one: there the lowering tests below stand for the mesh).
needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


# -- 1. numerics: the wrappers alone ----------------------------------------------

@needs_8
@pytest.mark.parametrize("kv", [4, 2, 1])   # kv heads split; replicated (K < TP): GQA, MQA
def test_sharded_attention_kernels_match_reference(kv):
    """decode and prefill attention through shard_map on a TP=4 x DP=2 mesh (ALiBi, a
    traced layer of a stacked cache, int8 cache for decode) = the jnp reference.
    Tolerance 2e-6: float32, summation order only (as test_kernels.ATTN_TOL)."""
    km = sharded.KernelMesh.of(make_mesh(tensor=4, data=2), RULES)
    rng = np.random.default_rng(kv)
    n_layers, b, n, s, h, t = 2, 4, 8, 24, 8, 5

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    q, k, v = rand(b, n, h), rand(n_layers, b, kv, s, h), rand(n_layers, b, kv, s, h)
    slopes = jnp.asarray(rng.uniform(0.1, 0.5, n), jnp.float32)
    lengths = jnp.asarray([1, 5, 17, 24], jnp.int32)
    kq, ks = quantize_vectors(k)
    vq, vs = quantize_vectors(v)
    kw = dict(alibi_slopes=slopes, layout="BKSH")

    @jax.jit
    def decode(q, k, v, ks, vs, layer):
        return sharded.decode_attention(q, k, v, lengths, mesh=km, kernel=decode_attention,
                                        k_scale=ks, v_scale=vs, layer=layer, **kw,
                                        block_s=16, interpret=INTERPRET)

    for args in [(k, v, None, None), (kq, vq, ks, vs)]:
        out = decode(q, *args, jnp.int32(1))
        ref = decode_attention_reference(q, *args[:2], lengths, k_scale=args[2],
                                         v_scale=args[3], layer=1, **kw)
        assert float(jnp.abs(out - ref).max()) <= 2e-6
    assert out.sharding.spec == P("data", "tensor")

    qp = rand(b, t, n, h)
    positions = jnp.arange(t)[None] + jnp.asarray([[0], [3], [7], [19]])
    out = jax.jit(lambda q, k, v, layer: sharded.prefill_attention(
        q, k, v, positions, mesh=km, kernel=prefill_attention, layer=layer, **kw,
        block_q=16, block_k=16, interpret=INTERPRET))(qp, k, v, jnp.int32(0))
    ref = prefill_attention_reference(qp, k, v, positions, layer=0, **kw)
    assert float(jnp.abs(out - ref).max()) <= 2e-6


def test_kernel_reads_one_kv_head_in_place():
    """kv_head=: all query heads attend that kv head of a cache holding K of them (what
    a tensor rank with replicated kv heads does) = the reference on that head alone."""
    rng = np.random.default_rng(7)
    b, n, kv, s, h = 2, 4, 3, 20, 8
    q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kv, s, h)), jnp.float32)
    lengths = jnp.asarray([3, 20], jnp.int32)
    out = decode_attention(q, k, v, lengths, kv_head=jnp.int32(2), layout="BKSH",
                           block_s=16, interpret=INTERPRET)
    ref = decode_attention_reference(q, k[:, 2:], v[:, 2:], lengths, layout="BKSH")
    assert float(jnp.abs(out - ref).max()) <= 2e-6
    qp = jnp.asarray(rng.standard_normal((b, 6, n, h)), jnp.float32)
    pos = jnp.arange(6)[None] + jnp.asarray([[0], [9]])
    out = prefill_attention(qp, k, v, pos, kv_head=jnp.int32(1), block_q=16, block_k=16,
                            interpret=INTERPRET)
    ref = prefill_attention_reference(qp, k[:, 1:2], v[:, 1:2], pos)
    assert float(jnp.abs(out - ref).max()) <= 2e-6


@needs_8
def test_sharded_einsum_column_and_row_parallel():
    """Column-parallel (output split, local) and row-parallel (contraction split, local
    + psum) products = the plain einsum; a float 'weight' stands in for the kernel."""
    km = sharded.KernelMesh.of(make_mesh(tensor=4, data=2), RULES)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 3, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 8, 2)), jnp.float32)
    col = jax.jit(lambda x, w: sharded.einsum("btd,dnh->btnh", x, w,
                                              lambda a, b: jnp.einsum("btd,dnh->btnh", a, b),
                                              km))(x, w)
    np.testing.assert_allclose(col, jnp.einsum("btd,dnh->btnh", x, w), rtol=1e-5, atol=1e-5)
    assert tuple(col.sharding.spec)[:3] == ("data", None, "tensor")
    xo = jnp.asarray(rng.standard_normal((4, 3, 8, 2)), jnp.float32)
    wo = jnp.asarray(rng.standard_normal((8, 2, 16)), jnp.float32)
    row = jax.jit(lambda x, w: sharded.einsum("btnh,nhd->btd", x, w,
                                              lambda a, b: jnp.einsum("btnh,nhd->btd", a, b),
                                              km))(xo, wo)
    np.testing.assert_allclose(row, jnp.einsum("btnh,nhd->btd", xo, wo), rtol=1e-5, atol=1e-5)


@needs_8
def test_kernel_mesh_rejects_unknown_axes():
    with pytest.raises(ValueError, match=r"rules name mesh axes \['model'\]"):
        sharded.KernelMesh.of(make_mesh(tensor=2), {"heads": "model"})


# -- 1. numerics: the model ---------------------------------------------------------

# (config overrides, quant, kv cache dtype, tensor, data): MHA with kv heads split;
# GQA K=2 < TP=4 (replicated kv heads, each rank reads its group's head) with ALiBi;
# int8 weights (column- and row-parallel int8 matmuls + psum); int8 KV cache with MQA.
MODEL_CASES = {
    "mha_tp4_dp2": (dict(n_heads=4, n_kv_heads=4), None, None, 4, 2),
    "gqa_k2_tp4_alibi": (dict(n_heads=8, n_kv_heads=2, head_dim=4, positions="alibi"),
                         None, None, 4, 2),
    "int8_weights_tp2_dp2": (dict(n_heads=4, n_kv_heads=2), "int8", None, 2, 2),
    "int8_kv_mqa_tp4_dp2": (dict(n_heads=4, n_kv_heads=1), None, "int8", 4, 2),
}


@needs_8
@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_pallas_on_meshes_equals_one_device(name):
    """generate() with kernels="pallas" on a mesh = one device with XLA's path (which
    test_kernels proves equal to one device with the kernels): identical greedy tokens,
    log-probs within 1e-4 (float32; summation order and, TP, the all-reduce's order)."""
    overrides, mode, kv_dtype, tp, dp = MODEL_CASES[name]
    cfg = tiny_config(n_layers=1, vocab_size=97, **overrides)
    params = jax.tree_util.tree_map(np.asarray, tiny_params(cfg))
    if mode:
        params = quant.quantize_params(cfg, params)
    prompts = [[5, 1, 7], [9, 2, 4, 4, 8, 1, 3], [42], [3, 3]]
    ref = Model(cfg, params, kernels="xla", kv_cache_dtype=kv_dtype).generate(prompts, 4,
                                                                              NO_STOP)
    model = Model(cfg, params, kernels="pallas", kv_cache_dtype=kv_dtype,
                  mesh=make_mesh(tensor=tp, data=dp))
    assert model.engine.model.mesh is not None
    got = model.generate(prompts, 4, NO_STOP)
    assert got.tokens == ref.tokens
    assert len({tuple(t) for t in ref.tokens}) > 1
    np.testing.assert_allclose(np.concatenate(got.log_probs), np.concatenate(ref.log_probs),
                               atol=1e-4)


# -- 2. the GPU program: CUDA lowering on an abstract 8-GPU mesh ----------------------

def _functions(text: str) -> dict:
    """{name: body lines} of every func.func in a StableHLO module's text."""
    funcs, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:public |private )?@([\w.$-]+)\(", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name is not None:
            funcs[name].append(line)
    return funcs


def _manual_regions(text: str):
    """Kernel custom calls inside and outside shard_map regions.

    Returns:
      (calls in a manual region: [(target, operand types)], calls outside, the
      manual regions' in_shardings texts).
    """
    funcs = _functions(text)
    manual_funcs, regions = set(), []
    inside_lines = []
    for body in funcs.values():
        depth = 0
        for line in body:
            if depth == 0 and "sdy.manual_computation(" in line:
                regions.append(line)
                depth = 1
                continue
            if depth:
                depth += line.count("{") - line.count("}")
                if line.strip().startswith("} : ("):
                    depth = 0
                    continue
                inside_lines.append(line)
    # Functions called from a manual region, transitively, run manually sharded too.
    frontier = set(re.findall(r"call @([\w.$-]+)", "\n".join(inside_lines)))
    while frontier:
        f = frontier.pop()
        if f in manual_funcs or f not in funcs:
            continue
        manual_funcs.add(f)
        frontier |= set(re.findall(r"call @([\w.$-]+)", "\n".join(funcs[f])))
    inside, outside = [], []
    calls = re.compile(r"custom_call @(__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)\(.*"
                       r":\s*\(([^()]*)\)\s*->")
    for f, body in funcs.items():
        for line in body:
            m = calls.search(line)
            if m:
                where = inside if f in manual_funcs or line in inside_lines else outside
                where.append((m.group(1), m.group(2)))
    return inside, outside, regions


H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")


def _lower_step(cfg, tp, dp, batch, max_len, t, mode=None, kv_dtype=None,
                kernels="pallas"):
    """StableHLO of one model call (T=t tokens over a cache), scanned stacked layers,
    every operand sharded as `ftjax.sharding.Layout` places it, on an abstract
    dp x 1 x tp mesh of H100s (no devices needed)."""
    mesh = jax.sharding.AbstractMesh((dp, 1, tp), ("data", "pipe", "tensor"),
                                     axis_types=(AxisType.Auto,) * 3, abstract_device=H100)
    layout = Layout(mesh, cfg)
    km = sharded.KernelMesh.of(mesh, RULES)
    model = Transformer(cfg, jnp.bfloat16, kernels=kernels, vocab=layout.padded_vocab, mesh=km)
    abstract = shapes(cfg, jnp.bfloat16, layout.padded_vocab)
    if mode:
        abstract = jax.eval_shape(lambda p: quant.quantize_params(cfg, p), abstract)

    def place(path, x):   # as Layout.place_params: an int8 scale shards with its weight
        def one(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=layout.sharding(
                layout.spec_of(path).axes, a.shape))
        return jax.tree_util.tree_map(one, x)

    params = unflatten({p: place(p, x) for p, x in
                        flatten(abstract, is_leaf=quant.is_quantized).items()})
    cache = jax.eval_shape(lambda: KVCache.zeros(cfg, batch, max_len, jnp.bfloat16, kv_dtype,
                                                 kernels, km))
    spec = layout.cache_sharding(batch, max_len).spec
    cache = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, P(*spec[:x.ndim]))), cache)
    rows = NamedSharding(mesh, P("data"))
    tokens = jax.ShapeDtypeStruct((batch, t), jnp.int32, sharding=rows)

    def step(params, tokens, positions, cache):
        return model(params, tokens, positions, cache)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Triton backend, jax >= 0.11
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(step).trace(params, tokens, tokens, cache).lower(
                lowering_platforms=("cuda",))
    return lowered.as_text()


def _shape(*dims):
    return "tensor<" + "x".join(str(d) for d in dims)


# A Llama-7B-like layout at small size: GQA, 2 layers; batch 8 on DP=2, kv heads on TP=4
# (split: K=8) or replicated (K=2 < TP=4), and MHA with int8 weights and int8 KV.
LOWER_CASES = {
    "gqa_k8": dict(cfg=dict(n_heads=16, n_kv_heads=8), mode=None, kv=None),
    "gqa_k2_replicated": dict(cfg=dict(n_heads=16, n_kv_heads=2), mode=None, kv=None),
    "int8_weights_int8_kv": dict(cfg=dict(n_heads=16, n_kv_heads=16), mode="int8", kv="int8"),
    # Mosaic GPU decode attention and int8 matmuls (Triton prefill), K < TP.
    "mosaic_gqa_k2_int8_weights": dict(cfg=dict(n_heads=16, n_kv_heads=2), mode="int8",
                                       kv=None, kernels="mosaic"),
}


@pytest.mark.parametrize("name", sorted(LOWER_CASES))
def test_prefill_and_decode_lower_for_cuda_inside_shard_map(name):
    case = LOWER_CASES[name]
    tp, dp, batch, max_len, t, h = 4, 2, 8, 256, 32, 64
    cfg = tiny_config(n_layers=2, vocab_size=1000, d_model=512, head_dim=h, d_ff=1024,
                      max_positions=max_len, norm="rmsnorm", positions="rotary", glu=True,
                      activation="silu", attn_bias=False, mlp_bias=False, **case["cfg"])
    n, kv = cfg.n_heads, cfg.n_kv_heads
    local_kv = kv // tp if kv % tp == 0 else kv      # split, or replicated in full
    # The kernels read the whole [L, B, K, S, H] cache in place: local L x B/DP x K_local.
    local_cache = _shape(cfg.n_layers, batch // dp, local_kv, max_len, h)
    global_cache = _shape(cfg.n_layers, batch, kv, max_len, h)
    for step_t in (t, 1):   # prefill, then one decode step
        kernels = case.get("kernels", "pallas")
        text = _lower_step(cfg, tp, dp, batch, max_len, step_t, case["mode"], case["kv"],
                           kernels)
        inside, outside, regions = _manual_regions(text)
        if kernels == "mosaic":   # decode and the int8 matmuls on Mosaic GPU
            targets = {target for target, _ in inside}
            assert any(t.startswith("mosaic_gpu") for t in targets), targets
            if step_t == 1:
                assert targets == {t for t in targets if t.startswith("mosaic_gpu")}
        assert not outside, f"kernel calls outside shard_map: {outside[:2]}"
        attn = [types for _, types in inside if local_cache in types]
        # Prefill with an int8 cache attends in XLA (no int8 prefill kernel).
        want_attn = 0 if (step_t > 1 and case["kv"]) else cfg.n_layers
        # nn.scan traces its body once: one call site serves every layer.
        assert len(attn) == min(want_attn, 1), (step_t, inside)
        assert not any(global_cache in types for _, types in inside)
        # Local query heads in the attention call: N/TP of them. Decode groups them by
        # the kv heads the rank reads ([B/DP, K/TP or 1, G, H]); prefill [B/DP, T, N/TP, H].
        if attn:
            groups = kv // tp if kv % tp == 0 else 1
            # (Mosaic pads each group to the 64-row wgmma tile.)
            rows = 64 if kernels == "mosaic" else n // tp // groups
            q_local = (_shape(batch // dp, groups, rows, h) if step_t == 1
                       else _shape(batch // dp, step_t, n // tp, h))
            assert q_local + "x" in attn[0]
        if case["mode"]:
            # q (column-parallel: N/TP output heads) and o (row-parallel: N/TP input rows)
            # as int8 [K, N] matrices of their local shard.
            types = " ".join(ty for _, ty in inside)
            d = cfg.d_model
            assert _shape(d, n // tp * h) + "xi8>" in types
            assert _shape(n // tp * h, d) + "xi8>" in types
            assert "all_reduce" in text     # row-parallel psum
        # The region takes the cache as it lies (batch on data; kv heads on tensor when
        # they split): no resharding, so nothing to gather around the kernel.
        cache_in = ('{"data", ?}, {"tensor", ?}, {?}, {?}]' if kv % tp == 0
                    else '{"data", ?}, {?}, {?}, {?}]')
        if want_attn:
            assert any(cache_in in r for r in regions), regions
        assert "all_gather" not in text and "all-gather" not in text
