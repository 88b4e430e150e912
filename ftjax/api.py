"""The public entry points: `ftjax.load` and the `Model` it returns."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import buckets
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


def load(path: str, dtype: str = "float32", quant: Optional[str] = None,
         calibration: Optional[Prompts] = None, smoothquant_alpha: float = 0.5,
         w8a8_activations: str = "per_token", kv_cache_dtype: Optional[str] = None
         ) -> "Model":
    """Loads a checkpoint directory, optionally quantizing it.

    Args:
      path: a HuggingFace directory (config.json + model.safetensors or
        pytorch_model.bin, optionally sharded) or a directory written by `ftjax convert`
        (which may hold int8 weights already: they load as they are).
      dtype: "float32", "bfloat16" or "float16": the dtype of float weights and activations.
      quant: None, "int8" (weight-only, per output channel), "int8-g128" (weight-only,
        per group of 128 input rows) or "w8a8" (SmoothQuant). Block matmul kernels are
        quantized; embedding tables become int8 per row; norms and biases stay float.
      calibration: for "w8a8": texts (needs a tokenizer) or token-id lists.
      smoothquant_alpha: SmoothQuant's migration strength a in [0, 1].
      w8a8_activations: "per_token" (dynamic scales) or "per_tensor" (static, calibrated).
      kv_cache_dtype: None (the model dtype) or "int8" (per token and kv head scales).
    Raises:
      CheckpointError: the directory is unreadable or in an unsupported layout.
      ValueError: an unknown dtype, quant mode or kv_cache_dtype, or w8a8 without calibration.
    """
    from converters import load_checkpoint
    from ftjax import quant as q

    jdtype = _dtype(dtype)
    q.check_mode(quant)
    _check_kv_dtype(kv_cache_dtype)
    if quant == "w8a8" and not calibration:
        raise ValueError("quant='w8a8' needs calibration: texts or token-id lists")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    cfg, params_np = load_checkpoint(path)
    params = jax.tree_util.tree_map(
        lambda x: jax.tree_util.tree_map(jnp.asarray, x) if q.is_quantized(x)
        else jnp.asarray(x, dtype=jdtype), params_np, is_leaf=q.is_leaf)
    tokenizer = _load_tokenizer(path)
    if quant is not None:
        stored = q.mode_of(params)
        if stored is not None:
            raise ValueError(f"{path} already holds {stored} weights; load it with quant=None")
        if quant == "w8a8":
            from ftjax.smoothquant import quantize_w8a8

            seqs = _calibration_ids(calibration, tokenizer, cfg)
            params = quantize_w8a8(cfg, params, seqs, smoothquant_alpha, w8a8_activations,
                                   jdtype)
        else:
            params = q.quantize_params(params, 128 if quant == "int8-g128" else 0)
    return Model(cfg, params, dtype, tokenizer=tokenizer, path=path,
                 kv_cache_dtype=kv_cache_dtype)


KV_CACHE_DTYPES = (None, "int8")


def _check_kv_dtype(kv_cache_dtype):
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, "
                         f"got {kv_cache_dtype!r}")


def _calibration_ids(calibration, tokenizer, cfg: ModelConfig) -> List[List[int]]:
    if isinstance(calibration, (str, bytes)):
        calibration = [calibration]
    out = []
    for i, item in enumerate(calibration):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"calibration[{i}] is text but the model has no tokenizer; "
                                 "pass token ids")
            from ftjax.evaluate import encode_long

            item = encode_long(tokenizer, item)
        ids = [int(t) for t in item]
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise ValueError(f"calibration[{i}] has token ids outside [0, {cfg.vocab_size})")
        # Long texts become consecutive windows of the model's max_positions.
        out += [ids[j:j + cfg.max_positions] for j in range(0, len(ids), cfg.max_positions)]
    return [s for s in out if s]


class Model:
    """A loaded model: teacher-forced `forward`, batched `generate`, token `stream`."""

    def __init__(self, config: ModelConfig, params, dtype: str = "float32", tokenizer=None,
                 path: Optional[str] = None, kv_cache_dtype: Optional[str] = None):
        from ftjax.quant import mode_of, param_bytes

        _check_kv_dtype(kv_cache_dtype)
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.path = path
        self.kv_cache_dtype = kv_cache_dtype
        self.quant = mode_of(params)
        self.param_bytes = param_bytes(params)
        # On CPU the layers run as a Python loop over per-layer weights (see
        # `Transformer.scan_layers`); elsewhere one scan over the stacked weights.
        scan = jax.default_backend() != "cpu"
        self.engine = Engine(config, _dtype(dtype), scan_layers=scan, kv_dtype=kv_cache_dtype)
        self._run_params = params if scan else unstack_layers(params, config.n_layers)

    @property
    def params(self):
        """The canonical params pytree (layers stacked). On CPU the model holds per-layer
        weights, so this builds a stacked copy on each access: read it once, not per call."""
        if self.engine.model.scan_layers:
            return self._run_params
        return stack_layers(self._run_params, self.config.n_layers)

    def __repr__(self):
        c = self.config
        extra = "".join(f", {k}={v}" for k, v in (("quant", self.quant),
                                                   ("kv_cache_dtype", self.kv_cache_dtype)) if v)
        return (f"ftjax.Model({self.path or 'in-memory'}, {c.n_params / 1e6:.1f}M params, "
                f"{c.n_layers} layers, d_model={c.d_model}, dtype={self.dtype}{extra})")

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
        """Logits of every position: int `[B, T]` -> float32 `[B, T, V]`."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be an int array [batch, length], got "
                             f"shape {ids.shape} dtype {ids.dtype}")
        for i, row in enumerate(ids):
            self._check_ids(row, f"input_ids[{i}]", self.config.max_positions)
        return self.engine.forward(self._run_params, jnp.asarray(ids, jnp.int32))

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
        tokens = np.zeros((plan.batch, plan.prompt_len), np.int32)
        lengths = np.ones((plan.batch,), np.int32)
        for i, p in enumerate(ids):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        sp = SamplingArrays.build(sampling, plan.batch, self.config.vocab_size,
                                  self.config.eos_token_ids, [max_new_tokens] * n)
        greedy_only = all(s.greedy for s in sampling)
        state = self.engine.prefill(self._run_params, jnp.asarray(tokens), jnp.asarray(lengths), sp,
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
        tokens, log_probs, n_gen, finish = jax.device_get(
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
            tokens, n_gen, finish = jax.device_get((state.tokens, state.n_gen, state.finish))
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
