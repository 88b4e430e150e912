"""Megatron-LM GPT checkpoints -> (ModelConfig, canonical params).

Layout: `DIR/latest_checkpointed_iteration.txt` ("release" or an iteration) naming
`DIR/release/` or `DIR/iter_NNNNNNN/`, which holds `mp_rank_XX/` (tensor parallel)
or `mp_rank_XX_YYY/` (tensor x pipeline parallel) directories, each with
`model_optim_rng.pt`. DIR may also be the release/iter directory itself.

Each `.pt` holds `model` (the weights; legacy `language_model.{embedding,
transformer|encoder,output_layer}` nesting or megatron-core flat keys), `args`
(Megatron's argparse Namespace) and `checkpoint_version` (absent means 0). The
model's shape comes from `args`; when a checkpoint lacks them (the old public
345M release) they come from `megatron_args` (CLI: `ftjax convert --num-layers ...`).

Vocabulary: Megatron pads the embedding to a multiple of
`make_vocab_size_divisible_by * tp` rows. The padded rows are dropped so they can
never be sampled: the true vocabulary size is that of `DIR/vocab.json` (the GPT-2
BPE tokenizer; with `merges.txt` it becomes the model's tokenizer) or
`megatron_args["vocab_size"]`; without either, loading is refused.

`build` turns the ranks' weights and args into the model; NeMo (`converters.nemo`)
maps its yaml onto the args and uses it too.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from converters import megatron_layout, safe_pickle
from converters.rules import supported
from converters.tensors import torch_to_numpy
from ftjax.config import ModelConfig
from ftjax.errors import CheckpointError

LATEST = "latest_checkpointed_iteration.txt"
WEIGHTS = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
# Args without which the model's shape is unknown, and their CLI flags.
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


def torch_load(path, where: str | None = None) -> dict:
    """Loads a torch `.pt`/`.ckpt` (a path, or a file object named `where` in messages)
    through the restricted unpickler: Megatron's own classes inside `args` become inert
    stand-ins and any other global is refused (see `converters.safe_pickle`)."""
    return safe_pickle.torch_load(path, where)


def to_numpy(state, path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Flattens nested dicts of torch tensors to {"a.b.c": numpy array}."""
    import torch

    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(to_numpy(value, path, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = torch_to_numpy(value)
        elif value is not None and not name.endswith("_extra_state"):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, "
                                  "not a tensor")
    return out


def is_megatron(directory: str) -> bool:
    if not os.path.isdir(directory):
        return False
    if os.path.exists(os.path.join(directory, LATEST)):
        return True
    return any(_RANK_DIR.fullmatch(n) for n in os.listdir(directory))


def _checkpoint_dir(directory: str) -> str:
    latest = os.path.join(directory, LATEST)
    if not os.path.exists(latest):
        return directory
    with open(latest) as f:
        text = f.read().strip()
    if text == "release":
        sub = "release"
    elif text.isdigit():
        sub = f"iter_{int(text):07d}"
    else:
        raise CheckpointError(f"{latest}: expected 'release' or an iteration number, got "
                              f"{text[:40]!r}")
    path = os.path.join(directory, sub)
    if not os.path.isdir(path):
        raise CheckpointError(f"{latest}: names {sub!r}, which does not exist")
    return path


def rank_grid(directory: str, pattern=_RANK_DIR, where: str | None = None):
    """{(tp, pp): subdirectory} of the rank directories, checked to be a full grid."""
    grid = {}
    for name in os.listdir(directory):
        m = pattern.fullmatch(name)
        if m:
            grid[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(directory, name)
    if not grid:
        raise CheckpointError(f"{where or directory}: no rank directories (mp_rank_XX or "
                              "mp_rank_XX_YYY) found")
    return (grid,) + grid_shape(grid, where or directory)


def grid_shape(grid: dict, where: str):
    """(tp, pp) of a {(tp_rank, pp_rank): ...} grid; every rank must be present."""
    tp = 1 + max(t for t, _ in grid)
    pp = 1 + max(p for _, p in grid)
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in grid]
    if missing:
        raise CheckpointError(f"{where}: weights for ranks (tp, pp) {missing} are missing "
                              f"from a {tp} x {pp} grid")
    return tp, pp


def _int(args: dict, key: str, where: str, default=None) -> int:
    value = args.get(key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: args.{key} must be a positive int, got {value!r}")
    return value


def _refuse(args: dict, key: str, allowed, where: str):
    return supported(args.get(key), allowed, f"args.{key}", where)


def config_from_args(args: dict, vocab: int, where: str, eos: int | None = None,
                     core_layers: bool = False) -> ModelConfig:
    """ModelConfig of Megatron `args` (a dict of its argparse fields), with `vocab` rows.

    Args:
      core_layers: the weights are megatron-core `TransformerLayer`s (`linear_qkv` keys)
        rather than Megatron-LM's legacy `ParallelTransformerLayer`.
    """
    missing = [k for k in REQUIRED if args.get(k) is None]
    if missing:
        flags = " ".join(f"--{k.replace('_', '-')} N" for k in missing)
        raise CheckpointError(
            f"{where}: the checkpoint carries no {missing} (no Megatron args saved); give "
            f"them: `ftjax convert SRC DST {flags}` or ftjax.load(SRC, megatron_args={{...}})")
    d = _int(args, "hidden_size", where)
    n = _int(args, "num_attention_heads", where)
    h = _int(args, "kv_channels", where, d // n)
    # Megatron-LM's args carry num_query_groups (default 1) even without
    # --group-query-attention; megatron-core and NeMo leave it None for MHA.
    if "group_query_attention" in args:
        gqa = bool(args["group_query_attention"])
    else:
        gqa = args.get("num_query_groups") is not None
    groups = _int(args, "num_query_groups", where) if gqa else n
    swiglu = bool(args.get("swiglu"))
    if swiglu and args.get("ffn_hidden_size") is None:
        raise CheckpointError(f"{where}: args.swiglu is set but ffn_hidden_size is absent")
    for key in ("squared_relu", "rotary_interleaved", "qk_layernorm", "use_rope_scaling"):
        _refuse(args, key, (None, False), where)
    _refuse(args, "num_experts", (None, 0, 1), where)
    _refuse(args, "rotary_seq_len_interpolation_factor", (None, 1), where)
    _refuse(args, "transformer_block_type", (None, "pre_ln"), where)
    norm = _refuse(args, "normalization", (None, "LayerNorm", "RMSNorm", "layernorm",
                                           "layernorm1p", "rmsnorm"), where) or "LayerNorm"
    pos = _refuse(args, "position_embedding_type",
                  (None, "learned_absolute", "rope"), where) or "learned_absolute"
    if args.get("use_rotary_position_embeddings"):
        pos = "rope"
    bias = args.get("add_bias_linear", args.get("bias", True))
    if args.get("add_qkv_bias") and not bias:
        raise CheckpointError(f"{where}: args.add_qkv_bias without add_bias_linear (q/k/v "
                              "biases but no output bias) is not supported")
    rotary_dim = None
    if pos == "rope":
        pct = float(args.get("rotary_percent", args.get("rotary_percentage", 1.0)) or 1.0)
        rotary_dim = None if pct == 1.0 else int(h * pct)
    # Megatron's fused bias-gelu (the default with biases) and --openai-gelu are the tanh
    # approximation; only the unfused path (no biases, or fusion off) is erf gelu.
    fused = args.get("bias_gelu_fusion", args.get("bias_activation_fusion", True)) and bias
    act = "silu" if swiglu else ("gelu_new" if args.get("openai_gelu") or fused else "gelu")
    eps = args.get("layernorm_epsilon", args.get("norm_epsilon")) or 1e-5
    # apply_residual_connection_post_layernorm (the residual is the norm's output, BERT's
    # order) is applied by Megatron-LM's legacy layer only; megatron-core's layer ignores
    # it since Sep 2023 (and applied it before), so with core layers it is ambiguous.
    # NeMo passes False to its layers whatever its yaml says (converters.nemo drops it).
    post_ln = bool(args.get("apply_residual_connection_post_layernorm"))
    if post_ln and core_layers:
        raise CheckpointError(
            f"{where}: args.apply_residual_connection_post_layernorm = True with megatron-core "
            "layers, which applied it only before Sep 2023 and ignore it since; refusing to "
            "guess the numerics")
    untied = args.get("untie_embeddings_and_output_weights")
    if untied is None and "share_embeddings_and_output_weights" in args:
        untied = not args["share_embeddings_and_output_weights"]
    try:
        return ModelConfig(
            vocab_size=vocab, d_model=d, n_layers=_int(args, "num_layers", where), n_heads=n,
            n_kv_heads=groups, head_dim=h,
            d_ff=_int(args, "ffn_hidden_size", where, 4 * d),
            max_positions=_int(args, "max_position_embeddings", where),
            norm="rmsnorm" if norm.lower() == "rmsnorm" else "layernorm", norm_eps=float(eps),
            activation=act, glu=swiglu,
            positions="rotary" if pos == "rope" else "learned", rotary_dim=rotary_dim,
            rope_theta=float(args.get("rotary_base") or 10000),
            attn_bias=bool(bias), mlp_bias=bool(bias), tied_embeddings=not untied,
            residual_from_norm=post_ln,
            bos_token_id=eos, eos_token_id=eos)
    except ValueError as e:
        raise CheckpointError(f"{where}: args describe an invalid model ({e})") from e


def gpt2_vocab(f, where: str, padded: int) -> tuple[int, int | None]:
    """(vocabulary size, eos id or None) of a GPT-2 BPE vocab.json (an open file), checked
    to fit in the `padded` embedding rows."""
    try:
        table = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(table, dict) or not table or not all(
            isinstance(v, int) for v in table.values()):
        raise CheckpointError(f"{where}: not a GPT-2 BPE vocab (a JSON object of token ids)")
    vocab = 1 + max(table.values())
    if vocab > padded:
        raise CheckpointError(f"{where}: the tokenizer has {vocab} tokens but the embedding "
                              f"only {padded} rows")
    return vocab, table.get("<|endoftext|>")


def tokenizer_vocab(directory: str, overrides: dict, padded: int, where: str):
    """(true vocab size, eos id or None): `vocab_size` override, else `DIR/vocab.json`."""
    path = os.path.join(directory, "vocab.json")
    if overrides.get("vocab_size") is not None:
        vocab = _int(overrides, "vocab_size", "megatron_args")
        if vocab > padded:
            raise CheckpointError(f"{where}: megatron_args vocab_size {vocab} but the embedding "
                                  f"only has {padded} rows")
        return vocab, None
    if not os.path.exists(path):
        raise CheckpointError(
            f"{where}: the embedding has {padded} rows, padded past the tokenizer's vocabulary; "
            f"put the tokenizer's vocab.json and merges.txt in {directory} (or pass "
            "megatron_args={'vocab_size': N}) so the padded rows can be dropped")
    with open(path, "rb") as f:
        return gpt2_vocab(f, path, padded)


def _args_of(ckpt: dict, overrides: dict, where: str) -> dict:
    args = ckpt.get("args")
    args = {} if args is None else dict(vars(args)) if not isinstance(args, dict) else args
    out = dict(args)
    for key, value in overrides.items():
        if key == "vocab_size":
            continue
        if args.get(key) is not None and args[key] != value:
            raise CheckpointError(f"{where}: megatron_args[{key!r}] = {value!r} contradicts the "
                                  f"checkpoint's args.{key} = {args[key]!r}")
        out[key] = value
    return out


def load_megatron(directory: str, megatron_args: dict | None = None):
    """Reads a Megatron-LM GPT checkpoint. Returns (ModelConfig, params of numpy arrays).

    Args:
      directory: the directory holding latest_checkpointed_iteration.txt (or the
        release / iter_NNNNNNN directory itself).
      megatron_args: Megatron argument values ("num_layers", "hidden_size",
        "num_attention_heads", "max_position_embeddings", "ffn_hidden_size", ...) for
        checkpoints saved without args, plus "vocab_size": the tokenizer's vocabulary
        size when there is no vocab.json in `directory`.
    """
    overrides = dict(megatron_args or {})
    ckpt_dir = _checkpoint_dir(directory)
    grid, tp, pp = rank_grid(ckpt_dir)
    stages, first = [], None
    for p in range(pp):
        ranks = []
        for t in range(tp):
            path = os.path.join(grid[(t, p)], WEIGHTS)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: not found")
            ckpt = torch_load(path)
            if not isinstance(ckpt, dict) or "model" not in ckpt:
                extra = " (virtual pipeline stages are not supported)" if "model0" in ckpt else ""
                raise CheckpointError(f"{path}: no 'model' entry{extra}")
            if first is None:
                first = ckpt
            ranks.append((path, to_numpy(ckpt["model"], path)))
        stages.append(ranks)
    where = os.path.join(grid[(0, 0)], WEIGHTS)
    args = _args_of(first, overrides, where)
    version = float(first.get("checkpoint_version") or 0)
    if version not in (0.0, 1.0, 2.0, 3.0):
        raise CheckpointError(f"{where}: checkpoint_version {version} is not supported "
                              "(supported: 0, 1.0, 2.0, 3.0)")
    return build(stages, args, version, lambda padded: tokenizer_vocab(
        directory, overrides, padded, where), where)


def build(stages: list, args: dict, version: float, vocab_of, where: str):
    """(ModelConfig, canonical params) of Megatron-layout weights (Megatron-LM and NeMo).

    Args:
      stages: `stages[pp][tp] = (file, flat state dict)`, every rank of the grid.
      args: Megatron's args (NeMo's yaml mapped onto them).
      version: the `checkpoint_version` that says the fused qkv layout.
      vocab_of: `padded rows -> (true vocabulary size, eos id or None)`; the rows past
        the vocabulary (Megatron pads the embedding) are dropped.
      where: the checkpoint, for messages.
    """
    tp, pp = len(stages[0]), len(stages)
    for key, n in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if args.get(key) not in (None, n):
            raise CheckpointError(f"{where}: args.{key} = {args[key]} but the checkpoint holds "
                                  f"{n} ranks on that axis")
    state = stages[0][0][1]
    embed = [v for k, v in state.items() if megatron_layout.role_of(k) == ("embed.weight", None)]
    if not embed:
        raise CheckpointError(f"{stages[0][0][0]}: no word embeddings tensor found")
    padded = embed[0].shape[0] * tp
    if args.get("padded_vocab_size") not in (None, padded):
        raise CheckpointError(f"{where}: args.padded_vocab_size = {args['padded_vocab_size']} "
                              f"but the embeddings hold {padded} rows")
    vocab, eos = vocab_of(padded)
    cfg = config_from_args(args, vocab, where, eos, megatron_layout.core_layers(state))
    one_p = bool(args.get("apply_layernorm_1p")) or args.get("normalization") == "layernorm1p"
    merged = megatron_layout.merge(stages, cfg, tp, version, padded, where)
    return cfg, megatron_layout.to_params(merged, cfg, vocab, where, one_p)
