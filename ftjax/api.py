"""The public entry points: `ftjax.load` and the `Model` it returns."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import buckets, sharding
from ftjax.config import ModelConfig
from ftjax.engine import FINISH_STOP, DecodeState, Engine
from ftjax.errors import CheckpointError
from ftjax.model import stack_layers, unstack_layers
from ftjax.sampling import SamplingArrays, SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DECODE_CHUNK = 8  # decode steps per while-loop iteration
STREAM_CHUNK = 1  # decode steps between streamed events

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]


@dataclasses.dataclass
class GenerateOutput:
    """Result of `Model.generate`, one entry per prompt, in prompt order.

    Attributes:
      tokens: generated token ids (the prompt excluded; a stop token that ended
        the request is included, as HuggingFace `generate` does).
      finish_reasons: "stop" (a stop token was produced) or "length" (the
        max_new_tokens budget or the model's positions ran out).
      log_probs: log-probability of each generated token under the model's
        unmodified distribution (before temperature / top-k / top-p).
      texts: the decoded continuations when the model has a tokenizer, else None.
    """

    tokens: List[List[int]]
    finish_reasons: List[str]
    log_probs: List[List[float]]
    texts: Optional[List[str]] = None


@dataclasses.dataclass
class StreamEvent:
    """One generated token of request `index` (`text`: its decoded text, if a tokenizer exists)."""

    index: int
    token: int
    text: Optional[str] = None
    finish_reason: Optional[str] = None


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _load_tokenizer(path: str):
    names = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"{path}: tokenizer files present but unreadable ({e})") from e


def load(path: str, dtype: str = "float32", mesh: Optional[jax.sharding.Mesh] = None
         ) -> "Model":
    """Loads a checkpoint directory.

    Args:
      path: a HuggingFace directory (config.json + model.safetensors or
        pytorch_model.bin, optionally sharded) or a directory written by `ftjax convert`.
      dtype: "float32", "bfloat16" or "float16": the dtype of weights and activations.
      mesh: an optional `ftjax.make_mesh(...)` mesh: params are placed shard by shard
        (each device reads only its slice of the host arrays) and the KV cache and
        batch are sharded; `generate` / `forward` are used as without one.
    Raises:
      CheckpointError: the directory is unreadable or in an unsupported layout.
      ValueError: an unknown dtype, or a mesh the model's shapes do not fit.
    """
    from converters import load_checkpoint

    jdtype = _dtype(dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg, params_np = load_checkpoint(path)
    if mesh is None:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=jdtype), params_np)
    else:
        params = params_np  # Model places them shard by shard, straight from the host arrays
    return Model(cfg, params, dtype, tokenizer=_load_tokenizer(path), path=path, mesh=mesh)


class Model:
    """A loaded model: teacher-forced `forward`, batched `generate`, token `stream`."""

    def __init__(self, config: ModelConfig, params, dtype: str = "float32", tokenizer=None,
                 path: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None):
        """`params`: canonical (stacked) params, numpy or jax arrays. `mesh`: see `load`."""
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.path = path
        # On CPU the layers run as a Python loop over per-layer weights (see
        # `Transformer.scan_layers`); elsewhere one scan over the stacked weights.
        scan = jax.default_backend() != "cpu"
        self.layout = None
        if mesh is not None:
            if mesh.shape.get("pipe", 1) > 1:
                raise ValueError("pipeline parallelism (pipe > 1) is not implemented for running "
                                 "models; the pipe axis is used by `ftjax plan` only")
            self.layout = sharding.Layout(mesh, config)
        self.engine = Engine(config, _dtype(dtype), scan_layers=scan, layout=self.layout)
        self._run_params = params if scan else unstack_layers(params, config.n_layers)
        if self.layout is not None:
            self._run_params = self.layout.place_params(self._run_params, _dtype(dtype))

    @property
    def params(self):
        """The canonical params pytree (layers stacked). On CPU the model holds per-layer
        weights, so this builds a stacked copy on each access: read it once, not per call."""
        params = self._run_params
        if not self.engine.model.scan_layers:
            params = stack_layers(params, self.config.n_layers)
        return params if self.layout is None else self.layout.unpad_params(params)

    def __repr__(self):
        c = self.config
        return (f"ftjax.Model({self.path or 'in-memory'}, {c.n_params / 1e6:.1f}M params, "
                f"{c.n_layers} layers, d_model={c.d_model}, dtype={self.dtype})")

    # -- input checking -------------------------------------------------------

    def _check_ids(self, ids, what: str, limit: int) -> List[int]:
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{what} is empty; it needs at least one token")
        if len(ids) > limit:
            raise ValueError(f"{what} has {len(ids)} tokens; the limit is {limit} "
                             f"(model max_positions={self.config.max_positions})")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{what} has token ids {bad[:5]} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids

    def _encode(self, prompts: Prompts, limit: int) -> List[List[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; give at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompts[{i}] is a string but this model has no tokenizer; "
                                     "pass token ids")
                p = self.tokenizer.encode(p)
            out.append(self._check_ids(p, f"prompts[{i}]", limit))
        return out

    # -- teacher forcing ------------------------------------------------------

    def forward(self, input_ids) -> jax.Array:
        """Logits of every position: int `[B, T]` -> float32 `[B, T, V]`.

        With a mesh the result is a sharded jax.Array; in a multi-process run read it
        with `ftjax.sharding.fetch` (it gathers the shards other processes hold)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array [batch, length], got "
                             f"shape {ids.shape} dtype {ids.dtype}")
        for i, row in enumerate(ids):
            self._check_ids(row, f"input_ids[{i}]", self.config.max_positions)
        ids = np.asarray(ids, np.int32)
        ids = jnp.asarray(ids) if self.layout is None else self.layout.shard_batch(ids)
        return self.engine.forward(self._run_params, ids)

    # -- generation -----------------------------------------------------------

    def _start(self, prompts: Prompts, max_new_tokens: int, sampling):
        """Validates, buckets and prefills. Returns (state, sampling arrays, n, static flags)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        # A prompt must leave room for at least one generated token.
        ids = self._encode(prompts, self.config.max_positions - 1)
        n = len(ids)
        if sampling is None:
            sampling = SamplingParams()
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * n
        sampling = list(sampling)
        if len(sampling) != n or not all(isinstance(s, SamplingParams) for s in sampling):
            raise ValueError(f"sampling must be a SamplingParams or a list of {n} of them "
                             f"(one per prompt), got {len(sampling)} items")
        plan = buckets.plan(n, max(len(p) for p in ids), int(max_new_tokens),
                            self.config.max_positions, DECODE_CHUNK)
        if self.layout is not None:  # every data shard gets whole rows
            plan = dataclasses.replace(plan, batch=self.layout.batch_size(plan.batch))
        tokens = np.zeros((plan.batch, plan.prompt_len), np.int32)
        lengths = np.ones((plan.batch,), np.int32)
        for i, p in enumerate(ids):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        sp = SamplingArrays.build(sampling, plan.batch, self.config.vocab_size,
                                  self.config.eos_token_ids, [max_new_tokens] * n)
        greedy_only = all(s.greedy for s in sampling)
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        if self.layout is not None:
            tokens, lengths, sp = self.layout.shard_batch((tokens, lengths, sp))
        state = self.engine.prefill(self._run_params, tokens, lengths, sp,
                                    max_len=plan.cache_len, width=plan.width,
                                    greedy_only=greedy_only)
        return state, sp, n, greedy_only

    def generate(self, prompts: Prompts, max_new_tokens: int = 32,
                 sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None
                 ) -> GenerateOutput:
        """Generates continuations of a batch of prompts.

        Args:
          prompts: token-id lists (ragged lengths allowed) or strings (encoded
            with `self.tokenizer`).
          max_new_tokens: the most tokens to generate per prompt.
          sampling: one SamplingParams for all prompts or one per prompt; None is greedy.
        """
        state, sp, n, greedy_only = self._start(prompts, max_new_tokens, sampling)
        state = self.engine.decode(self._run_params, state, sp, greedy_only=greedy_only,
                                   chunk=DECODE_CHUNK)
        return self._collect(state, n)

    def _collect(self, state: DecodeState, n: int) -> GenerateOutput:
        tokens, log_probs, n_gen, finish = sharding.fetch(
            (state.tokens, state.log_probs, state.n_gen, state.finish))
        out_tokens = [tokens[i, :n_gen[i]].tolist() for i in range(n)]
        reasons = ["stop" if finish[i] == FINISH_STOP else "length" for i in range(n)]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t) for t in out_tokens]
        return GenerateOutput(tokens=out_tokens, finish_reasons=reasons,
                              log_probs=[log_probs[i, :n_gen[i]].tolist() for i in range(n)],
                              texts=texts)

    def stream(self, prompts: Prompts, max_new_tokens: int = 32,
               sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None
               ) -> Iterator[StreamEvent]:
        """Like `generate`, but yields each token as soon as it is produced.

        Events of one request come in order; `text` is the newly decoded text
        (held back while a multi-byte character is incomplete).
        """
        state, sp, n, greedy_only = self._start(prompts, max_new_tokens, sampling)
        seen = [0] * n
        shown = [""] * n
        while True:
            tokens, n_gen, finish = sharding.fetch((state.tokens, state.n_gen, state.finish))
            for i in range(n):
                for j in range(seen[i], int(n_gen[i])):
                    last = j + 1 == n_gen[i] and finish[i] != 0
                    text = None
                    if self.tokenizer is not None:
                        full = self.tokenizer.decode(tokens[i, :j + 1].tolist())
                        if full.endswith("\ufffd") and not last:
                            text = ""  # an incomplete multi-byte character: wait for more
                        else:
                            text, shown[i] = full[len(shown[i]):], full
                    reason = ("stop" if finish[i] == FINISH_STOP else "length") if last else None
                    yield StreamEvent(index=i, token=int(tokens[i, j]), text=text,
                                      finish_reason=reason)
                seen[i] = int(n_gen[i])
            if all(finish[:n] != 0):
                return
            state = self.engine.decode_chunk(self._run_params, state, sp, greedy_only=greedy_only,
                                             chunk=STREAM_CHUNK)
