"""Megatron-LM checkpoints: synthesized from tiny HF models, loaded, compared with HF.

Tolerance: logits within 1e-4 of HF fp32 (absolute; logits are O(10) here). Both
compute the same fp32 math in different summation orders, ~1e-6 apart; a wrong
qkv layout, TP merge or layer order is off by O(1).
"""

import os
import pickle
import sys
import types

import numpy as np
import pytest
from hf_models import hf_logits, make_gpt2
from megatron_ckpt import gpt2_weights, llama_weights, write_gpt2_vocab, write_megatron

import ftjax

pytestmark = pytest.mark.torch
TOL = 1e-4
V, PADDED = 211, 256  # Megatron pads the vocab (to a multiple of 128 * tp)
IDS = np.array([[5, 17, 99, 3, 150, 42, 7, 210, 0, 61], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def gpt2_args(c):
    return {"num_layers": c.n_layer, "hidden_size": c.n_embd, "num_attention_heads": c.n_head,
            "max_position_embeddings": c.n_positions, "ffn_hidden_size": 4 * c.n_embd,
            "padded_vocab_size": PADDED, "layernorm_epsilon": c.layer_norm_epsilon,
            # as Megatron-LM saves them without --group-query-attention
            "group_query_attention": False, "num_query_groups": 1}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """HF GPT-2 (tanh gelu, as Megatron's fused bias-gelu) with 4 layers, 4 heads."""
    model = make_gpt2(tmp_path_factory.mktemp("hf"), n_layer=4, n_head=4, n_embd=32,
                      n_positions=32)
    return model, gpt2_weights(model)


def check(model_path, hf, **kw):
    model = ftjax.load(str(model_path), **kw)
    err = np.abs(np.asarray(model.forward(IDS)) - hf_logits(hf, IDS)).max()
    assert err <= TOL, err
    return model


@pytest.mark.parametrize("version, tp, pp, names, mcore", [
    (0, 1, 1, "old", False), (1.0, 2, 1, "old", False), (3.0, 1, 2, "new", False),
    (3.0, 2, 2, "new", False), (2.0, 2, 1, "old", False), (3.0, 2, 2, "new", True),
])
def test_gpt2_versions_and_parallel_layouts(tmp_path, gpt2, version, tp, pp, names, mcore):
    hf, w = gpt2
    root = write_megatron(tmp_path, w, 4, tp=tp, pp=pp, version=version, names=names,
                          args=gpt2_args(hf.config), padded=PADDED, mcore=mcore,
                          iteration=None if pp == 1 else 2000)
    write_gpt2_vocab(root, V)
    model = check(root, hf)
    # The padded rows are gone (logits have V columns, so the sampler cannot pick them);
    # GPT-2 vocab.json + merges.txt became the tokenizer.
    assert model.config.vocab_size == V and model.config.eos_token_id == V - 1
    assert model.tokenizer is not None and model.tokenizer.eos_token_id == V - 1
    assert model.tokenizer.encode("abc") == [64, 65, 66]


def test_erf_gelu_when_fusion_is_off(tmp_path):
    hf = make_gpt2(tmp_path / "hf", n_layer=2, n_head=4, n_embd=32, n_positions=32,
                   activation_function="gelu")
    root = write_megatron(tmp_path / "m", gpt2_weights(hf), 2, tp=2, args=gpt2_args(hf.config),
                          padded=PADDED, extra_args={"bias_gelu_fusion": False})
    write_gpt2_vocab(root, V)
    assert check(root, hf).config.activation == "gelu"


def test_llama_like_gqa_swiglu_rope_untied(tmp_path):
    import transformers
    from hf_models import make_hf

    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        rms_norm_eps=1e-5, initializer_range=0.3, tie_word_embeddings=False)
    hf = make_hf(cfg, tmp_path / "hf")
    args = {"num_layers": 4, "hidden_size": 32, "num_attention_heads": 4,
            "group_query_attention": True, "num_query_groups": 2, "ffn_hidden_size": 48,
            "max_position_embeddings": 32, "swiglu": True, "normalization": "RMSNorm",
            "norm_epsilon": 1e-5, "position_embedding_type": "rope", "add_bias_linear": False,
            "untie_embeddings_and_output_weights": True, "padded_vocab_size": PADDED}
    root = write_megatron(tmp_path / "m", llama_weights(hf), 4, tp=2, pp=2, args=args,
                          padded=PADDED)
    # No vocab.json (a SentencePiece model): the vocab size comes from megatron_args.
    with pytest.raises(ftjax.CheckpointError, match="vocab.json"):
        ftjax.load(str(root))
    model = check(root, hf, megatron_args={"vocab_size": V})
    c = model.config
    assert (c.n_kv_heads, c.glu, c.norm, c.positions, c.tied_embeddings) == (
        2, True, "rmsnorm", "rotary", False)


def test_no_args_old_release_needs_flags(tmp_path, gpt2):
    hf, w = gpt2
    root = write_megatron(tmp_path, w, 4, version=0, names="old", args=None, padded=PADDED)
    write_gpt2_vocab(root, V)
    with pytest.raises(ftjax.CheckpointError, match="--num-layers N --hidden-size N"):
        ftjax.load(str(root))
    from ftjax.cli import main

    flags = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
             "--max-position-embeddings", "32"]
    dst = tmp_path / "native"
    assert main(["convert", str(root), str(dst), *flags]) == 0
    model = check(dst, hf)  # the ftjax checkpoint, with the tokenizer copied along
    assert model.config.vocab_size == V and model.tokenizer is not None
    with pytest.raises(ValueError, match="not a Megatron"):
        ftjax.load(str(tmp_path / "release" / "mp_rank_00"), megatron_args={"num_layers": 4})


def test_args_with_megatron_classes_unpickle_without_megatron(tmp_path, gpt2):
    hf, w = gpt2
    # Under Megatron's package name (whose classes load as inert stand-ins), importable
    # only while the checkpoint is written.
    names = ("megatron", "megatron.core", "megatron.core.fake_enums")
    mod = types.ModuleType(names[-1])

    class AttnMaskType:  # pickled by reference to a module that will not import
        def __init__(self, value):
            self.value = value

    AttnMaskType.__module__ = mod.__name__
    AttnMaskType.__qualname__ = "AttnMaskType"
    mod.AttnMaskType = AttnMaskType
    assert not any(n in sys.modules for n in names)
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]}, **{names[-1]: mod})
    try:
        root = write_megatron(tmp_path, w, 4, args=gpt2_args(hf.config), padded=PADDED,
                              extra_args={"attn_mask_type": AttnMaskType(1)})
    finally:
        for n in names:
            del sys.modules[n]
    path = os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt")
    import torch

    with pytest.raises((ModuleNotFoundError, pickle.UnpicklingError, AttributeError)):
        torch.load(path, weights_only=False)  # plain unpickling fails
    write_gpt2_vocab(root, V)
    check(root, hf)


def test_bad_files_name_file_and_tensor(tmp_path, gpt2):
    import torch

    hf, w = gpt2
    args = gpt2_args(hf.config)
    root = write_megatron(tmp_path / "a", w, 4, tp=2, args=args, padded=PADDED)
    write_gpt2_vocab(root, V)
    rank1 = os.path.join(root, "release", "mp_rank_01", "model_optim_rng.pt")
    # A tensor of the wrong shape on one rank.
    ckpt = torch.load(rank1, weights_only=False)
    key = "layers.1.self_attention.query_key_value.weight"
    enc = ckpt["model"]["language_model"]["encoder"]
    good = enc[key]
    enc[key] = good[:-1]
    torch.save(ckpt, rank1)
    with pytest.raises(ftjax.CheckpointError, match=f"mp_rank_01.*{key}.*shape"):
        ftjax.load(str(root))
    # A replicated tensor that differs between ranks (files of two different models).
    enc[key] = good
    enc["layers.0.input_norm.weight"] = enc["layers.0.input_norm.weight"] + 1
    torch.save(ckpt, rank1)
    with pytest.raises(ftjax.CheckpointError, match="mp_rank_01.*layers.0.input_norm.weight"):
        ftjax.load(str(root))
    # A truncated file.
    with open(rank1, "rb") as f:
        data = f.read()
    with open(rank1, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ftjax.CheckpointError, match="mp_rank_01.*model_optim_rng.pt"):
        ftjax.load(str(root))
    # A missing rank.
    os.remove(rank1)
    os.rmdir(os.path.dirname(rank1))
    root2 = write_megatron(tmp_path / "b", w, 4, tp=2, pp=2, args=args, padded=PADDED)
    write_gpt2_vocab(root2, V)
    import shutil

    shutil.rmtree(os.path.join(root2, "release", "mp_rank_01_001"))
    with pytest.raises(ftjax.CheckpointError, match=r"\(1, 1\).*missing"):
        ftjax.load(str(root2))


def test_args_contradicting_the_files_are_refused(tmp_path, gpt2):
    hf, w = gpt2
    args = dict(gpt2_args(hf.config), num_layers=6)
    root = write_megatron(tmp_path, w, 4, pp=2, args=args, padded=PADDED)
    write_gpt2_vocab(root, V)
    with pytest.raises(ftjax.CheckpointError, match="4 layers.*num_layers=6"):
        ftjax.load(str(root))
    args = dict(gpt2_args(hf.config), position_embedding_type="alibi")
    root = write_megatron(tmp_path / "b", w, 4, args=args, padded=PADDED)
    write_gpt2_vocab(root, V)
    with pytest.raises(ftjax.CheckpointError, match="position_embedding_type"):
        ftjax.load(str(root))



def test_post_layernorm_residual_by_layer_kind(tmp_path, gpt2):
    """apply_residual_connection_post_layernorm: Megatron-LM's legacy layer adds the norm's
    output as the residual (ModelConfig.residual_from_norm, whose math is parity-tested
    on BLOOM); megatron-core's layer ignores the flag since Sep 2023 and applied it
    before, so with megatron-core keys it is refused as ambiguous."""
    from converters.megatron import load_megatron

    hf, w = gpt2
    flag = {"apply_residual_connection_post_layernorm": True}
    for mcore in (False, True):
        root = write_megatron(tmp_path / str(mcore), w, 4, args=gpt2_args(hf.config),
                              padded=PADDED, mcore=mcore, extra_args=flag)
        write_gpt2_vocab(root, V)
        if mcore:
            with pytest.raises(ftjax.CheckpointError,
                               match="apply_residual_connection_post_layernorm.*megatron-core"):
                load_megatron(str(root))
        else:
            assert load_megatron(str(root))[0].residual_from_norm
