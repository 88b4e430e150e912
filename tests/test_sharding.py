"""Tensor / data parallelism on 8 virtual CPU devices (conftest sets XLA_FLAGS).

Every mesh shape is compared with the unsharded model, and the unsharded model
with HuggingFace. Tolerance 1e-5 on fp32 logits (the issue's bound): a sharded
model runs the same float32 arithmetic, except that row-parallel matmuls (o, wo)
add per-rank partial sums in a different order. Observed differences are
~2-4e-6 on logits of scale ~5-10; a wrong split (a head or vocabulary shard in the
wrong place) is off by O(1).

By default each architecture runs a subset of the TP x DP matrix chosen so that
every TP in {1, 2, 4, 8} and every DP in {1, 2} is covered; FTJAX_FULL_MATRIX=1
runs all of TP {1,2,4,8} x DP {1,2} with TP*DP <= 8 for every architecture.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config, tiny_params

import ftjax
from ftjax import distributed
from ftjax.api import Model
from ftjax.config import preset
from ftjax.specs import n_params, shapes as param_shapes
from ftjax.plan import plan_memory
from ftjax.sharding import Layout, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_STOP = ftjax.SamplingParams(stop_token_ids=[])
ATOL = 1e-5
FULL = bool(os.environ.get("FTJAX_FULL_MATRIX"))
ALL_MESHES = [(tp, dp) for dp in (1, 2) for tp in (1, 2, 4, 8) if tp * dp <= 8]

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
pytestmark = needs_8


def _params(cfg, seed=0):
    return tiny_params(cfg, seed)


def _check_same(ref, model, ids, prompts, n_new=8):
    """Logits within ATOL of `ref` and identical greedy tokens."""
    err = np.abs(np.asarray(model.forward(ids)) - np.asarray(ref.forward(ids))).max()
    assert err <= ATOL, f"max abs logit difference {err:.2e}"
    want = ref.generate(prompts, n_new, NO_STOP).tokens
    assert model.generate(prompts, n_new, NO_STOP).tokens == want
    return err


# -- mesh and rules ---------------------------------------------------------------


def test_make_mesh_axes_and_errors():
    mesh = make_mesh(tensor=4, data=2)
    assert mesh.axis_names == ("data", "pipe", "tensor")
    assert dict(mesh.shape) == {"data": 2, "pipe": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # tensor fastest-varying: a tensor group is 4 neighbouring devices
    assert [d.id for d in mesh.devices[0, 0]] == [d.id for d in jax.devices()[:4]]
    with pytest.raises(ValueError, match="16 devices, but only"):
        make_mesh(tensor=16)
    with pytest.raises(ValueError, match="tensor must be an int >= 1"):
        make_mesh(tensor=0)


def test_indivisible_heads_name_allowed_sizes():
    cfg = tiny_config(n_heads=6, n_kv_heads=6, head_dim=4, d_ff=64, d_model=24)
    with pytest.raises(ValueError, match=r"does not divide n_heads \(6\).*allowed tensor "
                                         r"sizes: \[1, 2\]"):
        Layout(make_mesh(tensor=4), cfg)
    cfg = tiny_config(d_ff=36)  # heads 4 divide, ffn 36 does not divide 8
    with pytest.raises(ValueError, match=r"d_ff \(36\).*\[1, 2, 4\]"):
        Layout(make_mesh(tensor=8), cfg)


def test_megatron_specs_and_kv_replication():
    P = jax.sharding.PartitionSpec
    cfg = tiny_config(n_heads=8, n_kv_heads=2, head_dim=4, glu=True, vocab_size=97)
    shapes = param_shapes(cfg)
    for tp, kv in ((2, "tensor"), (4, None)):
        layout = Layout(make_mesh(tensor=tp), cfg)
        sh = layout.param_shardings()
        a = sh["layers"]["attn"]
        assert a["q"]["kernel"].spec == P("pipe", None, "tensor", None)        # column
        assert a["o"]["kernel"].spec == P("pipe", "tensor", None, None)        # row
        assert a["k"]["kernel"].spec == P("pipe", None, kv, None)   # replicated if K < tp
        m = sh["layers"]["mlp"]
        assert m["wi"]["kernel"].spec == m["wg"]["kernel"].spec == P("pipe", None, "tensor")
        assert m["wo"]["kernel"].spec == P("pipe", "tensor", None)
        assert sh["embed"].spec == P("tensor", None)                           # vocab-parallel
        assert layout.param_shapes()["embed"] == (layout.padded_vocab, 32)
        assert layout.padded_vocab % tp == 0 and 97 <= layout.padded_vocab < 97 + tp
        assert layout.cache_sharding(2, 16).spec == P("pipe", "data", kv, None, None)
    with pytest.raises(ValueError, match=r"pipe size 4 does not divide n_layers \(2\); "
                                         r"allowed pipe sizes: \[1, 2\]"):
        Model(cfg, None, mesh=make_mesh(tensor=2, pipe=4))  # refused before params are read
    # the CPU layer loop splits the placed stack per layer: each layer keeps its sharding
    split = Model(cfg, _params(cfg), mesh=make_mesh(tensor=2), layer_loop="unrolled")
    q0 = split.generator.params["layers"][0]["attn"]["q"]["kernel"]
    assert tuple(q0.sharding.spec)[:2] == (None, "tensor") and q0.shape == (32, 8, 4)


# -- loading shard by shard ---------------------------------------------------------


class _Recorder:
    """A host array that records every index it is read at."""

    def __init__(self, a, log, name):
        self.a, self.log, self.name = a, log, name
        self.shape, self.dtype = a.shape, a.dtype

    def __getitem__(self, idx):
        out = self.a[idx]
        self.log.append((self.name, out.shape))
        return out


def test_placement_reads_only_shards(tmp_path):
    cfg = tiny_config(n_heads=8, n_kv_heads=8, head_dim=4, vocab_size=97)
    params = _params(cfg)
    layout = Layout(make_mesh(tensor=4, data=2), cfg)
    log = []
    flat = {"embed": params["embed"], "layers": params["layers"]}
    wrapped = {"embed": _Recorder(flat["embed"], log, "embed"),
               "layers": {"attn": {"q": {"kernel": _Recorder(
                   flat["layers"]["attn"]["q"]["kernel"], log, "q")}},
                          "mlp": {"wo": {"kernel": _Recorder(
                              flat["layers"]["mlp"]["wo"]["kernel"], log, "wo")}}}}
    placed = layout.place_params(wrapped, np.float32)
    reads = {name: {s for n, s in log if n == name} for name in ("embed", "q", "wo")}
    # every read is one device's shard, never the whole tensor
    assert reads["q"] == {(2, 32, 2, 4)}                    # [L, D, N/4, H]
    assert reads["wo"] == {(2, 16, 32)}                     # [L, F/4, D]
    # vocabulary 97 padded to 100: shards of 25 rows, the last one reads 22 and pads 3
    assert reads["embed"] == {(25, 32), (22, 32)}
    assert placed["embed"].shape == (100, 32)
    np.testing.assert_array_equal(np.asarray(placed["embed"])[:97], params["embed"])
    assert not np.asarray(placed["embed"])[97:].any()
    q = placed["layers"]["attn"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 4)}

    # ftjax.load(..., mesh): a native (memory-mapped) checkpoint placed the same way
    from converters import save_native

    save_native(str(tmp_path), cfg, params, "float32")
    model = ftjax.load(str(tmp_path), mesh=make_mesh(tensor=4, data=2))
    q = model.params["layers"]["attn"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 4)}
    ref = Model(cfg, params)
    # one prompt on data=2: the batch is padded up to 2 rows
    _check_same(ref, model, np.arange(24).reshape(2, 12) % 97, [[5, 6, 7, 1, 2, 3, 4, 5]])
    # the canonical params come back unpadded and equal
    back = model.params
    np.testing.assert_array_equal(np.asarray(back["embed"]), params["embed"])


# -- torch-free parity on tiny models -----------------------------------------------

TINY = {
    "gqa2_glu_rotary": dict(n_heads=8, n_kv_heads=2, head_dim=4, glu=True, positions="rotary",
                            norm="rmsnorm", attn_bias=False, mlp_bias=False, activation="silu",
                            tied_embeddings=False),
    "mqa_alibi_headbias": dict(n_heads=8, n_kv_heads=1, head_dim=4, positions="alibi",
                               embed_norm=True, tied_embeddings=False, lm_head_bias=True),
}
# Default: one mesh per variant (the HF tests below cover more); all with FULL.
TINY_MESHES = {"gqa2_glu_rotary": [(4, 2)], "mqa_alibi_headbias": [(8, 1)]}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_meshes_equal_one_device(name):
    cfg = tiny_config(vocab_size=97, **TINY[name])
    params = _params(cfg)
    ref = Model(cfg, params)
    ids = np.random.default_rng(0).integers(0, 97, (3, 11))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    for tp, dp in (ALL_MESHES if FULL else TINY_MESHES[name]):
        model = Model(cfg, params, mesh=make_mesh(tensor=tp, data=dp))
        _check_same(ref, model, ids, prompts)
    if name == "gqa2_glu_rotary":  # streaming (the serving engine, on the mesh) gives the same tokens
        events = list(model.stream(prompts, 6, NO_STOP))
        streamed = [[e.token for e in events if e.index == i] for i in range(3)]
        assert streamed == ref.generate(prompts, 6, NO_STOP).tokens


def test_stacked_layout_on_a_mesh():
    """Accelerators run one nn.scan over the stacked params: the same rules with the
    layers axis (here on CPU through the engine directly)."""
    from ftjax.engine import Engine

    cfg = tiny_config(n_heads=8, n_kv_heads=2, head_dim=4, vocab_size=97)
    params = _params(cfg)
    layout = Layout(make_mesh(tensor=4, data=2), cfg)
    engine = Engine(cfg, np.float32, layout=layout)
    ids = np.random.default_rng(0).integers(0, 97, (2, 9)).astype(np.int32)
    got = engine.forward(layout.place_params(params, np.float32), layout.shard_batch(ids))
    want = Model(cfg, params).forward(ids)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= ATOL


# -- HuggingFace architectures ------------------------------------------------------


# Weight scale of the HF models: logits of scale ~5, where 1e-5 absolute is ~2e-6
# relative. (At 0.3, GPT-2's logits reach ~9 and TP=8 differs from one device by
# 1.5e-5: the same relative rounding, an absolute bound the issue did not size for.)
INIT = 0.2


def _hf_configs():
    import transformers

    v = 211  # not a multiple of 2, 4 or 8: every TP pads the vocabulary
    return {
        "gpt2": transformers.GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=8,
                                        n_positions=64, initializer_range=INIT,
                                        bos_token_id=0, eos_token_id=0),
        "bigcode_mqa": transformers.GPTBigCodeConfig(vocab_size=v, n_embd=64, n_layer=2,
                                                     n_head=8, n_positions=64,
                                                     multi_query=True, initializer_range=INIT,
                                                     bos_token_id=0, eos_token_id=0),
        "llama_gqa2": transformers.LlamaConfig(vocab_size=v, hidden_size=64,
                                               num_hidden_layers=2, num_attention_heads=8,
                                               num_key_value_heads=2, intermediate_size=128,
                                               max_position_embeddings=64,
                                               initializer_range=INIT, bos_token_id=0,
                                               eos_token_id=0),
        "bloom": transformers.BloomConfig(vocab_size=v, hidden_size=64, n_layer=2, n_head=8,
                                          initializer_range=INIT, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=1),
    }


# Default subset (compile time): one mesh each, together every TP and DP value;
# kv heads split (Llama GQA at TP 2) and replicated (MQA at TP 4; the tiny GQA test at
# TP 4). FTJAX_FULL_MATRIX=1: all of ALL_MESHES for each.
HF_MESHES = {
    "gpt2": [(8, 1)],
    "bigcode_mqa": [(4, 2)],
    "llama_gqa2": [(2, 2)],
    "bloom": [(1, 2)],
}


@pytest.mark.torch
# GPT-2 in the default run; the others (8-14 CPU-s each: HF model + several meshes) are slow.
@pytest.mark.parametrize("arch", [a if a == "gpt2" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(HF_MESHES)])
def test_hf_architectures_on_meshes(arch, tmp_path):
    from hf_models import hf_logits, make_hf

    from converters import load_checkpoint

    hf = make_hf(_hf_configs()[arch], tmp_path)
    ref = ftjax.load(str(tmp_path))
    ids = np.random.default_rng(1).integers(0, 211, (2, 13))
    # the unsharded model is HF's (1e-4: test_family_* tolerance for these fp32 models)
    assert np.abs(np.asarray(ref.forward(ids)) - hf_logits(hf, ids)).max() <= 1e-4
    cfg, params = load_checkpoint(str(tmp_path))  # one conversion, placed on every mesh
    prompts = [[3, 14, 15, 92, 65], [1, 2], [9, 8, 7, 40, 100, 2, 77, 31]]
    errs = {}
    for tp, dp in (ALL_MESHES if FULL else HF_MESHES[arch]):
        model = Model(cfg, params, mesh=make_mesh(tensor=tp, data=dp))
        errs[(tp, dp)] = _check_same(ref, model, ids, prompts)
    print(f"\n{arch}: max abs logit difference vs one device {errs}")


# -- memory plan ----------------------------------------------------------------------


def test_plan_weights_match_hand_count():
    cfg = preset("gpt2-124m")
    p = plan_memory(cfg, tensor=4, batch=8, max_len=1024, dtype=np.float16, compile=False)
    d, f, L, tp = 768, 3072, 12, 4
    vocab = 50260  # 50257 padded to a multiple of 4
    per_layer = (4 * d  # two layer norms, replicated
                 + 3 * (d * d // tp + d // tp)  # q, k, v column-split, their biases too
                 + d * d // tp + d  # o row-split, its bias replicated
                 + d * f // tp + f // tp  # wi
                 + f * d // tp + d)  # wo
    hand = 2 * (vocab * d // tp + 1024 * d + 2 * d + L * per_layer)
    assert abs(p.weights - hand) <= 0.02 * hand
    assert p.kv_cache == 2 * 2 * L * 8 * (12 // tp) * 1024 * 64
    assert p.weights_total == 2 * (n_params(cfg) + 3 * d)  # + 3 padded vocabulary rows


def test_plan_compiles_on_the_mesh():
    cfg = tiny_config(n_heads=8, n_kv_heads=8, head_dim=4)
    p = plan_memory(cfg, tensor=4, data=2, batch=3, max_len=32, dtype=np.float32)
    if p.decode is None:
        pytest.skip("this backend gives no memory analysis")
    # decode holds the weights and the cache as arguments
    assert p.decode["argument"] >= p.weights + p.kv_cache


def test_cli_plan(capsys):
    from ftjax.cli import main

    assert main(["plan", "--preset", "gpt2-124m", "--tp", "4", "--dp", "2", "--batch", "2",
                 "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "tp=4 pp=1 dp=2 (8 devices)" in out and "weights (sharded shapes)" in out
    assert main(["plan", "--preset", "gpt2-124m", "--tp", "8", "--no-compile"]) == 1
    assert "allowed tensor sizes: [1, 2, 3, 4, 6, 12]" in capsys.readouterr().err


# -- multi-host ---------------------------------------------------------------------


def test_distributed_detect():
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "gpu[003-007,9]"}
    assert distributed.detect(slurm) == {"source": "SLURM", "coordinator_address": "gpu003:12355",
                                         "num_processes": 4, "process_id": 1}
    assert distributed.first_slurm_host("a1,b2") == "a1"
    ompi = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
            "FTJAX_COORDINATOR_PORT": "999"}
    assert distributed.detect(ompi)["coordinator_address"] is None
    explicit = {"FTJAX_COORDINATOR": "h:1", "FTJAX_NUM_PROCESSES": "2", "FTJAX_PROCESS_ID": "1",
                "FTJAX_LOCAL_DEVICE_IDS": "0,1", **slurm}
    assert distributed.detect(explicit) == {
        "source": "FTJAX_* environment", "coordinator_address": "h:1", "num_processes": 2,
        "process_id": 1, "local_device_ids": [0, 1]}
    with pytest.raises(ValueError, match="FTJAX_PROCESS_ID='x' is not an int"):
        distributed.detect({"FTJAX_COORDINATOR": "h:1", "FTJAX_PROCESS_ID": "x"})


@pytest.mark.slow
def test_two_processes_tp8_equal_one_process(tmp_path):
    """2 processes x 4 virtual CPU devices, TP=8 across both, gloo collectives."""
    from converters import save_native

    cfg = tiny_config(n_heads=8, n_kv_heads=2, head_dim=4, vocab_size=97)
    params = _params(cfg, seed=3)
    save_native(str(tmp_path / "ckpt"), cfg, params, "float32")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    want = Model(cfg, params).generate(prompts, 8, NO_STOP).tokens
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHON=sys.executable, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = ["bash", os.path.join(ROOT, "examples", "launch_multihost.sh"), "2",
           os.path.join(ROOT, "examples", "multihost_generate.py"), "--cpu-devices", "4",
           "--tp", "8", "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "8"]
    cmd += [arg for p in prompts for arg in ("--prompt-ids", ",".join(map(str, p)))]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert result["processes"] == 2 and result["devices"] == 8
    assert result["tokens"] == want


def test_distributed_initialize_needs_a_description(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("FTJAX_", "SLURM_", "OMPI_")):
            monkeypatch.delenv(k)
    with pytest.raises(ValueError, match="incomplete multi-process description from nothing"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, num_processes=2\)"):
        distributed.initialize("127.0.0.1:1", num_processes=2, process_id=2)


@pytest.mark.slow  # ~23 CPU-s: every request option compiled on a TP x DP mesh
def test_request_options_on_a_mesh_equal_one_device():
    """Per-request options, n samples (shared prefill) and beams on a TP=2 x DP=2 mesh
    give the single-device results (same tokens; greedy and seeded)."""
    cfg = tiny_config(n_kv_heads=2, eos_token_id=3)
    params = _params(cfg, seed=4)
    ref = Model(cfg, params)
    model = Model(cfg, params, mesh=make_mesh(tensor=2, data=2))
    sp = ftjax.SamplingParams
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3]]
    sampling = [sp(temperature=0.9, seed=3, n=3, repetition_penalty=1.2),
                sp(no_repeat_ngram_size=2, bad_words=[[7]], logprobs=2),
                sp(presence_penalty=0.5, stop_sequences=[[9, 9]], ignore_eos=True)]
    a = ref.generate(prompts, 8, sampling)
    b = model.generate(prompts, 8, sampling)
    assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
    beams = sp(num_beams=3, n=2, stop_token_ids=[3])
    assert ref.generate(prompts[:2], 6, beams).tokens == model.generate(prompts[:2], 6, beams).tokens


def test_orbax_checkpoint_restores_onto_the_mesh(tmp_path):
    """`ftjax convert`'s orbax output loads with mesh=: params are restored with their
    mesh shardings (heads split on "tensor"), and the model equals one device."""
    from converters import save_orbax
    from ftjax.api import _restore_onto_mesh

    cfg = tiny_config(n_kv_heads=2)
    params = tiny_params(cfg, seed=6)
    save_orbax(str(tmp_path), cfg, params, "float32")
    mesh = make_mesh(tensor=2, data=2)
    _, restored = _restore_onto_mesh(str(tmp_path), mesh, np.float32)
    q = restored["layers"]["attn"]["q"]["kernel"]
    assert "tensor" in tuple(q.sharding.spec) and len(q.addressable_shards) == 4
    assert q.addressable_shards[0].data.shape[2] == cfg.n_heads // 2
    ids = [[5, 1, 7, 9, 2, 4]]
    a = ftjax.load(str(tmp_path))
    b = ftjax.load(str(tmp_path), mesh=mesh)
    err = np.abs(np.asarray(a.forward(ids)) - np.asarray(b.forward(ids))).max()
    assert err <= ATOL
