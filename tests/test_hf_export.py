"""converters.hf_export: canonical params -> HF GPT-2 directory, the inverse of the importer."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftjax
from converters.hf_export import save_hf_gpt2
from ftjax.specs import flatten
from converters.tensors import read_safetensors
from ftjax.config import ModelConfig
from ftjax.specs import init_params

# d_ff != 4 * d_model and distinct V / P so a mixed-up axis shows as a shape error.
CFG = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                  d_ff=48, max_positions=24, bos_token_id=0, eos_token_id=0)


def random_params(cfg, seed=0, dtype=jnp.float32):
    """init_params, with every leaf (biases and norms too) perturbed so layouts are tested."""
    params = init_params(cfg, seed=seed)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [(x + 0.1 * jax.random.normal(k, x.shape)).astype(dtype)
              for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def test_export_then_load_is_exact(tmp_path):
    params = random_params(CFG)
    save_hf_gpt2(tmp_path, CFG, params)
    model = ftjax.load(tmp_path)
    assert model.config == CFG
    want, got = flatten(params), flatten(model.params)
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


def test_layout_and_metadata(tmp_path):
    save_hf_gpt2(tmp_path, CFG, random_params(CFG))
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    assert (hf["n_embd"], hf["n_inner"], hf["n_positions"]) == (32, 48, 24)
    assert hf["tie_word_embeddings"] is True
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)
    assert tensors["transformer.h.1.attn.c_attn.bias"].shape == (96,)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (48, 32)
    assert "lm_head.weight" not in tensors
    assert all(t.dtype == np.float32 for t in tensors.values())
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert b'"__metadata__":{"format":"pt"}' in raw


def test_bfloat16_params_stay_bfloat16(tmp_path):
    params = random_params(CFG, dtype=jnp.bfloat16)
    save_hf_gpt2(tmp_path, CFG, params)
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    assert {t.dtype.name for t in tensors.values()} == {"bfloat16"}
    got = flatten(ftjax.load(tmp_path, dtype="bfloat16").params)
    for name, want in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want), err_msg=name)


@pytest.mark.parametrize("field, value", [
    ("positions", "rotary"), ("norm", "rmsnorm"), ("n_kv_heads", 2), ("attn_bias", False),
    ("mlp_bias", False), ("tied_embeddings", False), ("position_offset", 2),
])
def test_refuses_what_gpt2_cannot_express(tmp_path, field, value):
    cfg = dataclasses.replace(CFG, **{field: value})
    with pytest.raises(ValueError, match=field):
        save_hf_gpt2(tmp_path, cfg, {})
    assert not (tmp_path / "config.json").exists()


@pytest.mark.torch
def test_transformers_logits_match(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_hf_gpt2(tmp_path, CFG, random_params(CFG))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, CFG.max_positions))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.float().numpy()
    got = np.asarray(ftjax.load(tmp_path).forward(ids))
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4
