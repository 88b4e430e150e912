"""Nothing half-written, nothing stale: `ftjax convert` replaces DST whole or not at all,
and no load or eval leaves temporary directories behind (issue 18, part 2)."""

import os
import signal
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from tiny import tiny_config, tiny_params

import ftjax
from converters import tokenizer_files
from converters.hf_export import save_hf_gpt2
from converters.staging import staged_dir
from ftjax.cli import main

IDS = [[1, 2, 3, 4, 5, 6]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two HF checkpoints of different random models (old and new) and their logits."""
    root = tmp_path_factory.mktemp("convert_safety")
    cfg = tiny_config(bos_token_id=0, eos_token_id=0)
    out = {}
    for name, seed in (("old", 0), ("new", 1)):
        params = jax.tree_util.tree_map(np.asarray, tiny_params(cfg, seed))
        path = str(root / name)
        save_hf_gpt2(path, cfg, params)
        out[name] = (path, np.asarray(ftjax.load(path).forward(IDS)))
    assert not np.allclose(out["old"][1], out["new"][1])
    return out


def logits(path):
    return np.asarray(ftjax.load(path).forward(IDS))


def partials(dst):
    parent, name = os.path.split(str(dst))
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.ftjax-partial-")]


@pytest.mark.parametrize("first, second", [("orbax", "ft"), ("ft", "native"),
                                           ("native", "orbax")])
def test_force_replaces_dst_whole(tmp_path, sources, first, second):
    """The old checkpoint's files never survive --force (an orbax DST overwritten with
    --to ft used to keep ftjax_config.json and load the OLD model)."""
    dst = tmp_path / "dst"
    assert main(["convert", sources["old"][0], str(dst), "--to", first]) == 0
    np.testing.assert_array_equal(logits(str(dst)), sources["old"][1])
    (dst / "stray.txt").write_text("from before")
    assert main(["convert", sources["new"][0], str(dst), "--to", second, "--force"]) == 0
    np.testing.assert_allclose(logits(str(dst)), sources["new"][1], rtol=1e-6, atol=1e-6)
    assert not (dst / "stray.txt").exists()
    assert partials(dst) == []


def test_failed_write_leaves_dst_and_no_partial(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_dir(str(dst), force=True) as out:
            with open(os.path.join(out, "half.bin"), "wb") as f:
                f.write(b"x" * 10)
            raise RuntimeError("disk full")
    assert sorted(os.listdir(dst)) == ["keep.txt"] and partials(dst) == []


# A convert that kills itself (SIGKILL: no cleanup runs) part-way through writing each
# target: FT after 9 tensor files, native inside params.safetensors, orbax after the
# params and before its config.
KILLERS = {
    "ft": """
import converters.fastertransformer as mod, numpy as np, types
proxy = types.ModuleType("numpy_proxy"); proxy.__dict__.update(np.__dict__)
calls = [0]
def asc(*a, **k):
    calls[0] += 1
    if calls[0] == 10:
        die()
    return np.ascontiguousarray(*a, **k)
proxy.ascontiguousarray = asc
mod.np = proxy
""",
    "native": """
import converters.native as mod
def write(path, tensors, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a safetensors file")
    die()
mod.write_safetensors = write
""",
    "orbax": """
import converters.orbax_ckpt as mod, json, types
mod.json = types.SimpleNamespace(dump=lambda *a, **k: die(), load=json.load)
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(KILLERS))
def test_sigkill_mid_convert_leaves_dst_as_it_was(tmp_path, sources, target):
    dst = tmp_path / "dst"
    assert main(["convert", sources["old"][0], str(dst), "--to", target]) == 0
    before = sorted(os.listdir(dst))
    script = ("import os, signal\n"
              "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
              + KILLERS[target] +
              "from ftjax.cli import main\n"
              f"main(['convert', {sources['new'][0]!r}, {str(dst)!r}, '--to', {target!r}, "
              "'--force'])\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(partials(dst)) == 1  # the killed writer's staging dir, nothing in DST
    assert sorted(os.listdir(dst)) == before
    np.testing.assert_array_equal(logits(str(dst)), sources["old"][1])
    # The next convert to DST removes the dead writer's partial directory.
    assert main(["convert", sources["new"][0], str(dst), "--to", target, "--force"]) == 0
    assert partials(dst) == []
    np.testing.assert_allclose(logits(str(dst)), sources["new"][1], rtol=1e-6, atol=1e-6)


def _nemo_with_tokenizer(path):
    d = os.path.dirname(path)
    files = {"model_config.yaml": "tokenizer:\n  vocab_file: nemo:vocab.json\n"
                                  "  merge_file: nemo:merges.txt\n",
             "vocab.json": '{"a": 0, "b": 1}', "merges.txt": "#version: 0.2\n"}
    with tarfile.open(path, "w") as tar:
        for name, text in files.items():
            p = os.path.join(d, name)
            with open(p, "w") as f:
                f.write(text)
            tar.add(p, arcname="./" + name)


def test_nemo_tokenizer_files_are_removed_after_use(tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = str(tmp_path / "m.nemo")
    _nemo_with_tokenizer(path)
    with tokenizer_files(path) as d:
        assert sorted(os.listdir(d)) == ["merges.txt", "vocab.json"]
    assert not os.path.exists(d) and os.listdir(scratch) == []


@pytest.mark.torch
def test_eval_compare_hf_leaves_no_export_in_tmp(tmp_path, sources, monkeypatch):
    import tempfile

    from ftjax.evaluate import hf_scorer

    native = tmp_path / "native"
    assert main(["convert", sources["old"][0], str(native), "--to", "native"]) == 0
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    forward = hf_scorer(ftjax.load(str(native)))  # exports to a temporary HF directory
    assert [n for n in os.listdir(scratch) if n.startswith("ftjax")] == []  # (torch caches)
    batch = np.zeros((8, 6), np.int32)
    batch[0] = IDS[0]
    # The HF model still works from its own copy of the weights (same logits as ftjax's).
    np.testing.assert_allclose(forward(batch)[0], sources["old"][1][0], rtol=1e-4, atol=1e-4)
