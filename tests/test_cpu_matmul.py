"""The native CPU few-row matmul (pallas_kernels/cpu_matmul.cc) and its dispatch.

Numerics against numpy in float64 (an independent path). Tolerance: float32 products
summed in another order, so |y - ref| <= 2e-6 * sum_k |x_k w_k| (float32's epsilon is
6e-8; a sum of K terms reordered errs by ~sqrt(K) eps of the absolute sum, and a wrong
or missed element errs by ~1e-1 of it). bf16 / int8 weights are compared with their
exact float values (the kernel widens them exactly) times the scale.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tiny import tiny_config

from ftjax import quant
from ftjax.engine import Engine
from ftjax.specs import init_params
from pallas_kernels import cpu_matmul

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu_matmul.available(),
                                reason="a CPU kernel, built on this machine")


def _weights(rng, shape, dtype):
    """(the kernel's weight, its exact values in float64)."""
    if dtype == "int8":
        w = rng.integers(-127, 128, shape).astype(np.int8)
    else:
        w = rng.standard_normal(shape).astype(np.float32)
        if dtype == "bfloat16":
            w = w.astype(ml_dtypes.bfloat16)
    return jnp.asarray(w), w.astype(np.float64)


def _check(y, x, w64, scale, nk):
    wm = w64.T if nk else w64
    ref = x.astype(np.float64) @ wm
    bound = np.abs(x.astype(np.float64)) @ np.abs(wm)
    if scale is not None:
        ref, bound = ref * scale, bound * np.abs(scale)
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == ref.shape
    err = np.abs(y - ref)
    assert np.all(err <= 2e-6 * bound + 1e-30), float((err / (bound + 1e-30)).max())


@pytest.mark.parametrize("m,k,n", [(1, 768, 2304), (8, 768, 3072), (3, 64, 50), (11, 37, 33),
                                   (16, 96, 128), (5, 8, 7)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("nk", [False, True])
def test_matmul_matches_numpy(m, k, n, dtype, nk):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w, w64 = _weights(rng, (n, k) if nk else (k, n), dtype)
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32) if dtype == "int8" else None
    y = jax.jit(lambda x, w, s: cpu_matmul.matmul(x, w, s, nk=nk))(x, w, scale)
    _check(y, x, w64, scale, nk)


@pytest.mark.parametrize("m,k,n", [(1, 768, 2304), (2, 768, 96), (8, 768, 3072), (9, 64, 50),
                                   (16, 96, 128), (3, 37, 33), (8, 40, 7)])
@pytest.mark.parametrize("nk", [False, True])
def test_bf16_rows_against_bf16_weights_match_numpy(m, k, n, nk):
    """A bf16 model's decode rows stay bf16 into the kernel: at 2+ rows it multiplies
    bf16 pairs (`vdpbf16ps`: products exact in float32, float32 sums taken two at a time)
    where the CPU has them, else (one row, odd K against a `[K, N]` weight, no AVX-512
    BF16) widens x exactly first. Either way the float64 product of the bf16 values, to
    the float32 sum tolerance stated above; the per-output scale too."""
    rng = np.random.default_rng(m * 1000 + k + n + 7)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w, w64 = _weights(rng, (n, k) if nk else (k, n), "bfloat16")
    scale = rng.uniform(0.5, 2.0, n).astype(np.float32) if m == 9 else None
    y = jax.jit(lambda x, w, s: cpu_matmul.matmul(x, w, s, nk=nk))(x, w, scale)
    _check(y, np.asarray(x, np.float64), w64, scale, nk)
    (call,) = [ln for ln in jax.jit(lambda x, w: cpu_matmul.matmul(x, w, nk=nk)).lower(x, w)
               .as_text(dialect="hlo").splitlines() if cpu_matmul.TARGET in ln]
    assert f"operand_layout_constraints={{bf16[{m},{k}]" in call  # x not cast to float32


@pytest.mark.parametrize("dtype,nk", [("bfloat16", False), ("bfloat16", True),
                                      ("float32", False), ("float32", True)])
def test_nan_and_inf_reach_exactly_the_outputs_they_touch(dtype, nk):
    """A NaN / inf in x or in the weight (a corrupt checkpoint, an overflowed activation)
    is not hidden by any path (bf16 pairs, row-range partial sums, the LM head's lanes):
    every output it contributes to is NaN / inf as in numpy, every other one is finite."""
    rng = np.random.default_rng(3)
    m, k, n = 4, 64, 40
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k) if nk else (k, n)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    if nk:
        w[3, 9] = np.nan
    else:
        w[9, 3] = np.nan
    xd = jnp.asarray(x, dtype)
    wd = jnp.asarray(w, dtype)
    y = np.asarray(jax.jit(lambda x, w: cpu_matmul.matmul(x, w, nk=nk))(xd, wd))
    want = np.asarray(xd, np.float64) @ (np.asarray(wd, np.float64).T if nk
                                         else np.asarray(wd, np.float64))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    assert np.isnan(y).any() and np.isinf(want).any() and np.isfinite(y).sum() > m * n // 3


def test_unsupported_arguments_name_the_problem():
    x = jnp.ones((2, 8), jnp.float32)
    assert "int32" in cpu_matmul.supported(x, jnp.ones((8, 4), jnp.int32))
    assert "contract" in cpu_matmul.supported(x, jnp.ones((7, 4), jnp.float32))
    assert "one value per output" in cpu_matmul.supported(x, jnp.ones((8, 4)), jnp.ones((3,)))
    assert cpu_matmul.supported(x, jnp.ones((4, 8)), nk=True) is None
    with pytest.raises(ValueError, match="contract"):
        cpu_matmul.matmul(x, jnp.ones((7, 4), jnp.float32))


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text()


def test_einsum_takes_the_kernel_for_few_rows_only():
    """quant.einsum with kernels "cpu": up to MAX_ROWS rows of x against one layer's
    float, bf16 or per-channel int8 weight -> the kernel (equal to XLA's einsum within
    the stated tolerance); more rows, grouped int8 and W8A8 stay on XLA."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 4, 16)).astype(np.float32))   # d, n, h
    spec = "btd,dnh->btnh"
    few = jnp.asarray(rng.standard_normal((4, 1, 64)).astype(np.float32))
    one = few[:1]
    many = jnp.asarray(rng.standard_normal((4, 8, 64)).astype(np.float32))  # 32 rows
    assert cpu_matmul.TARGET in _hlo(lambda x: quant.einsum(spec, x, w, pallas="cpu"), few)
    assert cpu_matmul.TARGET not in _hlo(lambda x: quant.einsum(spec, x, w, pallas="cpu"), many)
    # float32 at one row: XLA's matrix-vector code is as fast (cpu_matmul.preferred)
    assert cpu_matmul.TARGET not in _hlo(lambda x: quant.einsum(spec, x, w, pallas="cpu"), one)
    bf = w.astype(jnp.bfloat16)
    assert cpu_matmul.TARGET in _hlo(lambda x: quant.einsum(spec, x, bf, pallas="cpu"), one)
    for wt in (w, w.astype(jnp.bfloat16), quant.quantize(w, 1)):
        got = quant.einsum(spec, few, wt, pallas="cpu")
        want = quant.einsum(spec, few, wt)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grouped = quant.quantize(w, 1, group_size=32)
    assert cpu_matmul.TARGET not in _hlo(lambda x: quant.einsum(spec, x, grouped, pallas="cpu"),
                                         few)


def test_logits_take_the_kernel_for_bf16_and_int8_tables():
    """The LM head over an embedding table `[V, E]`: bf16 and per-row int8 tables go
    through the kernel (nk); a float32 table at 4..8 rows too (its rows in vector lanes),
    at fewer rows it stays on XLA (as fast there)."""
    rng = np.random.default_rng(1)
    table = jnp.asarray(rng.standard_normal((101, 40)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, 1, 40)).astype(np.float32))
    assert cpu_matmul.TARGET not in _hlo(lambda x: quant.logits(x, table, "cpu"), x)
    x8 = jnp.asarray(rng.standard_normal((4, 2, 40)).astype(np.float32))
    assert cpu_matmul.TARGET in _hlo(lambda x: quant.logits(x, table, "cpu"), x8)
    np.testing.assert_allclose(quant.logits(x8, table, "cpu"), quant.logits(x8, table),
                               rtol=1e-5, atol=1e-5)
    for head in (table.astype(jnp.bfloat16), quant.quantize_rows(table)):
        got = quant.logits(x, head, "cpu")
        assert cpu_matmul.TARGET in _hlo(lambda x: quant.logits(x, head, "cpu"), x)
        np.testing.assert_allclose(got, quant.logits(x, head), rtol=1e-5, atol=1e-5)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    assert cpu_matmul.preferred(8, jnp.float32) and cpu_matmul.preferred(1, jnp.int8)
    assert not cpu_matmul.preferred(cpu_matmul.MAX_ROWS + 1, jnp.int8)
    monkeypatch.setenv("FTJAX_CPU_MATMUL", "0")
    assert not cpu_matmul.preferred(8, jnp.float32)


def test_engine_decode_runs_the_kernel_and_prefill_does_not():
    """On one CPU device the engine's model takes kernels "cpu": the decode step's
    matmuls go through the kernel, a prefill of many tokens stays on XLA's GEMM."""
    cfg = tiny_config()
    eng = Engine(cfg, jnp.float32)
    assert eng.cache_kernels == "cpu" and eng.model.kernels == "cpu"
    params = init_params(cfg)
    cache = eng.new_cache(2, 64)
    step = jax.jit(lambda p, t, pos, c: eng.model(p, t, pos, c)[0])
    tok1 = jnp.zeros((2, 1), jnp.int32)
    tok32 = jnp.zeros((2, 32), jnp.int32)
    pos = lambda t: jnp.broadcast_to(jnp.arange(t), (2, t))
    assert cpu_matmul.TARGET in step.lower(params, tok1, pos(1), cache).as_text()
    assert cpu_matmul.TARGET not in step.lower(params, tok32, pos(32), cache).as_text()


def test_bf16_prefill_dots_keep_bf16_operands_and_accumulate_in_float32():
    """More than MAX_ROWS rows against a bf16 weight (a prefill) stay on XLA's dot, asked
    for a float32 result from bf16 operands (`quant._accumulate`): XLA:CPU of jax < 0.11
    then runs its native bf16 GEMM instead of converting both operands to float32 first
    (2-3x the GFLOP/s on gpt2's prefill shapes). The weight reaches the dot as bf16 (no
    convert of it in the HLO), and the result is the float64 product of the bf16 values
    rounded once to bf16 (float32 sums: within a bf16 ulp plus the float32 sum error)."""
    rng = np.random.default_rng(2)
    spec = "btd,dnh->btnh"
    w = jnp.asarray(rng.standard_normal((64, 4, 16)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((4, 8, 64)), jnp.bfloat16)       # 32 rows
    run = jax.jit(lambda x, w: quant.einsum(spec, x, w, pallas="cpu"))
    hlo = run.lower(x, w).compile().as_text()
    assert cpu_matmul.TARGET not in hlo
    dots = [ln for ln in hlo.splitlines() if " dot(" in ln or "__ynn" in ln or "ynn_fusion" in ln]
    assert dots, hlo
    # the only converts of bf16 data to f32 would be of x or w: none may feed the dot
    assert not any("f32[64,64]" in ln and "convert" in ln for ln in hlo.splitlines()), hlo
    got = run(x, w)
    assert got.dtype == jnp.bfloat16 and got.shape == (4, 8, 4, 16)
    want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(w, np.float64))
    bound = np.einsum(spec, np.abs(np.asarray(x, np.float64)), np.abs(np.asarray(w, np.float64)))
    err = np.abs(np.asarray(got, np.float64) - want)
    assert np.all(err <= 2 ** -8 * np.abs(want) + 1e-6 * bound), err.max()
    # float32 weights: no change (no preferred type asked, result float32)
    got32 = quant.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32))
    assert got32.dtype == jnp.float32
    assert quant._accumulate(x, w) == {"preferred_element_type": jnp.float32}
    assert quant._accumulate(x.astype(jnp.float32), w.astype(jnp.float32)) == {}
