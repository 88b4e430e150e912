"""NeMo Megatron GPT checkpoints (`.nemo` tar archive, or its extracted directory).

Holds `model_config.yaml` and the weights: `model_weights.ckpt`, or one per rank in
`mp_rank_XX/` (tensor parallel) or `tp_rank_XX_pp_rank_XXX/` (tensor x pipeline).
The weights are Megatron modules under `model.` (`model.module.` with O2): legacy
`model.language_model.*` or megatron-core `model.decoder.*` / `model.embedding.*`.
The yaml's fields map onto Megatron's args (`normalization: layernorm1p` adds 1 to
the stored norm gains; `activation: fast-swiglu` splits fc1 into gate and up;
`apply_residual_connection_post_layernorm` is dropped: NeMo passes False to its
layers whatever the yaml says), and the model is built as Megatron-LM's
(`converters.megatron.build`: the same rank-grid, padded-vocabulary and layout
code). The padded vocabulary rows are dropped using the GPT-2 BPE vocab file named
by `tokenizer.vocab_file` (`nemo:NAME` is an archive member), which with the
merges file becomes the model's tokenizer.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile

from converters import megatron
from converters.activations import NEMO_SWIGLU
from converters.rules import supported
from ftjax.errors import CheckpointError

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
_RANKS = re.compile(r"(?:mp_rank_(\d{2})|tp_rank_(\d{2})_pp_rank_(\d{3}))/" + WEIGHTS)
_NORMS = {"layernorm": "LayerNorm", "layernorm1p": "layernorm1p", "rmsnorm": "RMSNorm"}
_SAME = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
         "ffn_hidden_size", "kv_channels", "num_query_groups", "layernorm_epsilon",
         "position_embedding_type", "rotary_base", "openai_gelu", "bias_activation_fusion",
         "transformer_block_type", "tensor_model_parallel_size", "pipeline_model_parallel_size")


def is_nemo(path: str) -> bool:
    if os.path.isfile(path):
        return path.endswith(".nemo")
    return os.path.isfile(os.path.join(path, CONFIG))


class _Source:
    """Members of a .nemo archive or an extracted directory, by relative name."""

    def __init__(self, path: str):
        self.path = path
        self.tar = None
        if os.path.isfile(path):
            try:
                self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 (open for the reads)
                self.members = {m.name.removeprefix("./"): m
                                for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable .nemo (tar) archive ({e})") from e
        else:
            self.members = {}
            for root, _, files in os.walk(path):
                for name in files:
                    full = os.path.join(root, name)
                    self.members[os.path.relpath(full, path).replace(os.sep, "/")] = full

    def where(self, name: str) -> str:
        return f"{self.path}:{name}" if self.tar else os.path.join(self.path, name)

    def open(self, name: str):
        if name not in self.members:
            raise CheckpointError(f"{self.where(name)}: not found")
        if self.tar is None:
            return open(self.members[name], "rb")
        return self.tar.extractfile(self.members[name])


def _yaml(src: _Source) -> dict:
    import yaml

    try:
        with src.open(CONFIG) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{src.where(CONFIG)}: not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{src.where(CONFIG)}: not a mapping")
    return cfg


def _args(nemo: dict, where: str) -> dict:
    args = {k: nemo[k] for k in _SAME if nemo.get(k) is not None}
    act = supported(nemo.get("activation", "gelu"), NEMO_SWIGLU, "activation", where)
    args["swiglu"] = NEMO_SWIGLU[act]
    norm = supported(nemo.get("normalization", "layernorm"), _NORMS, "normalization", where)
    args["normalization"] = _NORMS[norm]
    if nemo.get("layernorm_zero_centered_gamma"):
        args["normalization"] = "layernorm1p"
    args["add_bias_linear"] = nemo.get("bias", True)
    args["rotary_percent"] = nemo.get("rotary_percentage", 1.0)
    # apply_residual_connection_post_layernorm is not mapped: NeMo passes False to its
    # layers whatever the yaml says (megatron-core and its own transformer alike).
    args["untie_embeddings_and_output_weights"] = not nemo.get(
        "share_embeddings_and_output_weights", True)
    for key, ok in (("headscale", (None, False)), ("normalize_attention_scores", (None, True)),
                    ("seq_len_interpolation_factor", (None,)), ("num_moe_experts", (None, 1))):
        supported(nemo.get(key), ok, key, where)
    return args


def _tokenizer_member(src: _Source, nemo: dict, key: str):
    name = (nemo.get("tokenizer") or {}).get(key)
    if not name:
        return None
    name = name[len("nemo:"):] if name.startswith("nemo:") else os.path.basename(name)
    return name if name in src.members else None


def _vocab(src: _Source, nemo: dict, padded: int, where: str):
    name = _tokenizer_member(src, nemo, "vocab_file")
    if name is None:
        raise CheckpointError(
            f"{where}: the embedding has {padded} rows, padded past the tokenizer's vocabulary, "
            "and the archive has no GPT-2 BPE vocab file (model_config.yaml tokenizer.vocab_file)"
            " to tell the true size; only GPT-2 BPE tokenizers are supported")
    with src.open(name) as f:
        return megatron.gpt2_vocab(f, src.where(name), padded)


def _state(src: _Source, name: str) -> dict:
    with src.open(name) as f:
        ckpt = megatron.torch_load(f, src.where(name))
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    flat = megatron.to_numpy(ckpt, src.where(name))
    out = {}
    for key, value in flat.items():
        for prefix in ("model.module.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def load_nemo(path: str):
    """Reads a NeMo GPT checkpoint. Returns (ModelConfig, params of numpy arrays)."""
    src = _Source(path)
    nemo = _yaml(src)
    where = src.where(CONFIG)
    if WEIGHTS in src.members:
        grid = {(0, 0): WEIGHTS}
    else:
        grid = {}
        for name in src.members:
            m = _RANKS.fullmatch(name)
            if m:
                tp_rank = int(m.group(1) or m.group(2))
                grid[(tp_rank, int(m.group(3) or 0))] = name
    if not grid:
        raise CheckpointError(f"{src.where(WEIGHTS)}: not found (nor mp_rank_XX/ or "
                              "tp_rank_XX_pp_rank_XXX/ weights)")
    tp, pp = megatron.grid_shape(grid, path)
    args = _args(nemo, where)
    stages = [[(src.where(grid[(t, p)]), _state(src, grid[(t, p)])) for t in range(tp)]
              for p in range(pp)]
    return megatron.build(stages, args, 3.0, lambda padded: _vocab(src, nemo, padded, where),
                          path)


def tokenizer_dir(path: str):
    """A new temporary directory with the checkpoint's GPT-2 BPE files as vocab.json /
    merges.txt (the names the tokenizer loaders look for), or None."""
    src = _Source(path)
    nemo = _yaml(src)
    vocab, merges = (_tokenizer_member(src, nemo, k) for k in ("vocab_file", "merge_file"))
    if vocab is None or merges is None:
        return None
    out = tempfile.mkdtemp(prefix="ftjax-nemo-tokenizer-")
    for name, dst in ((vocab, "vocab.json"), (merges, "merges.txt")):
        with src.open(name) as f, open(os.path.join(out, dst), "wb") as g:
            g.write(f.read())
    return out
