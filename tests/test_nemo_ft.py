"""NeMo archives and FasterTransformer c-model directories, against HF GPT-2.

Tolerance as in test_megatron: logits within 1e-4 of HF fp32 (fp32 on both sides,
observed ~1e-6; a layout error is O(1)). Writing FT files is checked bit-exactly
against FasterTransformer's own huggingface_gpt_convert.py layout, rebuilt here
from the HF tensors with numpy.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from hf_models import hf_logits, make_gpt2
from megatron_ckpt import gpt2_weights, layer_split, rank_state, write_gpt2_vocab
from tiny import tiny_config

import ftjax
from converters.fastertransformer import save_fastertransformer
from ftjax.specs import flatten

TOL = 1e-4
V, PADDED = 211, 256
IDS = np.array([[5, 17, 99, 3, 150, 42, 7, 210, 0, 61], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = make_gpt2(path, n_layer=4, n_head=4, n_embd=32, n_positions=32)
    write_gpt2_vocab(path, V)  # the tokenizer files travel with conversions
    return path, model, gpt2_weights(model)


def check(path, hf):
    model = ftjax.load(str(path))
    err = np.abs(np.asarray(model.forward(IDS)) - hf_logits(hf, IDS)).max()
    assert err <= TOL, err
    return model


# -- NeMo --------------------------------------------------------------------------

def nemo_yaml(c, tp, pp, **extra):
    lines = {"mcore_gpt": False, "num_layers": c.n_layer, "hidden_size": c.n_embd,
             "ffn_hidden_size": 4 * c.n_embd, "num_attention_heads": c.n_head,
             "max_position_embeddings": c.n_positions, "encoder_seq_length": c.n_positions,
             "layernorm_epsilon": c.layer_norm_epsilon, "normalization": "layernorm",
             "activation": "gelu", "bias": True, "bias_activation_fusion": True,
             "position_embedding_type": "learned_absolute",
             "share_embeddings_and_output_weights": True, "transformer_block_type": "pre_ln",
             "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
             "make_vocab_size_divisible_by": 128,
             "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer",
                           "vocab_file": "nemo:a1b2_vocab.json",
                           "merge_file": "nemo:c3d4_merges.txt"}}
    lines.update(extra)
    return json.dumps(lines)  # JSON is YAML


def nemo_files(hfdir, w, c, tp, pp, mcore, layernorm_1p, rank_dirs="tp_rank"):
    """{archive member: bytes} of a NeMo checkpoint."""
    import torch

    files = {"model_config.yaml": nemo_yaml(
        c, tp, pp, mcore_gpt=mcore,
        normalization="layernorm1p" if layernorm_1p else "layernorm").encode()}
    files["a1b2_vocab.json"] = (hfdir / "vocab.json").read_bytes()
    files["c3d4_merges.txt"] = (hfdir / "merges.txt").read_bytes()
    for p, layers in enumerate(layer_split(c.n_layer, pp)):
        for t in range(tp):
            flat = rank_state(w, t, tp, layers, 3.0, "new", first=p == 0, last=p == pp - 1,
                              padded=PADDED, layernorm_1p=layernorm_1p, mcore=mcore)
            sd = {"model." + k: torch.from_numpy(np.ascontiguousarray(v))
                  for k, v in flat.items() if v is not None}
            buf = io.BytesIO()
            torch.save(sd, buf)
            if tp == pp == 1:
                name = "model_weights.ckpt"
            elif rank_dirs == "mp_rank":
                name = f"mp_rank_{t:02d}/model_weights.ckpt"
            else:
                name = f"tp_rank_{t:02d}_pp_rank_{p:03d}/model_weights.ckpt"
            files[name] = buf.getvalue()
    return files


def write_nemo_tar(path, files):
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_nemo_dir(path, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return path


@pytest.mark.torch
def test_nemo_legacy_archive_layernorm1p(tmp_path, gpt2):
    hfdir, hf, w = gpt2
    files = nemo_files(hfdir, w, hf.config, 1, 1, mcore=False, layernorm_1p=True)
    model = check(write_nemo_tar(tmp_path / "m.nemo", files), hf)
    assert model.config.vocab_size == V and model.tokenizer.eos_token_id == V - 1


@pytest.mark.torch
def test_nemo_legacy_tp2_archive(tmp_path, gpt2):
    hfdir, hf, w = gpt2
    files = nemo_files(hfdir, w, hf.config, 2, 1, mcore=False, layernorm_1p=False,
                       rank_dirs="mp_rank")
    check(write_nemo_tar(tmp_path / "m.nemo", files), hf)


@pytest.mark.torch
def test_nemo_mcore_tp2_pp2_directory(tmp_path, gpt2):
    hfdir, hf, w = gpt2
    files = nemo_files(hfdir, w, hf.config, 2, 2, mcore=True, layernorm_1p=False)
    check(write_nemo_dir(tmp_path / "m", files), hf)


@pytest.mark.torch
def test_nemo_ignores_post_layernorm_residual_flag(tmp_path, gpt2):
    """NeMo passes apply_residual_connection_post_layernorm=False to its layers whatever
    the yaml says, so the yaml's value never changes the loaded model (unlike a legacy
    Megatron-LM checkpoint's args; test_megatron)."""
    from converters.nemo import load_nemo

    hfdir, hf, w = gpt2
    files = nemo_files(hfdir, w, hf.config, 1, 1, mcore=False, layernorm_1p=False)
    files["model_config.yaml"] = nemo_yaml(
        hf.config, 1, 1, apply_residual_connection_post_layernorm=True).encode()
    cfg, _ = load_nemo(str(write_nemo_dir(tmp_path / "m", files)))
    assert not cfg.residual_from_norm


@pytest.mark.torch
def test_nemo_bad_inputs(tmp_path, gpt2):
    hfdir, hf, w = gpt2
    files = nemo_files(hfdir, w, hf.config, 2, 1, mcore=True, layernorm_1p=False)
    # A truncated rank file.
    bad = dict(files)
    name = "tp_rank_01_pp_rank_000/model_weights.ckpt"
    bad[name] = bad[name][:1000]
    with pytest.raises(ftjax.CheckpointError, match="tp_rank_01_pp_rank_000/model_weights.ckpt"):
        ftjax.load(str(write_nemo_tar(tmp_path / "a.nemo", bad)))
    # An activation ftjax does not implement.
    bad = dict(files)
    bad["model_config.yaml"] = nemo_yaml(hf.config, 2, 1, mcore_gpt=True,
                                         activation="squared-relu").encode()
    with pytest.raises(ftjax.CheckpointError, match="activation = 'squared-relu'"):
        ftjax.load(str(write_nemo_dir(tmp_path / "b", bad)))
    # No vocab file: the padded rows cannot be told apart.
    bad = {k: v for k, v in files.items() if k != "a1b2_vocab.json"}
    with pytest.raises(ftjax.CheckpointError, match="vocab file"):
        ftjax.load(str(write_nemo_dir(tmp_path / "c", bad)))


# -- FasterTransformer -------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("tp", [1, 2])
def test_ft_round_trip_hf_to_ft_to_ftjax(tmp_path, gpt2, tp):
    hfdir, hf, _ = gpt2
    src = ftjax.load(str(hfdir))
    save_fastertransformer(str(tmp_path), src.config, src.params, tp=tp, source=str(hfdir))
    model = check(tmp_path, hf)
    assert model.config == src.config and model.tokenizer is not None
    want, got = flatten(src.params), flatten(model.params)
    for name in want:  # fp32 written and read back: bit-exact
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


@pytest.mark.torch
def test_ft_files_match_fastertransformers_converter_layout(tmp_path, gpt2):
    hfdir, hf, _ = gpt2
    from ftjax.cli import main

    assert main(["convert", str(hfdir), str(tmp_path / "ft"), "--to", "ft", "--tp", "2"]) == 0
    d = tmp_path / "ft"
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    e = hf.config.n_embd
    # huggingface_gpt_convert.py: c_attn [D, 3D] -> [D, 3, D] split on the last axis.
    qkv = sd["transformer.h.2.attn.c_attn.weight"].reshape(e, 3, e)
    got = np.fromfile(d / "model.layers.2.attention.query_key_value.weight.1.bin", np.float32)
    np.testing.assert_array_equal(got, np.split(qkv, 2, axis=-1)[1].ravel())
    b = sd["transformer.h.2.attn.c_attn.bias"].reshape(3, e)
    got = np.fromfile(d / "model.layers.2.attention.query_key_value.bias.0.bin", np.float32)
    np.testing.assert_array_equal(got, np.split(b, 2, axis=-1)[0].ravel())
    got = np.fromfile(d / "model.layers.0.attention.dense.weight.1.bin", np.float32)
    np.testing.assert_array_equal(
        got, np.split(sd["transformer.h.0.attn.c_proj.weight"], 2, axis=0)[1].ravel())
    got = np.fromfile(d / "model.layers.3.mlp.dense_h_to_4h.weight.0.bin", np.float32)
    np.testing.assert_array_equal(
        got, np.split(sd["transformer.h.3.mlp.c_fc.weight"], 2, axis=-1)[0].ravel())
    np.testing.assert_array_equal(np.fromfile(d / "model.wte.bin", np.float32),
                                  sd["transformer.wte.weight"].ravel())
    assert not (d / "model.lm_head.weight.bin").exists()  # tied
    ini = (d / "config.ini").read_text()
    for line in ("head_num = 4", "size_per_head = 8", "inter_size = 128", "num_layer = 4",
                 "vocab_size = 211", "max_pos_seq_len = 32", "weight_data_type = fp32",
                 "tensor_para_size = 2", "end_id = 0"):
        assert line in ini, line


@pytest.mark.torch
def test_ft_fp16_and_bad_files(tmp_path, gpt2):
    hfdir, _, _ = gpt2
    src = ftjax.load(str(hfdir))
    save_fastertransformer(str(tmp_path), src.config, src.params, tp=2, dtype="float16")
    assert "weight_data_type = fp16" in (tmp_path / "config.ini").read_text()
    model = ftjax.load(str(tmp_path))
    q = flatten(model.params)["layers/attn/q/kernel"]
    want = np.asarray(flatten(src.params)["layers/attn/q/kernel"]).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(q), want.astype(np.float32))
    name = "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[:-2])
    with pytest.raises(ftjax.CheckpointError, match=f"{name}.*truncated"):
        ftjax.load(str(tmp_path))
    (tmp_path / name).unlink()
    with pytest.raises(ftjax.CheckpointError, match=f"{name}: not found"):
        ftjax.load(str(tmp_path))
    (tmp_path / name).write_bytes(data)
    (tmp_path / "model.layers.0.attention.rotary.bin").write_bytes(b"")
    with pytest.raises(ftjax.CheckpointError, match="rotary.bin"):
        ftjax.load(str(tmp_path))
    (tmp_path / "model.layers.0.attention.rotary.bin").unlink()
    ini = (tmp_path / "config.ini").read_text()
    (tmp_path / "config.ini").write_text(ini + "use_attention_linear_bias = true\n")
    with pytest.raises(ftjax.CheckpointError, match="use_attention_linear_bias"):
        ftjax.load(str(tmp_path))
    (tmp_path / "config.ini").write_text(ini + "rotary_embedding = 8\n")
    with pytest.raises(ftjax.CheckpointError, match="rotary_embedding"):
        ftjax.load(str(tmp_path))


@pytest.mark.torch
def test_ft_writer_refuses_what_ft_gpt_cannot_express(tmp_path, gpt2):
    import dataclasses

    hfdir, _, _ = gpt2
    src = ftjax.load(str(hfdir))
    with pytest.raises(ValueError, match="positions"):
        save_fastertransformer(str(tmp_path), dataclasses.replace(src.config, positions="rotary"),
                               src.params)
    with pytest.raises(ValueError, match="tp must"):
        save_fastertransformer(str(tmp_path), src.config, src.params, tp=3)


def test_ft_round_trip_without_torch(tmp_path):
    """ftjax -> FT (TP=2, fp32) -> ftjax is bit-exact (runs on 3.12, where torch is absent)."""
    import jax

    from ftjax.specs import shapes as param_shapes

    cfg = tiny_config(d_ff=48, bos_token_id=1, eos_token_id=2)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda x: rng.standard_normal(x.shape).astype(np.float32), param_shapes(cfg))
    save_fastertransformer(str(tmp_path), cfg, params, tp=2)
    model = ftjax.load(str(tmp_path))
    assert model.config == cfg
    got = flatten(model.params)
    for name, want in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want), name)
