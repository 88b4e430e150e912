"""The hostile-input catalogue (issue 18): every case a named error.

One table of bad inputs, each checked for the exception type and a message naming the
file / field / limit at fault: crafted pickles (which must never run: each would
write a marker file), ambiguous checkpoint directories, malformed safetensors
headers, invalid configs, non-finite weights, bad prompts / sampling options / load
arguments / meshes, and bad command lines. Checkpoints are built once per module from
tiny random params (torch only for the pickle cases), and nothing here compiles a
model: every case is refused before any computation.
"""

import contextlib
import io
import json
import os
import shutil
import struct
import tarfile

import jax
import numpy as np
import pytest
from tiny import tiny_config, tiny_model, tiny_params

import ftjax
from converters import save_native, save_orbax
from converters.fastertransformer import save_fastertransformer
from converters.hf_export import save_hf_gpt2
from converters.tensors import write_safetensors
from ftjax.cli import main

SP = ftjax.SamplingParams
MARKER = "PWNED"  # what a crafted pickle would create if it ever ran


class CliFailed(Exception):
    """A command that exited non-zero: the message is its exit code and stderr."""


class Ctx:
    """The module's checkpoints (built once) and helpers to get fresh copies."""

    def __init__(self, root):
        self.root = root
        self.cfg = tiny_config(bos_token_id=0, eos_token_id=0)
        self.params = jax.tree_util.tree_map(np.asarray, tiny_params(self.cfg))
        self.base = {}
        for name, save in (("hf", lambda d: save_hf_gpt2(d, self.cfg, self.params)),
                           ("native", lambda d: save_native(d, self.cfg, self.params, "float32")),
                           ("ft", lambda d: save_fastertransformer(d, self.cfg, self.params)),
                           ("orbax", lambda d: save_orbax(d, self.cfg, self.params, "float32"))):
            path = os.path.join(root, "base", name)
            save(path)
            self.base[name] = path
        self.model = tiny_model()
        self.n = 0

    def copy(self, name: str) -> str:
        self.n += 1
        dst = os.path.join(self.root, f"case{self.n}", name)
        shutil.copytree(self.base[name], dst)
        return dst

    def new_dir(self) -> str:
        self.n += 1
        path = os.path.join(self.root, f"case{self.n}")
        os.makedirs(path)
        return path

    def marker(self) -> str:
        return os.path.join(self.root, MARKER)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Ctx(str(tmp_path_factory.mktemp("bad_inputs")))


# -- helpers the cases use ------------------------------------------------------------

def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse rejects: exit code 2, usage, then the error line
            rc = e.code
    text = err.getvalue()
    assert "Traceback" not in text
    if rc:
        raise CliFailed(f"exit {rc}: {text.strip().splitlines()[-1]}")
    return out.getvalue()


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def raw_safetensors(path, header, data=b"", header_len=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len))
        f.write(blob)
        f.write(data)


def st_case(ctx, header, data=b"", header_len=None):
    """A copy of the native checkpoint whose params file is replaced by a crafted one."""
    d = ctx.copy("native")
    raw_safetensors(os.path.join(d, "params.safetensors"), header, data, header_len)
    return ftjax.load(d)


F4 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def two(a, b):
    return {"a": {"dtype": "F32", "shape": [2], "data_offsets": a},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": b}}


def evil_object(marker):
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({marker!r}, 'w').write('ran')",))
    return Evil()


def torch_save(obj, path, legacy=False):
    import torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def evil_megatron(ctx, legacy=False):
    import torch

    root = ctx.new_dir()
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    torch_save({"model": {"w": torch.zeros(2)}, "args": evil_object(ctx.marker()),
                "checkpoint_version": 3.0},
               os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt"), legacy)
    return root


def evil_nemo_files(ctx, directory):
    with open(os.path.join(directory, "model_config.yaml"), "w") as f:
        f.write("num_layers: 2\nhidden_size: 32\n")
    torch_save({"state_dict": evil_object(ctx.marker())},
               os.path.join(directory, "model_weights.ckpt"))


def evil_nemo_archive(ctx):
    d = ctx.new_dir()
    evil_nemo_files(ctx, d)
    path = os.path.join(d, "model.nemo")
    with tarfile.open(path, "w") as tar:
        for name in ("model_config.yaml", "model_weights.ckpt"):
            tar.add(os.path.join(d, name), arcname="./" + name)
    return ftjax.load(path)


def evil_hf_bin(ctx):
    d = ctx.copy("hf")
    os.remove(os.path.join(d, "model.safetensors"))
    torch_save({"transformer.wte.weight": evil_object(ctx.marker())},
               os.path.join(d, "pytorch_model.bin"))
    return ftjax.load(d)


def stray_nemo_in_hf(ctx):
    d = ctx.copy("hf")
    evil_nemo_files(ctx, d)
    return ftjax.load(d)


def stray_megatron_in_hf(ctx):
    d = ctx.copy("hf")
    torch_save({"model": evil_object(ctx.marker())},
               os.path.join(d, "mp_rank_00", "model_optim_rng.pt"))
    return ftjax.load(d)


def restricted_loads(ctx):
    import pickle

    from converters.safe_pickle import loads

    return loads(pickle.dumps(evil_object(ctx.marker())), "crafted.pkl")


def restricted(data):
    from converters.safe_pickle import loads

    return loads(data, "x.pt")


def nan_weights(ctx, check=True):
    d = ctx.copy("native")
    path = os.path.join(d, "params.safetensors")
    from converters.tensors import read_safetensors

    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    tensors["layers/mlp/wi/kernel"][1, 2, 3] = np.nan
    write_safetensors(path, tensors)
    return ftjax.load(d, check_finite=check)


def convert_nan(ctx):
    d = ctx.copy("hf")
    from converters.tensors import read_safetensors

    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    tensors["transformer.h.1.attn.c_proj.weight"][0, 0] = np.inf
    write_safetensors(path, tensors)
    return cli("convert", d, os.path.join(ctx.new_dir(), "out"), "--to", "native")


def orbax_missing_data(ctx):
    d = ctx.copy("orbax")
    for root, _, files in os.walk(os.path.join(d, "params")):
        for name in files:
            if os.sep + "d" in root and "ocdbt.process_0" in root:
                os.remove(os.path.join(root, name))
    return ftjax.load(d)


def orbax_truncated(ctx):
    d = ctx.copy("orbax")
    for root, _, files in os.walk(os.path.join(d, "params")):
        for name in files:
            if "ocdbt.process_0" in root and os.sep + "d" in root:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    data = f.read()
                with open(path, "wb") as f:
                    f.write(data[:len(data) // 3])
    return ftjax.load(d)


def json_file(ctx, base, name, value):
    d = ctx.copy(base)
    with open(os.path.join(d, name), "w") as f:
        json.dump(value, f)
    return ftjax.load(d)


def shard_index(ctx, index):
    d = ctx.copy("hf")
    os.remove(os.path.join(d, "model.safetensors"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return ftjax.load(d)


def hf_config(ctx, **changes):
    d = ctx.copy("hf")
    edit_json(os.path.join(d, "config.json"), **changes)
    return ftjax.load(d)


def native_config(ctx, **changes):
    d = ctx.copy("native")
    path = os.path.join(d, "ftjax_config.json")
    with open(path) as f:
        meta = json.load(f)
    meta["config"].update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)
    return ftjax.load(d)


def ft_config(ctx, old, new):
    d = ctx.copy("ft")
    path = os.path.join(d, "config.ini")
    with open(path) as f:
        text = f.read()
    assert old in text
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return ftjax.load(d)


def text_file(ctx, content, mode="w"):
    path = os.path.join(ctx.new_dir(), "text.txt")
    with open(path, mode) as f:
        f.write(content)
    return path


def gen(ctx, prompts, **kw):
    return ctx.model.generate(prompts, **kw)


def sp(**kw):
    return lambda ctx: SP(**kw)


torch_case = pytest.mark.torch

# (case, exception, regex the message must match). Each message names the file, field or
# limit at fault.
CASES = [
    # 1. No checkpoint may run code.
    pytest.param(evil_hf_bin, ftjax.CheckpointError,
                 r"pytorch_model\.bin: the pickle asks for the global (builtins\.)?exec",
                 id="code-hf-bin", marks=torch_case),
    pytest.param(lambda c: ftjax.load(evil_megatron(c)), ftjax.CheckpointError,
                 r"model_optim_rng\.pt: the pickle asks for the global builtins\.exec",
                 id="code-megatron-zip", marks=torch_case),
    pytest.param(lambda c: ftjax.load(evil_megatron(c, legacy=True)), ftjax.CheckpointError,
                 r"model_optim_rng\.pt: the pickle asks for the global builtins\.exec",
                 id="code-megatron-legacy", marks=torch_case),
    pytest.param(evil_nemo_archive, ftjax.CheckpointError,
                 r"model\.nemo:model_weights\.ckpt: the pickle asks for the global builtins\.exec",
                 id="code-nemo-archive", marks=torch_case),
    pytest.param(lambda c: ftjax.load((lambda d: (evil_nemo_files(c, d), d)[1])(c.new_dir())),
                 ftjax.CheckpointError,
                 r"model_weights\.ckpt: the pickle asks for the global builtins\.exec",
                 id="code-nemo-dir", marks=torch_case),
    pytest.param(stray_nemo_in_hf, ftjax.CheckpointError,
                 r"2 checkpoint formats \(nemo: model_config\.yaml.*huggingface: config\.json",
                 id="code-stray-nemo-in-hf", marks=torch_case),
    pytest.param(stray_megatron_in_hf, ftjax.CheckpointError,
                 r"2 checkpoint formats \(megatron: .*model_optim_rng\.pt; huggingface",
                 id="code-stray-megatron-in-hf", marks=torch_case),
    pytest.param(lambda c: cli("convert", evil_megatron(c), os.path.join(c.new_dir(), "o")),
                 CliFailed, r"exit 1: .*model_optim_rng\.pt: the pickle asks for the global "
                 r"builtins\.exec", id="code-convert-megatron", marks=torch_case),
    pytest.param(restricted_loads, ftjax.CheckpointError,
                 r"crafted\.pkl: the pickle asks for the global builtins\.exec",
                 id="code-restricted-unpickler"),
    pytest.param(lambda c: restricted(b"cos\nsystem\n(S'echo hi'\ntR."), ftjax.CheckpointError,
                 r"x\.pt: the pickle asks for the global os\.system", id="code-os-system"),
    pytest.param(lambda c: restricted(b"c__builtin__\ngetattr\n(I1\nS'real'\ntR."),
                 ftjax.CheckpointError, r"x\.pt: the pickle asks for the global builtins\.getattr",
                 id="code-getattr"),
    pytest.param(lambda c: restricted(b"c__builtin__\nbytearray\n(I1000000000000\ntR."),
                 ftjax.CheckpointError, r"x\.pt: not a readable pickle .*bytearray\(int\) is "
                 "refused", id="pickle-bytearray-bomb"),
    # Format detection.
    pytest.param(lambda c: ftjax.load((lambda d: (
        open(os.path.join(d, "latest_checkpointed_iteration.txt"), "w").write("release"), d)[1])(
            c.copy("hf"))), ftjax.CheckpointError,
        r"megatron: latest_checkpointed_iteration\.txt.*huggingface: config\.json",
        id="detect-stray-megatron-pointer"),
    pytest.param(lambda c: ftjax.load((lambda d: (
        shutil.copy(os.path.join(c.base["hf"], "config.json"), d), d)[1])(c.copy("native"))),
        ftjax.CheckpointError, r"ftjax: ftjax_config\.json.*huggingface: config\.json",
        id="detect-ftjax-and-hf"),
    pytest.param(lambda c: ftjax.load((lambda d: (
        shutil.copy(os.path.join(c.base["hf"], "config.json"), d), d)[1])(c.copy("orbax")),
        mesh=ftjax.make_mesh(tensor=2)), ftjax.CheckpointError,
        r"ftjax: ftjax_config\.json.*huggingface: config\.json", id="detect-orbax-on-mesh"),
    pytest.param(lambda c: ftjax.load(c.new_dir()), ftjax.CheckpointError,
                 r"not a checkpoint directory: none of ftjax: ftjax_config\.json",
                 id="detect-empty-dir"),
    pytest.param(lambda c: ftjax.load(os.path.join(c.root, "missing")), ftjax.CheckpointError,
                 r"missing: not a directory", id="detect-missing-path"),
    pytest.param(lambda c: ftjax.load(os.path.join(c.base["hf"], "config.json")),
                 ftjax.CheckpointError, r"config\.json: not a directory", id="detect-file"),
    # 2. safetensors headers, validated as the safetensors library does.
    pytest.param(lambda c: st_case(c, two([0, 8], [4, 12]), bytes(12)), ftjax.CheckpointError,
                 r"params\.safetensors: tensor 'b' data_offsets \[4, 12\] overlaps",
                 id="st-overlap"),
    pytest.param(lambda c: st_case(c, two([0, 8], [0, 8]), bytes(8)), ftjax.CheckpointError,
                 r"params\.safetensors: tensor '(a|b)' data_offsets \[0, 8\] overlaps",
                 id="st-shared-bytes"),
    pytest.param(lambda c: st_case(c, {"a": F4}, bytes(8), header_len=2**62),
                 ftjax.CheckpointError, r"params\.safetensors: .*header length 4611686018427387904",
                 id="st-huge-header-length"),
    pytest.param(lambda c: st_case(c, [1, 2], bytes(8)), ftjax.CheckpointError,
                 r"params\.safetensors: .*the header is a list", id="st-header-list"),
    pytest.param(lambda c: st_case(c, {"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' lacks \['dtype'\]", id="st-no-dtype"),
    pytest.param(lambda c: st_case(c, {"a": dict(F4, data_offsets=[8, 0])}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' has reversed data_offsets \[8, 0\]",
                 id="st-reversed-offsets"),
    pytest.param(lambda c: st_case(c, {"a": dict(F4, data_offsets=[-8, 0])}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' has data_offsets \[-8, 0\], not",
                 id="st-negative-offsets"),
    pytest.param(lambda c: st_case(c, {"a": dict(F4, dtype="F8_E9")}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' has unsupported dtype 'F8_E9'",
                 id="st-bad-dtype"),
    pytest.param(lambda c: st_case(c, {"a": dict(F4, shape=[3])}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' .* span 8 bytes but shape \(3,\)",
                 id="st-size-mismatch"),
    pytest.param(lambda c: st_case(c, {"a": dict(F4, shape=[-2])}, bytes(8)),
                 ftjax.CheckpointError, r"tensor 'a' has shape \[-2\]", id="st-negative-shape"),
    pytest.param(lambda c: st_case(c, two([0, 8], [12, 20]), bytes(20)), ftjax.CheckpointError,
                 r"tensor 'b' .* leaves a gap", id="st-gap"),
    pytest.param(lambda c: st_case(c, {"a": F4}, bytes(12)), ftjax.CheckpointError,
                 r"params\.safetensors: .*trailing data", id="st-trailing"),
    pytest.param(lambda c: st_case(c, {"a": F4}, bytes(4)), ftjax.CheckpointError,
                 r"tensor 'a' runs past the end of the file", id="st-truncated"),
    pytest.param(lambda c: st_case(c, b"\xff\xfe{", bytes(8)), ftjax.CheckpointError,
                 r"params\.safetensors: not a readable safetensors file", id="st-not-utf8"),
    pytest.param(lambda c: st_case(c, {"__metadata__": {"a": 1}, "a": F4}, bytes(8)),
                 ftjax.CheckpointError, r"__metadata__ must map strings to strings",
                 id="st-metadata"),
    pytest.param(lambda c: st_case(c, b"", header_len=0), ftjax.CheckpointError,
                 r"not a readable safetensors file", id="st-empty-header"),
    pytest.param(lambda c: shard_index(c, {"weight_map": {"w": "../other/model.safetensors"}}),
                 ftjax.CheckpointError, r"model\.safetensors\.index\.json: weight_map names shard "
                 r"'\.\./other/model\.safetensors', which is not a file name inside",
                 id="index-path-traversal"),
    pytest.param(lambda c: shard_index(c, {"weight_map": ["model.safetensors"]}),
                 ftjax.CheckpointError, r"index\.json: weight_map is a list", id="index-list"),
    # Non-finite weights and broken orbax data.
    pytest.param(nan_weights, ftjax.CheckpointError,
                 r"tensor 'layers/mlp/wi/kernel' holds 1 non-finite", id="finite-load"),
    pytest.param(convert_nan, CliFailed,
                 r"exit 1: .*tensor 'layers/attn/o/kernel' holds 1 non-finite",
                 id="finite-convert"),
    pytest.param(orbax_missing_data, ftjax.CheckpointError,
                 r"params: (cannot restore|not a readable orbax).{0,500}$",
                 id="orbax-missing-data"),
    pytest.param(orbax_truncated, ftjax.CheckpointError,
                 r"params: (cannot restore|not a readable orbax).{0,500}$", id="orbax-truncated"),
    # Config values.
    pytest.param(lambda c: hf_config(c, layer_norm_epsilon=-1e-5), ftjax.CheckpointError,
                 r"hf.*ModelConfig\.norm_eps must be a finite number > 0, got -1e-05",
                 id="cfg-negative-eps"),
    pytest.param(lambda c: hf_config(c, layer_norm_epsilon=0), ftjax.CheckpointError,
                 r"norm_eps must be a finite number > 0, got 0", id="cfg-zero-eps"),
    pytest.param(lambda c: hf_config(c, eos_token_id=99999), ftjax.CheckpointError,
                 r"eos_token_id must be a token id in \[0, vocab_size=97\), got 99999",
                 id="cfg-eos-outside-vocab"),
    pytest.param(lambda c: hf_config(c, bos_token_id=97), ftjax.CheckpointError,
                 r"bos_token_id must be a token id in \[0, vocab_size=97\)", id="cfg-bos-vocab"),
    pytest.param(lambda c: hf_config(c, eos_token_id=-1), ftjax.CheckpointError,
                 r"config\.json key 'eos_token_id' = -1 is not a token id", id="cfg-eos-negative"),
    pytest.param(lambda c: hf_config(c, tie_word_embeddings="false"), ftjax.CheckpointError,
                 r"tied_embeddings must be a bool, got 'false'", id="cfg-tie-string"),
    pytest.param(lambda c: hf_config(c, n_head=0), ftjax.CheckpointError,
                 r"config\.json key 'n_head' must be a positive int, got 0", id="cfg-zero-heads"),
    pytest.param(lambda c: hf_config(c, vocab_size="big"), ftjax.CheckpointError,
                 r"config\.json key 'vocab_size' must be a positive int, got 'big'",
                 id="cfg-vocab-string"),
    pytest.param(lambda c: hf_config(c, model_type="mamba"), ftjax.CheckpointError,
                 r"model_type 'mamba' is not supported", id="cfg-model-type"),
    pytest.param(lambda c: json_file(c, "hf", "config.json", [1, 2]), ftjax.CheckpointError,
                 r"config\.json: a JSON list, not an object", id="cfg-json-list"),
    pytest.param(lambda c: json_file(c, "native", "ftjax_config.json", "x"),
                 ftjax.CheckpointError, r"ftjax_config\.json: a JSON str, not an object",
                 id="cfg-native-json-str"),
    pytest.param(lambda c: native_config(c, norm_eps=float("nan")), ftjax.CheckpointError,
                 r"ftjax_config\.json: bad 'config' entry .*norm_eps must be a finite number",
                 id="cfg-native-nan-eps"),
    pytest.param(lambda c: native_config(c, rope_theta=-1.0), ftjax.CheckpointError,
                 r"ftjax_config\.json: .*rope_theta must be a finite number > 0",
                 id="cfg-native-rope-theta"),
    pytest.param(lambda c: ft_config(c, "head_num = 4", "head_num = 0"), ftjax.CheckpointError,
                 r"config\.ini: \[gpt\] head_num = 0 is out of range \(must be >= 1\)",
                 id="cfg-ft-head-num"),
    pytest.param(lambda c: ft_config(c, "layernorm_eps = 1e-05", "layernorm_eps = tiny"),
                 ftjax.CheckpointError, r"config\.ini: \[gpt\] layernorm_eps = 'tiny' is not a "
                 "number", id="cfg-ft-eps"),
    pytest.param(lambda c: ft_config(c, "end_id = 0", "end_id = 500"), ftjax.CheckpointError,
                 r"ft: the checkpoint's config .*eos_token_id must be a token id in "
                 r"\[0, vocab_size=97\)",
                 id="cfg-ft-end-id"),
    # 3. Prompts.
    pytest.param(lambda c: gen(c, b"\x01\x02"), ValueError,
                 r"prompts must be a list of strings or a list of token-id lists",
                 id="prompt-bytes"),
    pytest.param(lambda c: gen(c, [b"\x01\x02"]), ValueError,
                 r"prompts\[0\] must be a string or a list of token ids, got bytes",
                 id="prompt-bytes-item"),
    pytest.param(lambda c: gen(c, [[1.9, 2.7]]), ValueError,
                 r"prompts\[0\]\[0\] = 1\.9 is a float, not an int", id="prompt-floats"),
    pytest.param(lambda c: gen(c, [[1, "2"]]), ValueError,
                 r"prompts\[0\]\[1\] = '2' is a str, not an int", id="prompt-str-id"),
    pytest.param(lambda c: gen(c, [[True, 2]]), ValueError,
                 r"prompts\[0\]\[0\] = True is a bool", id="prompt-bool-id"),
    pytest.param(lambda c: gen(c, [46, 32]), ValueError,
                 r"prompts\[0\] = 46 is a single token id", id="prompt-flat-ids"),
    pytest.param(lambda c: gen(c, [[1, None]]), ValueError,
                 r"prompts\[0\]\[1\] = None is a NoneType", id="prompt-none-id"),
    pytest.param(lambda c: gen(c, [[1], []]), ValueError, r"prompts\[1\] is empty",
                 id="prompt-empty"),
    pytest.param(lambda c: gen(c, []), ValueError, r"prompts is empty", id="prompts-empty"),
    pytest.param(lambda c: gen(c, [[5, 97]]), ValueError,
                 r"prompts\[0\] has token ids \[97\] outside the vocabulary \[0, 97\)",
                 id="prompt-id-vocab"),
    pytest.param(lambda c: gen(c, [[1] * 64]), ValueError,
                 r"prompts\[0\] has 64 tokens; the limit is 63", id="prompt-too-long"),
    pytest.param(lambda c: gen(c, ["text"]), ValueError,
                 r"prompts\[0\] is a string but this model has no tokenizer", id="prompt-text"),
    pytest.param(lambda c: gen(c, [[1]], max_new_tokens=-1), ValueError,
                 r"max_new_tokens must be an int >= 0, got -1", id="max-new-negative"),
    pytest.param(lambda c: gen(c, [[1]], max_new_tokens=2.5), ValueError,
                 r"max_new_tokens must be an int >= 0, got 2\.5", id="max-new-float"),
    pytest.param(lambda c: gen(c, [[1]], sampling=SP(n=10**9, temperature=1.0)), ValueError,
                 r"this call \(1073741824 rows x 64 positions\) needs about [\d.]+ GiB .* "
                 r"available", id="memory-estimate"),
    pytest.param(lambda c: gen(c, [[1], [2]], sampling=[SP(), None]), ValueError,
                 r"sampling\[1\] is a NoneType, not a SamplingParams", id="sampling-none-item"),
    pytest.param(lambda c: gen(c, [[1], [2]], sampling=[SP()]), ValueError,
                 r"a list of 2 of them \(one per prompt\), got 1 items", id="sampling-count"),
    pytest.param(lambda c: gen(c, [[1]], soft_prompts=[np.zeros((2, 5))]), ValueError,
                 r"soft_prompts\[0\] must be \[P, 32\]", id="soft-prompt-shape"),
    pytest.param(lambda c: gen(c, [[1]], soft_prompts=[np.full((2, 32), np.nan)]), ValueError,
                 r"soft_prompts\[0\] has non-finite values", id="soft-prompt-nan"),
    pytest.param(lambda c: list(c.model.stream([[1]], sampling=SP(num_beams=2))), ValueError,
                 r"stream does not support num_beams > 1", id="stream-beams"),
    pytest.param(lambda c: list(c.model.stream([[1.5]])), ValueError,
                 r"prompts\[0\]\[0\] = 1\.5 is a float", id="stream-float-id"),
    pytest.param(lambda c: c.model.session(max_len=1), ValueError,
                 r"session max_len must be an int in \[2, 64\] \(the model's max_positions\)",
                 id="session-len"),
    pytest.param(lambda c: c.model.session(max_len=8).append([1] * 8), ValueError,
                 r"max_len=8", id="session-overflow"),
    pytest.param(lambda c: c.model.forward([[1.5, 2.0]]), ValueError,
                 r"input_ids must be an int array", id="forward-floats"),
    pytest.param(lambda c: c.model.forward([1, 2]), ValueError,
                 r"input_ids must be an int array \[batch, length\], got shape \(2,\)",
                 id="forward-1d"),
    # SamplingParams fields.
    pytest.param(sp(num_beams=2, length_penalty=float("nan")), ValueError,
                 r"SamplingParams\.length_penalty must be a finite number, got nan",
                 id="sp-length-penalty-nan"),
    pytest.param(sp(num_beams=2, length_penalty=float("-inf")), ValueError,
                 r"SamplingParams\.length_penalty must be a finite number, got -inf",
                 id="sp-length-penalty-inf"),
    pytest.param(sp(temperature=float("inf")), ValueError,
                 r"SamplingParams\.temperature must be a finite number", id="sp-temperature-inf"),
    pytest.param(sp(repetition_penalty=float("inf")), ValueError,
                 r"SamplingParams\.repetition_penalty must be a finite", id="sp-rep-inf"),
    pytest.param(sp(top_p=float("nan")), ValueError, r"SamplingParams\.top_p must be a finite",
                 id="sp-top-p-nan"),
    pytest.param(sp(top_p=0), ValueError, r"SamplingParams\.top_p must be in \(0, 1\]",
                 id="sp-top-p-zero"),
    pytest.param(sp(top_k=-1), ValueError, r"SamplingParams\.top_k must be an int >= 0",
                 id="sp-top-k"),
    pytest.param(sp(presence_penalty=3), ValueError,
                 r"SamplingParams\.presence_penalty must be in \[-2, 2\]", id="sp-presence"),
    pytest.param(sp(stop_token_ids=[-1]), ValueError,
                 r"SamplingParams\.stop_token_ids must be non-negative ints", id="sp-stop-ids"),
    pytest.param(sp(seed=2**40), ValueError,
                 r"SamplingParams\.seed must be an int in \[0, 2\*\*32\)",
                 id="sp-seed"),
    pytest.param(sp(logprobs=50), ValueError, r"SamplingParams\.logprobs must be <= 20",
                 id="sp-logprobs"),
    pytest.param(sp(num_beams=2, n=3), ValueError, r"SamplingParams\.n .* <= num_beams \(2\)",
                 id="sp-n-beams"),
    pytest.param(sp(early_stopping="sometimes"), ValueError,
                 r"SamplingParams\.early_stopping must be True, False or \"never\"",
                 id="sp-early-stopping"),
    pytest.param(sp(min_new_tokens=5, max_new_tokens=2), ValueError,
                 r"SamplingParams\.min_new_tokens must be <= max_new_tokens \(2\)",
                 id="sp-min-max"),
    pytest.param(sp(stop_strings="stop"), ValueError,
                 r"SamplingParams\.stop_strings must be a list of non-empty strings",
                 id="sp-stop-strings"),
    # load() arguments and meshes.
    pytest.param(lambda c: ftjax.load(c.base["hf"], dtype="fp16"), ValueError,
                 r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'fp16'",
                 id="load-dtype"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], quant="int4"), ValueError,
                 r"quant must be one of \[None, 'int8', 'int8-g128', 'w8a8'\], got 'int4'",
                 id="load-quant"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], kv_cache_dtype="fp8"), ValueError,
                 r"kv_cache_dtype must be one of \[None, 'int8'\], got 'fp8'", id="load-kv-dtype"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], kernels="cuda"), ValueError,
                 r"kernels must be one of .*got 'cuda'", id="load-kernels"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], megatron_args={"num_layers": 2}), ValueError,
                 r"megatron_args given but this is not a Megatron-LM", id="load-megatron-args"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], quant="w8a8"), ValueError,
                 r"quant='w8a8' needs calibration", id="load-w8a8-calibration"),
    pytest.param(lambda c: ftjax.make_mesh(tensor=64), ValueError,
                 r"make_mesh: data\*pipe\*tensor = 1\*1\*64 = 64 devices, but only \d+ are "
                 "available", id="mesh-too-big"),
    pytest.param(lambda c: ftjax.load(c.base["hf"], mesh=ftjax.make_mesh(tensor=3)), ValueError,
                 r"tensor parallel size 3 does not divide n_heads \(4\)",
                 id="mesh-heads-indivisible"),
    # Command lines.
    pytest.param(lambda c: cli("eval", "--text", text_file(c, "")),
                 CliFailed, r"exit 1: .*text\.txt: 0 token\(s\); perplexity needs at least 2",
                 id="cli-eval-empty"),
    pytest.param(lambda c: cli("eval", "--model", c.base["native"], "--text", text_file(c, "x")),
                 CliFailed, r"exit 1: .*has no tokenizer", id="cli-eval-no-tokenizer"),
    pytest.param(lambda c: cli("eval", "--text", text_file(c, "x")), CliFailed,
                 r"exit 1: .*text\.txt: 1 token\(s\); perplexity needs at least 2",
                 id="cli-eval-one-char"),
    pytest.param(lambda c: cli("eval", "--text", text_file(c, "x y z"), "--max-tokens", "0"),
                 CliFailed, r"exit 2: .*--max-tokens: must be >= 2, got 0",
                 id="cli-eval-max-tokens"),
    pytest.param(lambda c: cli("eval", "--text", os.path.join(c.root, "nope.txt")), CliFailed,
                 r"exit 1: .*--text .*nope\.txt: no such file", id="cli-eval-missing"),
    pytest.param(lambda c: cli("eval", "--text", c.root), CliFailed,
                 r"exit 1: .*--text .*: is a directory", id="cli-eval-dir"),
    pytest.param(lambda c: cli("eval", "--text", text_file(c, b"\xff\xfe\x00", "wb")), CliFailed,
                 r"exit 1: .*--text .*text\.txt: not UTF-8 text", id="cli-eval-binary"),
    pytest.param(lambda c: cli("convert", c.base["hf"], c.base["hf"], "--force"), CliFailed,
                 r"exit 2: .*DST .* is SRC itself", id="cli-convert-same"),
    pytest.param(lambda c: cli("convert", os.path.join(c.base["hf"], "config.json"),
                               os.path.join(c.new_dir(), "o")), CliFailed,
                 r"exit 1: .*config\.json: a file, not a checkpoint directory",
                 id="cli-convert-src-file"),
    pytest.param(lambda c: cli("convert", c.base["hf"], text_file(c, "x")), CliFailed,
                 r"exit 2: .*DST .*text\.txt exists and is not a directory",
                 id="cli-convert-dst-file"),
    pytest.param(lambda c: cli("convert", c.base["hf"], c.base["native"]), CliFailed,
                 r"exit 2: .*native exists and is not empty \(use --force",
                 id="cli-convert-dst-full"),
    pytest.param(lambda c: cli("convert", c.base["hf"], os.path.join(c.new_dir(), "o"), "--tp",
                               "0"), CliFailed, r"exit 2: .*--tp: must be >= 1, got 0",
                 id="cli-convert-tp"),
    pytest.param(lambda c: cli("bench", "--preset", "gpt2-124m", "--dtype", "fp16"), CliFailed,
                 r"exit 2: .*--dtype: invalid choice: 'fp16'", id="cli-bench-dtype"),
    pytest.param(lambda c: cli("bench", "--output-len", "0"), CliFailed,
                 r"exit 2: .*--output-len: must be >= 1, got 0", id="cli-bench-output-len"),
    pytest.param(lambda c: cli("bench", "--repeats", "0"), CliFailed,
                 r"exit 2: .*--repeats: must be >= 1, got 0", id="cli-bench-repeats"),
    pytest.param(lambda c: cli("bench", "--batch", "0,8"), CliFailed,
                 r"exit 2: .*--batch: expected comma-separated ints >= 1", id="cli-bench-batch"),
    pytest.param(lambda c: cli("bench", "--preset", "gpt9"), CliFailed,
                 r"exit 1: .*unknown preset 'gpt9'", id="cli-bench-preset"),
    pytest.param(lambda c: cli("plan", "--preset", "gpt3-175b", "--max-len", "-1"), CliFailed,
                 r"exit 2: .*--max-len: must be >= 1, got -1", id="cli-plan-max-len"),
    pytest.param(lambda c: cli("plan", "--preset", "gpt3-175b", "--batch", "0"), CliFailed,
                 r"exit 2: .*--batch: must be >= 1, got 0", id="cli-plan-batch"),
    pytest.param(lambda c: cli("plan", "--preset", "gpt3-175b", "--pp", "5", "--no-compile"),
                 CliFailed, r"exit 1: .*pipe size 5 does not divide n_layers \(96\); allowed pipe sizes",
                 id="cli-plan-pp"),
    pytest.param(lambda c: cli("generate", "x", "--temperature", "nan"), CliFailed,
                 r"exit 2: .*--temperature: must be a finite number", id="cli-generate-nan"),
    pytest.param(lambda c: cli("generate", "x", "--max-new-tokens", "-1"), CliFailed,
                 r"exit 2: .*--max-new-tokens: must be >= 0, got -1", id="cli-generate-max-new"),
    pytest.param(lambda c: cli("generate", "x", "--top-p", "2"), CliFailed,
                 r"exit 1: .*top_p must be in \(0, 1\]", id="cli-generate-top-p"),
    pytest.param(lambda c: cli("generate", "x", "--model", c.base["native"]), CliFailed,
                 r"exit 2: .*native has no tokenizer", id="cli-generate-no-tokenizer"),
]


@pytest.mark.parametrize("case, exc, match", CASES)
def test_bad_input_is_a_named_error(ctx, case, exc, match):
    with pytest.raises(exc, match=match) as info:
        case(ctx)
    assert type(info.value) is exc or exc is ValueError and isinstance(info.value, ValueError)
    assert len(str(info.value)) < 2000  # a message, not a dump
    assert not os.path.exists(ctx.marker()), "a crafted pickle ran code"


def test_catalogue_size():
    assert len(CASES) >= 60


# The safetensors library refuses every header the catalogue's reader refuses, and both
# read a well-formed file alike: ftjax's checks are the library's, not looser.
BAD_HEADERS = {
    "overlap": (two([0, 8], [4, 12]), bytes(12), None),
    "shared-bytes": (two([0, 8], [0, 8]), bytes(8), None),
    "huge-length": ({"a": F4}, bytes(8), 2**62),
    "list": ([1, 2], bytes(8), None),
    "no-dtype": ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), None),
    "reversed": ({"a": dict(F4, data_offsets=[8, 0])}, bytes(8), None),
    "negative": ({"a": dict(F4, data_offsets=[-8, 0])}, bytes(8), None),
    "dtype": ({"a": dict(F4, dtype="F8_E9")}, bytes(8), None),
    "size": ({"a": dict(F4, shape=[3])}, bytes(8), None),
    "gap": (two([0, 8], [12, 20]), bytes(20), None),
    "trailing": ({"a": F4}, bytes(12), None),
    "truncated": ({"a": F4}, bytes(4), None),
    "metadata": ({"__metadata__": {"a": 1}, "a": F4}, bytes(8), None),
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_safetensors_library_refuses_the_same_files(tmp_path, name):
    safetensors = pytest.importorskip("safetensors")
    from converters.tensors import read_safetensors

    header, data, header_len = BAD_HEADERS[name]
    path = str(tmp_path / "x.safetensors")
    raw_safetensors(path, header, data, header_len)
    with pytest.raises(ftjax.CheckpointError, match="x.safetensors"):
        read_safetensors(path)
    with pytest.raises(Exception):  # noqa: B017 (the library's SafetensorError or ValueError)
        with safetensors.safe_open(path, framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_safetensors_reader_agrees_with_the_library_on_a_good_file(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from converters.tensors import read_safetensors

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b": np.arange(5, dtype=np.int64), "c": np.zeros((0, 2), np.float16)}
    path = str(tmp_path / "good.safetensors")
    write_safetensors(path, tensors, metadata={"format": "np"})
    ours = read_safetensors(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(ours) == sorted(theirs) == sorted(tensors)
    for k in tensors:
        np.testing.assert_array_equal(ours[k], theirs[k])
        np.testing.assert_array_equal(ours[k], tensors[k])


def test_budget_is_clipped_to_the_model_positions(ctx):
    """max_new_tokens far past the positions gives what the positions allow (finish
    "length"), with buffers sized by the positions, not by the request."""
    model = ctx.model
    prompt = [[3, 1, 4, 1, 5]]
    room = model.config.max_positions - len(prompt[0])
    huge = model.generate(prompt, max_new_tokens=10**9)
    exact = model.generate(prompt, max_new_tokens=room)
    assert huge.tokens == exact.tokens and len(huge.tokens[0]) == room
    assert huge.finish_reasons == ["length"]


def test_restricted_unpickler_reads_plain_data_and_inert_stand_ins():
    """What Megatron / NeMo pickle besides tensors loads; their classes become stand-ins
    that only hold their arguments and state (nothing imported, nothing called)."""
    import argparse
    import collections
    import pickle
    import sys

    from converters.safe_pickle import StandIn, loads

    data = {"od": collections.OrderedDict(a=1), "ns": argparse.Namespace(lr=0.1, layers=2),
            "arr": np.arange(6, dtype=np.float16).reshape(2, 3), "set": {1, 2},
            "scalar": np.float32(1.5), "dtype": np.dtype("int8"), "bytes": bytearray(b"ab")}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        out = loads(pickle.dumps(data, protocol=protocol))
        assert out["od"] == data["od"] and vars(out["ns"]) == vars(data["ns"])
        np.testing.assert_array_equal(out["arr"], data["arr"])
        assert out["set"] == {1, 2} and out["scalar"] == np.float32(1.5)
        assert out["dtype"] == np.dtype("int8") and out["bytes"] == bytearray(b"ab")
    # An enum value and a plain object of Megatron's (protocol 0: GLOBAL, REDUCE, BUILD).
    enum = loads(b"cmegatron.core.enums\nModelType\n(I1\ntR.")
    assert isinstance(enum, StandIn) and enum.args == (1,)
    obj = loads(b"cnemo.core.config\nCfg\n)R(dS'hidden'\nI64\nsb.")
    assert isinstance(obj, StandIn) and obj.state == {"hidden": 64}
    assert "megatron" not in sys.modules and "nemo" not in sys.modules
