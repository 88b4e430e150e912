"""Pipeline parallelism (issue 15) on 8 virtual CPU devices (conftest sets XLA_FLAGS).

Every pipelined mesh is compared with one device: logits within 1e-5 (fp32; a stage
runs the same arithmetic as one device, only the tensor-parallel all-reduces inside a
stage sum partial products in another order: measured <= 5e-6 on logits of scale ~5-10;
a layer run on the wrong stage, or a cache row written twice, is off by O(1)) and
identical tokens (greedy and seeded sampling, ragged prompts).

Compile time on 8 virtual devices is the cost, so the default run covers one mesh
(pipe 2 x tensor 2 x data 2) with every path that compiles little; the full matrix
(pipe {2, 4, 8} x tensor {1, 2} x data {1, 2} that fits 8 devices), request options,
beams and the serving engine are `slow` (FTJAX_FULL_MATRIX=1 widens the HF matrix too).
"""

import os
import re

import jax
import numpy as np
import pytest
from tiny import tiny_config, tiny_params

import ftjax
from ftjax import pipeline
from ftjax.api import Model
from ftjax.sharding import Layout, make_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")

ATOL = 1e-5
FULL = bool(os.environ.get("FTJAX_FULL_MATRIX"))
SP = ftjax.SamplingParams
NO_STOP = SP(stop_token_ids=[])
# (pipe, tensor, data) meshes that fit 8 devices, pipe >= 2.
ALL = [(p, t, d) for p in (2, 4, 8) for t in (1, 2) for d in (1, 2) if p * t * d <= 8]
DEFAULT = (2, 2, 2)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15]]   # ragged


def _mesh(pipe, tensor, data):
    return make_mesh(pipe=pipe, tensor=tensor, data=data)


@pytest.fixture(scope="module")
def tiny():
    """8 layers (pipe 2, 4 and 8 divide), GQA with 2 kv heads, eos 3."""
    cfg = tiny_config(n_layers=8, n_kv_heads=2, eos_token_id=3)
    params = jax.tree_util.tree_map(np.asarray, tiny_params(cfg, seed=4))
    return cfg, params, Model(cfg, params)


@pytest.fixture(scope="module")
def piped(tiny):
    cfg, params, _ = tiny
    return Model(cfg, params, mesh=_mesh(*DEFAULT))


def test_pipe_size_must_divide_the_layers():
    with pytest.raises(ValueError, match=r"pipe size 4 does not divide n_layers \(6\); "
                                         r"allowed pipe sizes: \[1, 2, 3, 6\]"):
        Layout(make_mesh(pipe=4), tiny_config(n_layers=6))
    assert pipeline.bubble_fraction(4, 1) == 0.75
    assert pipeline.bubble_fraction(4, 4) == 3 / 7


@pytest.mark.slow   # the default mesh's prefill runs 2 micro-batches already
def test_micro_batches_equal_one_batch(tiny):
    """`run_stages` with M = 1, 2, 4 micro-batches (pipe 4: 7 iterations for M = 4, each
    stage busy in 4) writes the same cache and gives the same activations as the
    unpipelined stack (XLA's matmul shapes differ with M: 1e-5)."""
    import dataclasses

    import jax.numpy as jnp

    from ftjax.cache import KVCache
    from ftjax.model import Transformer

    cfg, params, _ = tiny
    layout = Layout(_mesh(4, 1, 1), cfg)
    placed = layout.place_params(params, np.float32)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (4, 6)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6), (4, 6))
    base = Transformer(cfg)
    want, want_cache = jax.jit(base)(jax.tree_util.tree_map(np.asarray, params), tokens,
                                     positions, KVCache.zeros(cfg, 4, 8, jnp.float32))
    for m in (1, 2, 4):
        model = dataclasses.replace(base, pipe=layout.mesh, micro=m)
        cache = jax.device_put(KVCache.zeros(cfg, 4, 8, jnp.float32),
                               layout.cache_sharding(4, 8))
        got, got_cache = jax.jit(model)(placed, tokens, positions, cache)
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= ATOL, m
        assert np.abs(np.asarray(got_cache.k) - np.asarray(want_cache.k)).max() <= ATOL, m


def _check(ref, model, seed=0, sampled=True):
    ids = np.random.default_rng(seed).integers(0, ref.config.vocab_size, (4, 11))
    err = np.abs(np.asarray(model.forward(ids)) - np.asarray(ref.forward(ids))).max()
    assert err <= ATOL, f"max abs logit difference {err:.2e}"
    assert model.generate(PROMPTS, 8, NO_STOP).tokens == ref.generate(PROMPTS, 8, NO_STOP).tokens
    if not sampled:
        return err
    sampled = [SP(temperature=0.9, seed=7, top_k=20, stop_token_ids=[]),
               SP(temperature=1.2, seed=1, top_p=0.9, stop_token_ids=[])] * 2
    assert (model.generate(PROMPTS, 8, sampled).tokens
            == ref.generate(PROMPTS, 8, sampled).tokens)
    return err


def _check_shards(model, pipe):
    """Each device holds 1/P of every stacked layer param, and of the KV cache."""
    cfg = model.config
    for path, x in jax.tree_util.tree_leaves_with_path(model.params["layers"]):
        assert x.sharding.spec[0] == "pipe", path
        assert {s.data.shape[0] for s in x.addressable_shards} == {cfg.n_layers // pipe}, path
    cache = model.engine.new_cache(4, 16)
    assert {s.data.shape[0] for s in cache.k.addressable_shards} == {cfg.n_layers // pipe}


def test_default_mesh_equals_one_device(tiny, piped):
    _, _, ref = tiny
    _check(ref, piped)
    _check_shards(piped, DEFAULT[0])


@pytest.mark.slow
def test_stream_and_session_equal_one_device(tiny, piped):
    _, _, ref = tiny
    events = list(piped.stream(PROMPTS, 6, NO_STOP))
    streamed = [[e.token for e in events if e.index == i] for i in range(len(PROMPTS))]
    assert streamed == ref.generate(PROMPTS, 6, NO_STOP).tokens

    def talk(model):   # a session (batch 1: rows not split over "data") over two turns
        s = model.session()
        s.append([1, 2, 3])
        first = s.generate(5, NO_STOP).tokens
        s.append([7, 8])
        return first, s.generate(5, SP(temperature=0.8, seed=2, stop_token_ids=[])).tokens

    assert talk(piped) == talk(ref)


def test_decode_step_moves_activations_not_weights(piped):
    """The compiled decode step of the pipelined model: the activations hop stage to
    stage (a collective-permute of `[B/data, 1, D]`), and no collective carries a layer
    weight (no all-gather of a stacked param: each stage keeps its own layers)."""
    model = piped
    layout, cfg = model.layout, model.config
    b = 4
    cache = model.engine.new_cache(b, 16)
    tok = layout.shard_batch(np.ones((b, 1), np.int32))
    pos = layout.shard_batch(np.full((b, 1), 3, np.int32))
    text = jax.jit(model.engine.step_logits).lower(model.generator.params, tok, pos,
                                                  cache).compile().as_text()
    collectives = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} (all-gather|all-reduce|"
                             r"collective-permute|all-to-all|reduce-scatter)\(", text)
    assert collectives, "expected the stage-to-stage collective-permute"
    weight_shapes, smallest = set(), None
    for path, x in jax.tree_util.tree_leaves_with_path(model.params["layers"]):
        for shape in (x.shape, x.addressable_shards[0].data.shape):
            weight_shapes |= {tuple(shape), tuple(shape[1:])}
        if path[-1].key == "kernel":
            n = int(np.prod(x.addressable_shards[0].data.shape[1:]))
            smallest = n if smallest is None else min(smallest, n)
    hop = (b // layout.data, 1, cfg.d_model)
    kinds = {}
    for dims, kind in collectives:
        shape = tuple(int(d) for d in dims.split(",") if d)
        assert shape not in weight_shapes or shape == hop[1:], (kind, shape)
        assert int(np.prod(shape)) < smallest, (kind, shape, smallest)
        kinds.setdefault(kind, set()).add(shape)
    assert hop in kinds.get("collective-permute", set()), kinds
    assert "all-gather" not in kinds or all(s[-1] >= cfg.vocab_size for s in kinds["all-gather"]), \
        kinds  # only the vocabulary-parallel logits are gathered


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [m for m in ALL if m != DEFAULT], ids=lambda m: "pp%d-tp%d-dp%d" % m)
def test_every_mesh_equals_one_device(tiny, mesh):
    cfg, params, ref = tiny
    model = Model(cfg, params, mesh=_mesh(*mesh))
    _check(ref, model, seed=mesh[0])
    _check_shards(model, mesh[0])


@pytest.mark.slow
def test_request_options_n_and_beams_equal_one_device(tiny, piped):
    _, _, ref = tiny
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3]]
    sampling = [SP(temperature=0.9, seed=3, n=3, repetition_penalty=1.2),
                SP(no_repeat_ngram_size=2, bad_words=[[7]], logprobs=2),
                SP(presence_penalty=0.5, stop_sequences=[[9, 9]], ignore_eos=True,
                   min_new_tokens=2)]
    a, b = ref.generate(prompts, 8, sampling), piped.generate(prompts, 8, sampling)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in b.log_probs[1:]]),
                               np.concatenate([np.ravel(x) for x in a.log_probs[1:]]),
                               atol=ATOL)
    beams = SP(num_beams=3, n=2, stop_token_ids=[3])
    assert piped.generate(prompts[:2], 6, beams).tokens == ref.generate(prompts[:2], 6,
                                                                       beams).tokens


@pytest.mark.slow
def test_int8_weights_and_kv_cache_pipelined(tiny):
    """Per-channel int8 weights (their scales stacked on "layers" too) and an int8 KV cache
    (scales `[L, B, K, S]` on "pipe") give what they give on one device."""
    from ftjax import quant

    cfg, params, _ = tiny
    qp = quant.quantize_params(cfg, params, 0)
    mesh = _mesh(2, 2, 1)
    for kw in (dict(params=qp), dict(params=params, kv_cache_dtype="int8")):
        ref = Model(cfg, **kw)
        model = Model(cfg, **kw, mesh=mesh)
        ids = np.random.default_rng(2).integers(0, 97, (2, 9))
        assert np.abs(np.asarray(model.forward(ids)) - np.asarray(ref.forward(ids))).max() <= ATOL
        assert model.generate(PROMPTS, 8, NO_STOP).tokens == ref.generate(PROMPTS, 8,
                                                                          NO_STOP).tokens


@pytest.mark.slow
def test_pallas_kernels_inside_the_stages(tiny):
    """kernels="pallas" (interpreted here): the per-shard kernel wrappers nest in the
    stage's shard_map (`pallas_kernels.sharded`), with int8 weights so the row-parallel
    int8 matmul's psum over "tensor" runs inside a stage too."""
    from ftjax import quant

    cfg, params, _ = tiny
    qp = quant.quantize_params(cfg, params, 0)
    ref = Model(cfg, qp, kernels="pallas")
    model = Model(cfg, qp, mesh=_mesh(2, 2, 2), kernels="pallas")
    prompts = PROMPTS[:2]
    assert model.generate(prompts, 4, NO_STOP).tokens == ref.generate(prompts, 4, NO_STOP).tokens


@pytest.mark.slow
def test_serving_engine_on_a_pipelined_mesh(tiny, piped):
    """LLMEngine over the paged pools: their layer axis on "pipe" (each stage its own
    layers' pages), results as `generate` on one device."""
    _, _, ref = tiny
    eng = ftjax.LLMEngine(piped, max_slots=4, page_size=8, chunk=4, prefill_budget=16,
                          prefill_rows=4, max_logprobs=0)
    work = [(list(range(1, 12)), SP(max_new_tokens=6, stop_token_ids=[])),
            ([5, 6], SP(temperature=0.9, seed=2, max_new_tokens=7)),
            ([9, 1, 4], SP(repetition_penalty=1.3, max_new_tokens=5)),
            (list(range(20, 40)), SP(temperature=0.7, seed=5, n=2, max_new_tokens=4))]
    rids = {eng.add_request(p, s): i for i, (p, s) in enumerate(work)}
    got = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                got[(rids[o.request_id], o.sample)] = o.tokens
    want = ref.generate([p for p, _ in work], sampling=[s for _, s in work]).tokens
    for (i, j), toks in got.items():
        assert toks == (want[i][j] if work[i][1].n > 1 else want[i]), (i, j)
    assert len(got) == 5
    pools = eng.state.cache.k
    assert pools.sharding.spec[0] == "pipe"
    assert {s.data.shape[0] for s in pools.addressable_shards} == {piped.config.n_layers // 2}


# -- HuggingFace architectures with >= 4 layers ----------------------------------------


def _hf_configs():
    import transformers

    v, init = 211, 0.2   # logits of scale ~5 (see test_sharding.py's INIT)
    common = dict(bos_token_id=0, eos_token_id=0, initializer_range=init)
    return {
        "gpt2": transformers.GPT2Config(vocab_size=v, n_embd=64, n_layer=4, n_head=8,
                                        n_positions=64, **common),
        "bigcode_mqa": transformers.GPTBigCodeConfig(vocab_size=v, n_embd=64, n_layer=4,
                                                     n_head=8, n_positions=64,
                                                     multi_query=True, **common),
        "llama_gqa2": transformers.LlamaConfig(vocab_size=v, hidden_size=64,
                                               num_hidden_layers=4, num_attention_heads=8,
                                               num_key_value_heads=2, intermediate_size=128,
                                               max_position_embeddings=64, **common),
        "bloom": transformers.BloomConfig(vocab_size=v, hidden_size=64, n_layer=4, n_head=8,
                                          pad_token_id=1, **common),
    }


HF_ALL = [m for m in ALL if m[0] <= 4]          # 4 layers: pipe 2 and 4
HF_MESHES = {"gpt2": [(2, 2, 2)], "bigcode_mqa": [(4, 2, 1)], "llama_gqa2": [(2, 2, 1)],
             "bloom": [(4, 1, 2)]}


@pytest.mark.torch
@pytest.mark.parametrize("arch", [a if a == "gpt2" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(HF_MESHES)])
def test_hf_architectures_pipelined(arch, tmp_path):
    from hf_models import hf_logits, make_hf

    from converters import load_checkpoint

    hf = make_hf(_hf_configs()[arch], tmp_path)
    ref = ftjax.load(str(tmp_path))
    ids = np.random.default_rng(1).integers(0, 211, (2, 13))
    assert np.abs(np.asarray(ref.forward(ids)) - hf_logits(hf, ids)).max() <= 1e-4
    cfg, params = load_checkpoint(str(tmp_path))
    errs = {}
    for mesh in (HF_ALL if FULL else HF_MESHES[arch]):
        model = Model(cfg, params, mesh=_mesh(*mesh))
        # sampling is covered by the tiny models; here (compile time) in the full run only
        errs[mesh] = _check(ref, model, sampled=FULL)
    print(f"\n{arch}: max abs logit difference vs one device {errs}")


@pytest.mark.torch
def test_megatron_pp_ranks_load_onto_their_stages(tmp_path):
    """A Megatron-LM checkpoint saved with TP=2 x PP=2 loads onto a pipe=2 x tensor=2
    mesh: stage p holds exactly rank p's layers, and the logits are HF's."""
    from hf_models import hf_logits, make_gpt2
    from megatron_ckpt import gpt2_weights, layer_split, write_gpt2_vocab, write_megatron

    hf = make_gpt2(tmp_path / "hf", n_layer=4, n_head=4, n_embd=32, n_positions=32)
    w = gpt2_weights(hf)
    c = hf.config
    args = {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
            "max_position_embeddings": 32, "ffn_hidden_size": 128, "padded_vocab_size": 256,
            "layernorm_epsilon": c.layer_norm_epsilon}
    root = write_megatron(tmp_path / "m", w, 4, tp=2, pp=2, args=args, padded=256)
    write_gpt2_vocab(root, 211)
    model = ftjax.load(str(root), mesh=make_mesh(pipe=2, tensor=2))
    ids = np.array([[5, 17, 99, 3, 150, 42, 7, 210], [1, 2, 3, 4, 5, 6, 7, 8]])
    assert np.abs(np.asarray(model.forward(ids)) - hf_logits(hf, ids)).max() <= 1e-4
    wi = model.params["layers"]["mlp"]["wi"]["kernel"]      # [L, D, F]
    hf_wi = np.stack([hf.transformer.h[i].mlp.c_fc.weight.detach().numpy() for i in range(4)])
    mesh = model.layout.mesh
    for stage, layers in enumerate(layer_split(4, 2)):
        devices = set(mesh.devices[:, stage].ravel())
        for s in wi.addressable_shards:
            if s.device in devices:
                assert list(range(4)[s.index[0]]) == layers
                np.testing.assert_array_equal(np.asarray(s.data), hf_wi[s.index])


# -- command line -----------------------------------------------------------------------


def test_cli_plan_pipe(capsys):
    """`ftjax plan --pp`: per-device weights are 1/(TP x PP) of the model, but for the
    embedding / LM head, which every stage keeps (the first embeds, the last projects)."""
    from ftjax.cli import main

    assert main(["plan", "--preset", "gpt3-175b", "--tp", "4", "--pp", "2", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "tp=4 pp=2 dp=1 (8 devices)" in out
    weights = int(re.search(r"weights \(sharded shapes\)\s+([\d,]+)", out)[1].replace(",", ""))
    total = 2 * 174.6e9    # fp16
    assert total / 8 <= weights <= total / 8 * 1.01
    assert main(["plan", "--preset", "gpt3-175b", "--pp", "5", "--no-compile"]) == 1
    assert "allowed pipe sizes: [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96]" in capsys.readouterr().err


def _cli(*args, devices=None):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # the CLI makes its own
    return subprocess.run([sys.executable, "-m", "ftjax", *args], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_plan_gpt3_175b_tp8_pp2():
    """The issue's figure: 16 (virtual) devices, the real pipelined prefill and decode
    compiled from abstract shapes for XLA's memory analysis."""
    r = _cli("plan", "--preset", "gpt3-175b", "--tp", "8", "--pp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tp=8 pp=2 dp=1 (16 devices)" in r.stdout
    weights = int(re.search(r"weights \(sharded shapes\)\s+([\d,]+)", r.stdout)[1].replace(",", ""))
    assert 2 * 174.6e9 / 16 <= weights <= 2 * 174.6e9 / 16 * 1.01
    assert "XLA decode: peak" in r.stdout or "this backend" in r.stdout


@pytest.mark.slow
def test_cli_generate_and_bench_with_pp():
    demo = ftjax.demo_model_path()       # 4 layers
    args = ("generate", "--model", demo, "def f(x):", "--max-new-tokens", "8", "--seed", "3")
    one, piped = _cli(*args), _cli(*args, "--pp", "2", "--tp", "2")
    assert one.returncode == 0 and piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout == one.stdout
    r = _cli("bench", "--model", demo, "--pp", "2", "--batch", "2", "--input-len", "8",
             "--output-len", "4", "--repeats", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pp=2" in r.stdout and [line.split()[:3] for line in r.stdout.splitlines()
                                   if line.split()[:1] == ["2"]] == [["2", "8", "4"]]


@pytest.mark.slow
def test_two_processes_pipe_across_them(tmp_path):
    """2 processes x 4 virtual CPU devices: tensor 4 inside a process, pipe 2 across the
    two (stage p = process p's devices, FasterTransformer's TP-in-node / PP-across-nodes),
    gloo collectives carry the activation hops. Same tokens as one process."""
    import json
    import subprocess
    import sys

    from converters import save_native

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tiny_config(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=4, vocab_size=97)
    params = tiny_params(cfg, seed=3)
    save_native(str(tmp_path / "ckpt"), cfg, params, "float32")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    want = Model(cfg, params).generate(prompts, 8, NO_STOP).tokens
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHON=sys.executable, PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = ["bash", os.path.join(root, "examples", "launch_multihost.sh"), "2",
           os.path.join(root, "examples", "multihost_generate.py"), "--cpu-devices", "4",
           "--tp", "4", "--pp", "2", "--model", str(tmp_path / "ckpt"),
           "--max-new-tokens", "8"]
    cmd += [arg for p in prompts for arg in ("--prompt-ids", ",".join(map(str, p)))]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert result["processes"] == 2 and result["devices"] == 8
    assert result["tokens"] == want
