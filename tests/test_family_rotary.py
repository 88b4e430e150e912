"""ftjax vs HuggingFace on the rotary family: GPT-J, GPT-NeoX / Pythia, Llama (GQA).

Tiny random checkpoints (d_model 48-64, 2 layers, vocab 211), built from HF
config classes and saved locally; initializer_range 0.3 so logits spread widely
and greedy continuations vary.

fp32: 1e-4 max abs on logits (as the GPT-2 parity test: same math in float32,
only matmul blocking differs; observed <= 2.5e-5; a layout, permutation or
formula error gives O(0.1..10) errors at these weight scales). Greedy: a ragged
batch of 3 prompts (lengths 5, 11, 8) generates 24 tokens each; row 0 equals HF
`generate` on its prompt alone and every row equals HF's greedy continuation of
its prompt alone (checked by teacher forcing: one HF forward pass instead of a
24-step `generate` per row), so the batch equals single runs. (ftjax's own
batch-vs-single equality is an engine property, tested in test_generate.py; a
batch-of-1 compile per variant would cost ~4 s of the 2-core budget.)

bf16 / fp16: HF and ftjax both cast the same fp32 checkpoint to the dtype and
both compute in it, but round differently (ftjax keeps norm statistics, rotary
angles, attention scores and softmax in float32; HF rounds cos/sin and some
intermediates to the dtype, and orders its sums differently). Each rounding is
a relative error ~eps (bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4); through 2
layers they compound to a few eps of the logit scale, the same size as HF's own
dtype-vs-fp32 error. These checks use a second checkpoint of each variant with
initializer_range 0.15 (see test_low_precision_close_to_hf for why). Both
tolerances are required:
  - max |ftjax - HF| <= 16 eps * max |fp32 logit| (bf16: 6.3%, fp16: 0.8% of
    the logit scale; observed 1.9-6.1 eps; a wrong layout is off by ~100%);
  - max |ftjax - HF| <= 2 * max |HF(dtype) - HF(fp32)|: ftjax differs from HF by
    at most twice HF's own rounding error against fp32 (observed ratio <= 1.03).
Greedy agreement: teacher-forced next-token argmax of ftjax and HF in the same
dtype agree on >= 95% of 8 x 32 positions (observed 97.7-100%).
Run with -s to print the measured errors.
"""

import json
import shutil

import numpy as np
import pytest

import ftjax
from converters import load_checkpoint
from converters.tensors import read_safetensors, write_safetensors
from hf_models import check_low_precision, hf_greedy, hf_logits, make_hf

pytestmark = pytest.mark.torch
ATOL = 1e-4
NO_STOP = ftjax.SamplingParams(stop_token_ids=[])
RAGGED = [[3, 14, 15, 92, 65], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 8, 7, 40, 100, 2, 77, 31]]
COMMON = dict(vocab_size=211, initializer_range=0.3, bos_token_id=None, eos_token_id=None)


def _gptj(**kw):
    import transformers

    args = dict(n_embd=48, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, **COMMON)
    args.update(kw)
    return transformers.GPTJConfig(**args)


def _neox(**kw):
    import transformers

    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, max_position_embeddings=128, **COMMON)
    args.update(kw)
    return transformers.GPTNeoXConfig(**args)


def _llama(**kw):
    import transformers

    args = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=128, **COMMON)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def _to_4x_neox(cfg):
    """Rewrites a 5.x GPT-NeoX config.json into the 4.x form (rotary_pct, rotary_emb_base)."""
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"],
               rope_scaling=None)


def _to_4x_llama(cfg):
    """Rewrites a 5.x Llama config.json into the 4.x form (rope_theta, rope_scaling)."""
    cfg.update(rope_theta=cfg.pop("rope_parameters")["rope_theta"], rope_scaling=None)


# name -> (HF config factory, config.json rewrite after saving or None)
VARIANTS = {
    # rotate-every-two on 8 of 12 head dims; parallel residual with one shared norm.
    "gptj": (lambda: _gptj(), None),
    # Pythia: parallel residual (two norms), rotary on 1/2 of 16 dims, base 500.
    "neox_parallel": (lambda: _neox(rope_parameters=dict(
        rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5)), None),
    # sequential residual, rotary_pct 0.25, no attention biases, a 4.x-style config.json.
    "neox_sequential_nobias_4x": (lambda: _neox(use_parallel_residual=False,
                                                attention_bias=False, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25)), _to_4x_neox),
    # MQA (1 kv head), untied head, rope_theta 500.
    "llama_mqa": (lambda: _llama(num_key_value_heads=1, rope_parameters=dict(
        rope_type="default", rope_theta=500.0)), None),
    # GQA (2 kv heads of 4), tied head, head_dim 16 != 48 / 4, 4.x-style config.json.
    "llama_gqa_tied_head_dim": (lambda: _llama(num_key_value_heads=2, head_dim=16,
                                               tie_word_embeddings=True), _to_4x_llama),
    # MHA (kv heads = heads), attention and MLP biases.
    "llama_mha_bias": (lambda: _llama(num_key_value_heads=4, attention_bias=True,
                                      mlp_bias=True, rms_norm_eps=1e-5), None),
}


# Compile budget (2 shared CPU cores): every variant checks one low-precision dtype,
# every architecture both.
LOW_PRECISION = {"gptj": ("bfloat16", "float16"), "neox_parallel": ("bfloat16",),
                 "neox_sequential_nobias_4x": ("float16",), "llama_mqa": ("bfloat16",),
                 "llama_gqa_tied_head_dim": ("float16",), "llama_mha_bias": ("bfloat16",)}
LOW_PRECISION_INIT = 0.15


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """HF on tiny matrices: torch's thread pool only spins on the 2 shared cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Case:
    def __init__(self, name, directory, hf):
        self.name, self.dir, self.hf = name, directory, hf
        self.model = ftjax.load(str(directory))


def _build(name, directory, initializer_range=None):
    """Saves variant `name` to `directory`; returns the HF model as loaded from there (fp32)."""
    import transformers

    factory, rewrite = VARIANTS[name]
    config = factory()
    if initializer_range is not None:
        config.initializer_range = initializer_range
    hf = make_hf(config, directory)
    if rewrite is not None:
        path = directory / "config.json"
        cfg = json.loads(path.read_text())
        rewrite(cfg)
        path.write_text(json.dumps(cfg))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).float().eval()
    return hf


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return Case(request.param, d, _build(request.param, d))


def test_logits_match_hf(case):
    ids = np.random.default_rng(1).integers(0, 211, (3, 17))
    ours = np.asarray(case.model.forward(ids))
    ref = hf_logits(case.hf, ids)
    err = np.abs(ours - ref).max()
    print(f"\n{case.name} fp32 max abs logit error {err:.2e} (logit scale "
          f"{np.abs(ref).max():.1f})")
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert err <= ATOL


def test_config_is_the_intended_variant(case):
    c = case.model.config
    assert c.positions == "rotary"
    if case.name.startswith("gptj"):
        assert c.parallel_residual and c.shared_norm and c.lm_head_bias and not c.attn_bias
    elif case.name.startswith("neox"):
        assert c.parallel_residual == ("parallel" in case.name) and not c.shared_norm
        assert c.rotary_dim == c.head_dim * (2 if "parallel" in case.name else 1) // 4
        assert c.attn_bias == ("nobias" not in case.name)
    else:
        assert c.glu and c.norm == "rmsnorm" and c.activation == "silu"
        assert c.n_kv_heads == {"llama_mqa": 1, "llama_gqa_tied_head_dim": 2}.get(case.name, 4)
    assert c.tied_embeddings == ("tied" in case.name)


def _hf_argmax_continues(hf, prompt, generated):
    """HF's teacher-forced argmax at every generated position equals the generated token.

    By induction this is the same as HF greedy-decoding `prompt` alone (one forward
    pass instead of a 24-step `generate`).
    """
    seq = list(prompt) + list(generated)
    pred = hf_logits(hf, [seq[:-1]])[0].argmax(-1)
    return pred[len(prompt) - 1:].tolist() == list(generated)


def test_greedy_and_ragged_batch_match_hf(case):
    """3 prompts of different lengths in one batch: row 0 equals HF `generate` on its
    prompt alone; every row is HF's greedy continuation of its prompt alone."""
    out = case.model.generate(RAGGED, max_new_tokens=24, sampling=NO_STOP)
    assert out.tokens[0] == hf_greedy(case.hf, RAGGED[0], 24)
    for prompt, tokens in zip(RAGGED, out.tokens):
        assert len(tokens) == 24 and _hf_argmax_continues(case.hf, prompt, tokens)
    assert out.finish_reasons == ["length"] * 3
    # varied continuations, not one repeated token
    assert all(len(set(t)) > 1 for t in out.tokens) and len(set(sum(out.tokens, []))) > 8


def test_low_precision_close_to_hf(case, tmp_path):
    # A narrower init than the greedy tests' 0.3: at 0.3 these tiny models are so
    # sensitive that HF's own bf16 run picks a different argmax than its fp32 run at
    # ~5% of positions (rounding noise, not a layout error), so >= 95% agreement
    # between two correct bf16 implementations would be a coin flip. At 0.15 HF's
    # bf16-vs-fp32 agreement is ~97.5% and logits still spread over a scale of ~5.
    hf32 = _build(case.name, tmp_path, initializer_range=LOW_PRECISION_INIT)
    ids = np.random.default_rng(2).integers(0, 211, (8, 33))
    for dtype in LOW_PRECISION[case.name]:
        check_low_precision(tmp_path, hf32, dtype, ids, label=case.name)


# -- unsupported config keys and checkpoint contents ---------------------------

ROPE_LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 10000.0}
UNSUPPORTED = {
    "gptj": [
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'rope_scaling'"),
        (dict(activation_function="quick_gelu"), "'activation_function'"),
        (dict(rotary_dim=7), "'rotary_dim'"),
    ],
    "neox_parallel": [
        (dict(rope_parameters=ROPE_LINEAR), "'rope_parameters' has rope_type 'linear'"),
        (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
         "'rope_scaling' has rope_type 'dynamic'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}),
         r"'rope_parameters' carries \['factor'\]"),
        (dict(hidden_act="gelu_fast"), "'hidden_act'"),
        (dict(use_parallel_residual="yes"), "'use_parallel_residual'"),
        (dict(rope_parameters=None, rotary_pct=0.1), "'rotary_pct'"),
    ],
    "llama_mqa": [
        (dict(rope_parameters=ROPE_LLAMA3), "'rope_parameters' has rope_type 'llama3'"),
        (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 4.0}),
         "'rope_scaling' has rope_type 'yarn'"),
        (dict(pretraining_tp=2), "'pretraining_tp'"),
        (dict(hidden_act="quick_gelu"), "'hidden_act'"),
        (dict(partial_rotary_factor=0.5), "'partial_rotary_factor'"),
        (dict(num_key_value_heads=3), "'num_key_value_heads'"),
    ],
}


@pytest.mark.parametrize("variant, changes, match", [
    pytest.param(v, changes, match, id=f"{v}-{'-'.join(changes)}")
    for v, cases in UNSUPPORTED.items() for changes, match in cases])
def test_unsupported_config_key_raises(tmp_path, variant, changes, match):
    """A math-changing config value ftjax does not implement is refused, naming the key."""
    VARIANTS[variant][0]().save_pretrained(str(tmp_path))  # config.json only
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    with pytest.raises(ftjax.CheckpointError, match=match):
        load_checkpoint(str(tmp_path))


def _tensors_dir(case, tmp_path, edit):
    d = tmp_path / "edited"
    shutil.copytree(case.dir, d)
    path = str(d / "model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    edit(tensors)
    write_safetensors(path, tensors)
    return d


def _rename(old, new):
    return lambda t: t.update({new: t.pop(old)})


# case -> (edit that must load to the same params, edit that must be refused, match)
TENSOR_EDITS = {
    "gptj": (lambda t: t.update({"transformer.h.0.attn.masked_bias": np.float32(-1e4)}),
             lambda t: t.update({"transformer.h.0.attn.q_proj.bias": np.zeros(48, np.float32)}),
             r"does not understand .*q_proj\.bias"),
    "neox_parallel": (_rename("embed_out.weight", "lm_head.weight"),
                      _rename("gpt_neox.layers.1.attention.dense.bias", "gpt_neox.dense.bias"),
                      "missing tensor 'gpt_neox.layers.1.attention.dense.bias'"),
    "llama_mqa": (lambda t: t.update({"model.layers.1.self_attn.rotary_emb.inv_freq":
                                      np.ones(6, np.float32)}),
                  lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                      np.ones(12, np.float32)}),
                  r"does not understand .*q_norm"),
}


def test_checkpoint_tensors_consumed_or_ignorable(case, tmp_path):
    if case.name not in TENSOR_EDITS:
        pytest.skip("one checkpoint per architecture")
    ok, bad, match = TENSOR_EDITS[case.name]
    _, ref = load_checkpoint(str(case.dir))
    _, got = load_checkpoint(str(_tensors_dir(case, tmp_path / "ok", ok)))
    import jax

    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, ref, got))
    with pytest.raises(ftjax.CheckpointError, match=match):
        load_checkpoint(str(_tensors_dir(case, tmp_path / "bad", bad)))


def test_gptj_permutation_turns_every_two_into_half():
    """The load-time permutation makes rotate-half equal GPT-J's rotate-every-two."""
    import torch
    from transformers.models.gptj import modeling_gptj

    from converters.hf_gptj import every_two_to_half
    from ftjax.model import rotate

    rd, h = 8, 12
    x = np.random.default_rng(0).standard_normal((1, 5, 2, h)).astype(np.float32)
    pos = np.arange(5)[None]
    sincos = modeling_gptj.create_sinusoidal_positions(16, rd)[pos]
    sin, cos = torch.split(sincos, rd // 2, dim=-1)
    xt = torch.tensor(x)
    ref = torch.cat([modeling_gptj.apply_rotary_pos_emb(xt[..., :rd], sin, cos), xt[..., rd:]], -1)
    perm = every_two_to_half(rd, h)
    ours = np.asarray(rotate(x[..., perm], pos, rd, 10000.0))
    assert np.abs(ours - ref.numpy()[..., perm]).max() < 1e-5


def test_gptj_tied_head_whole_head_rotary(tmp_path):
    """GPT-J with rotary_dim = head_dim, exact gelu and a tied head (its bias stays)."""
    hf = make_hf(_gptj(rotary_dim=12, activation_function="gelu", tie_word_embeddings=True),
                 tmp_path)
    model = ftjax.load(str(tmp_path))
    c = model.config
    assert c.tied_embeddings and c.lm_head_bias and c.rotary_dim == c.head_dim == 12
    ids = np.random.default_rng(3).integers(0, 211, (2, 13))
    assert np.abs(np.asarray(model.forward(ids)) - hf_logits(hf, ids)).max() <= ATOL


def test_eos_list_keeps_every_id():
    """Llama 3 style eos lists: every id is kept (generation stops at any of them)."""
    from converters import hf_llama

    hf = json.loads(VARIANTS["llama_mqa"][0]().to_json_string())
    hf["eos_token_id"] = [7, 9]
    assert hf_llama.config_from_hf(hf, "mem").eos_token_ids == (7, 9)
    hf["eos_token_id"] = "x"
    with pytest.raises(ftjax.CheckpointError, match="'eos_token_id'"):
        hf_llama.config_from_hf(hf, "mem")
