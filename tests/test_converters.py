"""Checkpoint reading: ftjax-native round trips and clear errors for bad input (no torch)."""

import json
import os

import numpy as np
import pytest

import ftjax
from converters import load_checkpoint, save_native
from converters.hf_export import save_hf_gpt2
from converters.tensors import read_safetensors, write_safetensors
from tiny import tiny_config, tiny_params


@pytest.fixture
def hf_dir(tmp_path):
    cfg = tiny_config(max_positions=32)
    save_hf_gpt2(str(tmp_path), cfg, tiny_params(cfg))
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_tensors(directory, fn):
    path = str(directory / "model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    fn(tensors)
    write_safetensors(path, tensors)


def test_native_round_trip_is_exact_and_cast(hf_dir, tmp_path_factory):
    cfg, params = load_checkpoint(str(hf_dir))
    out = tmp_path_factory.mktemp("native")
    save_native(str(out), cfg, params, "float32")
    m1, m2 = ftjax.load(str(hf_dir)), ftjax.load(str(out))
    assert m2.config == m1.config
    ids = [[1, 2, 3, 4, 5]]
    assert np.array_equal(np.asarray(m1.forward(ids)), np.asarray(m2.forward(ids)))


@pytest.mark.parametrize("edit, match", [
    (lambda d: os.remove(d / "config.json"), "config.json: not found"),
    (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    (lambda d: _edit_config(d, model_type="mamba"), "model_type 'mamba' is not supported"),
    (lambda d: _edit_config(d, scale_attn_by_inverse_layer_idx=True),
     "'scale_attn_by_inverse_layer_idx' = True is not supported"),
    (lambda d: _edit_config(d, activation_function="quick_gelu"),
     "'activation_function' = 'quick_gelu' is not supported"),
    (lambda d: _edit_config(d, n_embd=48), r"expected \(.*\) for this config"),
    (lambda d: _edit_config(d, n_head=None), "n_head"),
    (lambda d: os.remove(d / "model.safetensors"), "no weights found"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"), "not a readable safetensors"),
    (lambda d: _edit_tensors(d, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias")),
     "missing tensor 'transformer.h.1.mlp.c_fc.bias'"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"transformer.h.0.attn.rotary": t["transformer.ln_f.bias"]})),
     r"does not understand .*'transformer.h.0.attn.rotary'"),
    (lambda d: _edit_tensors(d, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1})),
     "'lm_head.weight' differs from the token embedding"),
])
def test_bad_checkpoints_raise_checkpoint_error(hf_dir, edit, match):
    edit(hf_dir)
    with pytest.raises(ftjax.CheckpointError, match=match):
        ftjax.load(str(hf_dir))


def test_truncated_tensor_data(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(ftjax.CheckpointError, match="runs past the end of the file"):
        ftjax.load(str(hf_dir))


def test_saved_tied_head_is_accepted(hf_dir):
    _edit_tensors(hf_dir, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"]}))
    assert ftjax.load(str(hf_dir)).config.tied_embeddings


def test_missing_directory(tmp_path):
    with pytest.raises(ftjax.CheckpointError, match="not a directory"):
        ftjax.load(str(tmp_path / "nothing"))


def test_native_version_mismatch(hf_dir, tmp_path_factory):
    cfg, params = load_checkpoint(str(hf_dir))
    out = tmp_path_factory.mktemp("native")
    save_native(str(out), cfg, params, "float32")
    meta = json.loads((out / "ftjax_config.json").read_text())
    meta["version"] = 99
    (out / "ftjax_config.json").write_text(json.dumps(meta))
    with pytest.raises(ftjax.CheckpointError, match="not ftjax format version 1"):
        ftjax.load(str(out))


def test_sharded_safetensors_index(hf_dir):
    tensors = read_safetensors(str(hf_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        write_safetensors(str(hf_dir / fname), {k: np.array(tensors[k]) for k in keys})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    ref = np.asarray(ftjax.load(str(hf_dir)).forward([[1, 2, 3]]))
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert np.array_equal(np.asarray(ftjax.load(str(hf_dir)).forward([[1, 2, 3]])), ref)


def test_orbax_round_trip_restores_onto_given_shardings(hf_dir, tmp_path_factory):
    import jax

    from converters import load_orbax, save_orbax

    cfg, params = load_checkpoint(str(hf_dir))
    out = tmp_path_factory.mktemp("orbax")
    save_orbax(str(out), cfg, params, "float32", source=str(hf_dir))
    cfg2, restored, dtype = load_orbax(str(out))
    assert cfg2 == cfg and dtype == "float32"
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tensor",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, placed, _ = load_orbax(str(out), jax.tree_util.tree_map(lambda _: spec, params),
                              dtype="bfloat16")
    leaf = jax.tree_util.tree_leaves(placed)[0]
    assert leaf.sharding == spec and leaf.dtype == np.dtype("bfloat16")
    ids = [[1, 2, 3, 4, 5]]
    assert np.array_equal(np.asarray(ftjax.load(str(hf_dir)).forward(ids)),
                          np.asarray(ftjax.load(str(out)).forward(ids)))


def test_orbax_checkpoint_of_another_config_is_refused(hf_dir, tmp_path_factory):
    from converters import load_orbax, save_orbax

    cfg, params = load_checkpoint(str(hf_dir))
    out = tmp_path_factory.mktemp("orbax")
    save_orbax(str(out), cfg, params, "float32")
    meta = json.loads((out / "ftjax_config.json").read_text())
    meta["config"]["d_ff"] = 48
    (out / "ftjax_config.json").write_text(json.dumps(meta))
    with pytest.raises(ftjax.CheckpointError, match="cannot restore"):
        load_orbax(str(out))
