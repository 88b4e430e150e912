"""The public entry points: `ftjax.load` and the `Model` it returns."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import buckets, sharding
from ftjax.config import ModelConfig
from ftjax import batching
from ftjax.batching import Request, Sequences
from ftjax.beam import BeamSearch
from ftjax.engine import FINISH_STOP, KERNELS, Engine
from ftjax.errors import CheckpointError
from ftjax.model import stack_layers, unstack_layers
from ftjax.sampling import SamplingParams

if TYPE_CHECKING:
    from ftjax.session import Session

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DECODE_CHUNK = 8  # decode steps per while-loop iteration
STREAM_CHUNK = 1  # decode steps between streamed events

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]


@dataclasses.dataclass
class GenerateOutput:
    """Result of `Model.generate`, one entry per prompt, in prompt order.

    A request with n > 1 samples (or beams returning n > 1 sequences) has a list
    of n values in every per-request field below instead of one value.

    Attributes:
      tokens: generated token ids (the prompt excluded; a stop token that ended
        the request is included, as HuggingFace `generate` does).
      finish_reasons: "stop" (a stop token, sequence or string) or "length" (the
        max_new_tokens budget or the model's positions ran out).
      log_probs: log-probability of each generated token under the model's
        unmodified distribution (before penalties, temperature, top-k / top-p).
      texts: the decoded continuations when the model has a tokenizer, else None.
      cum_log_probs: the sum of log_probs (FasterTransformer's cum_log_probs); for
        beam search, the beam's length-penalized score (HF's sequences_scores).
      top_logprobs: for requests with logprobs=N: per generated token a dict
        {token: log-prob} of the chosen token and the N most likely (else None).
      prompt_logprobs: for requests with prompt_logprobs=N: per prompt token a
        dict {token: log-prob} of that token and the N most likely given the
        tokens before it (None for the first token and soft-prompt rows).
    """

    tokens: List
    finish_reasons: List
    log_probs: List
    texts: Optional[List] = None
    cum_log_probs: Optional[List] = None
    top_logprobs: Optional[List] = None
    prompt_logprobs: Optional[List] = None


@dataclasses.dataclass
class StreamEvent:
    """One generated token of request `index` (sample `sample` when n > 1).

    `text` is its newly decoded text, if a tokenizer exists; `finish_reason` is
    set on a sequence's last event.
    """

    index: int
    token: int
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    sample: int = 0


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _load_tokenizer(path: str):
    from ftjax.hf_compat import load_tokenizer  # no torch import for generic fast tokenizers

    return load_tokenizer(path)


def _kernels(name: str) -> str:
    """"auto" -> "pallas" on a GPU backend, "xla" elsewhere; checks the name."""
    allowed = ("auto",) + KERNELS
    if name not in allowed:
        raise ValueError(f"kernels must be one of {allowed}, got {name!r}")
    if name == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return name


def load(path: str, dtype: str = "float32", mesh: Optional[jax.sharding.Mesh] = None,
         quant: Optional[str] = None, calibration: Optional[Prompts] = None,
         smoothquant_alpha: float = 0.5, w8a8_activations: str = "per_token",
         kv_cache_dtype: Optional[str] = None, kernels: str = "auto",
         megatron_args: Optional[dict] = None) -> "Model":
    """Loads a checkpoint, optionally quantizing it.

    Args:
      path: a HuggingFace directory (config.json + model.safetensors or
        pytorch_model.bin, optionally sharded), a directory written by `ftjax convert`
        (which may hold int8 weights already: they load as they are), a Megatron-LM
        checkpoint directory, a NeMo `.nemo` archive (or its extracted directory) or a
        FasterTransformer c-model directory (config.ini + .bin files).
      dtype: "float32", "bfloat16" or "float16": the dtype of float weights and activations.
      mesh: an optional `ftjax.make_mesh(...)` mesh: params are placed shard by shard
        (each device reads only its slice of the host arrays) and the KV cache and
        batch are sharded; `generate` / `forward` are used as without one.
      quant: None, "int8" (weight-only, per output channel), "int8-g128" (weight-only,
        per group of 128 input rows) or "w8a8" (SmoothQuant). Block matmul kernels are
        quantized; embedding tables become int8 per row; norms and biases stay float.
      calibration: for "w8a8": texts (needs a tokenizer) or token-id lists.
      smoothquant_alpha: SmoothQuant's migration strength a in [0, 1].
      w8a8_activations: "per_token" (dynamic scales) or "per_tensor" (static, calibrated).
      kv_cache_dtype: None (the model dtype) or "int8" (per token and kv head scales).
      kernels: "auto" (Pallas on a GPU backend, XLA elsewhere), "pallas" (the Pallas
        kernels; interpreted off GPU: slow, for tests) or "xla".
      megatron_args: for Megatron-LM checkpoints saved without args, the Megatron
        argument values they need (e.g. {"num_layers": 24, "hidden_size": 1024,
        "num_attention_heads": 16, "max_position_embeddings": 1024}), and "vocab_size"
        (the tokenizer's) when there is no vocab.json next to the checkpoint.
    Raises:
      CheckpointError: the checkpoint is unreadable or in an unsupported layout.
      ValueError: an unknown dtype, quant mode, kv_cache_dtype or kernels value, w8a8
        without calibration, a mesh the model's shapes do not fit, or megatron_args for
        a checkpoint that is not Megatron-LM.
    """
    from converters import load_checkpoint, tokenizer_dir
    from ftjax import quant as q

    jdtype = _dtype(dtype)
    _kernels(kernels)
    q.check_mode(quant)
    _check_kv_dtype(kv_cache_dtype)
    if quant == "w8a8" and not calibration:
        raise ValueError("quant='w8a8' needs calibration: texts or token-id lists")
    path = os.fspath(path)
    if not os.path.isdir(path) and not (path.endswith(".nemo") and os.path.isfile(path)):
        raise CheckpointError(f"{path}: not a directory")
    params_np = None
    if mesh is not None and quant is None and os.path.isdir(path):
        cfg, params_np = _restore_onto_mesh(path, mesh, jdtype)
    if params_np is None:
        cfg, params_np = load_checkpoint(path, megatron_args=megatron_args)
    tok = tokenizer_dir(path)
    tokenizer = tok and _load_tokenizer(tok)
    if mesh is not None and quant is None and q.mode_of(params_np) is None:
        params = params_np  # Model places them shard by shard, straight from the host arrays
    else:
        params = jax.tree_util.tree_map(
            lambda x: jax.tree_util.tree_map(jnp.asarray, x) if q.is_quantized(x)
            else jnp.asarray(x, dtype=jdtype), params_np, is_leaf=q.is_leaf)
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
    return Model(cfg, params, dtype, tokenizer=tokenizer, path=path, mesh=mesh,
                 kv_cache_dtype=kv_cache_dtype, kernels=kernels)


def _restore_onto_mesh(path: str, mesh, jdtype):
    """An orbax checkpoint restored straight onto the mesh (each process reads only its
    shards); (None, None) for other formats."""
    from converters.native import read_meta
    from converters.orbax_ckpt import FORMAT, VERSION, is_orbax, load_orbax
    from ftjax.model import param_shapes

    if not is_orbax(path):
        return None, None
    _, cfg = read_meta(path, FORMAT, VERSION)
    shardings = sharding.Layout(mesh, cfg).stored_shardings(param_shapes(cfg))
    cfg, params, _ = load_orbax(path, shardings, dtype=jdtype)
    return cfg, params


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
                 path: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
                 kv_cache_dtype: Optional[str] = None, kernels: str = "auto"):
        """`params`: canonical (stacked) params, numpy or jax arrays (int8 weights as
        `ftjax.quant` weight types). `mesh`, `kv_cache_dtype`, `kernels`: see `load`."""
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
        self.layout = None
        if mesh is not None:
            if mesh.shape.get("pipe", 1) > 1:
                raise ValueError("pipeline parallelism (pipe > 1) is not implemented for running "
                                 "models; the pipe axis is used by `ftjax plan` only")
            self.layout = sharding.Layout(mesh, config)
        self.engine = Engine(config, _dtype(dtype), scan_layers=scan, kernels=_kernels(kernels),
                             layout=self.layout, kv_dtype=kv_cache_dtype)
        self.beams = BeamSearch(self.engine)
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

    def _requests(self, prompts: Prompts, max_new_tokens: int, sampling,
                  soft_prompts=None) -> List[Request]:
        """Validates a call: one `Request` per prompt."""
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
        softs = self._soft_prompts(soft_prompts, n)
        out = []
        for i, (p, sp, soft) in enumerate(zip(ids, sampling, softs)):
            budget = int(max_new_tokens if sp.max_new_tokens is None else sp.max_new_tokens)
            if sp.min_new_tokens > budget:
                raise ValueError(f"sampling[{i}].min_new_tokens ({sp.min_new_tokens}) is larger "
                                 f"than its max_new_tokens ({budget})")
            r = Request(p, sp, budget, soft)
            if r.length > self.config.max_positions - 1:
                raise ValueError(f"prompts[{i}] with its soft prompt has {r.length} positions; "
                                 f"the limit is {self.config.max_positions - 1}")
            out.append(r)
        return out

    def _soft_prompts(self, soft_prompts, n: int):
        if soft_prompts is None:
            return [None] * n
        if len(soft_prompts) != n:
            raise ValueError(f"soft_prompts must have one entry (array or None) per prompt: "
                             f"{n} prompts, {len(soft_prompts)} entries")
        e = self.config.embed_dim
        out = []
        for i, sp in enumerate(soft_prompts):
            if sp is None:
                out.append(None)
                continue
            arr = np.asarray(sp, np.float32)
            if arr.ndim != 2 or arr.shape[1] != e or arr.shape[0] == 0:
                raise ValueError(f"soft_prompts[{i}] must be [P, {e}] (P >= 1 embedding rows "
                                 f"of the model's embedding width), got shape {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"soft_prompts[{i}] has non-finite values")
            out.append(arr)
        return out

    def generate(self, prompts: Prompts, max_new_tokens: int = 32,
                 sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 soft_prompts: Optional[Sequence[Optional[np.ndarray]]] = None
                 ) -> GenerateOutput:
        """Generates continuations of a batch of prompts.

        Args:
          prompts: token-id lists (ragged lengths allowed) or strings (encoded
            with `self.tokenizer`).
          max_new_tokens: the most tokens to generate per prompt (a request's
            `SamplingParams.max_new_tokens` overrides it).
          sampling: one SamplingParams for all prompts or one per prompt; None is greedy.
          soft_prompts: optional, per prompt None or a float array `[P, E]` (E the
            embedding width, = d_model except for project_in models) prepended to
            the prompt's token embeddings (prompt tuning, FasterTransformer's
            request_prompt_embedding).
        Returns:
          GenerateOutput. A request with n > 1 (or beams returning n > 1) gets a list
          of n sequences in each field instead of one.
        """
        reqs = self._requests(prompts, max_new_tokens, sampling, soft_prompts)
        results: List[Optional[Sequences]] = [None] * len(reqs)
        groups: dict = {}
        for i, r in enumerate(reqs):
            sp = r.sp
            key = None if sp.num_beams == 1 else (sp.num_beams, sp.length_penalty,
                                                  sp.early_stopping, r.max_new)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            group = [reqs[i] for i in idx]
            done = self._run_sampling(group)[0] if key is None else self._run_beams(group)
            for i, seqs in zip(idx, done):
                results[i] = seqs
        return self._output(reqs, results)

    def _run_sampling(self, reqs: List[Request], session=None, cache=None):
        """Prefill + decode of sampled / greedy requests.

        Returns (Sequences per request, final DecodeState, {row: tokens kept} for stop strings).
        """
        batch = batching.build(reqs, [r.sp.n for r in reqs], self.config, DECODE_CHUNK,
                               session=session, layout=self.layout)
        state, prompt_lp = self.engine.prefill(
            self._run_params, **batch.prefill_args, sp=batch.sp, cache=cache,
            max_len=batch.max_len, width=batch.width, feat=batch.feat)
        stops = batching.StopStrings(batch, reqs, self.tokenizer)
        if stops:
            # Text is only known on the host: decode chunk by chunk and check between chunks.
            state = stops.check(state)
            while stops.running(state) and int(state.step) < batch.width:
                state = self.engine.decode_chunk(self._run_params, state, batch.sp,
                                                 feat=batch.feat, chunk=DECODE_CHUNK)
                state = stops.check(state)
        else:
            state = self.engine.decode(self._run_params, state, batch.sp, feat=batch.feat,
                                       chunk=DECODE_CHUNK)
        return batching.collect(batch, reqs, state, prompt_lp, stops.cut), state, stops.cut

    def _run_beams(self, reqs: List[Request]) -> List[Sequences]:
        sp0 = reqs[0].sp
        for i, r in enumerate(reqs):
            if r.sp.stop_strings or r.sp.stop_sequences or r.sp.logprobs or (
                    r.sp.prompt_logprobs is not None):
                raise ValueError("num_beams > 1 does not support stop_strings, stop_sequences, "
                                 "logprobs or prompt_logprobs")
        nb, rpad = sp0.num_beams, buckets.next_pow2(len(reqs))
        if self.layout is not None:
            rpad = self.layout.batch_size(rpad)
        batch = batching.build(reqs, [nb] * len(reqs), self.config, 1, batch_size=rpad * nb,
                               layout=self.layout)
        live = jnp.arange(rpad) < len(reqs)
        st = self.beams.run(self._run_params, **batch.prefill_args, sp=batch.sp, live=live,
                            num_beams=nb, max_new=reqs[0].max_new,
                            early_stopping=sp0.early_stopping,
                            length_penalty=float(sp0.length_penalty), max_len=batch.max_len,
                            width=batch.width, feat=batch.feat)
        fin, fin_lp, fin_len, fin_stop, scores = sharding.fetch(
            (st.fin, st.fin_lp, st.fin_len, st.fin_stop, st.fin_scores))
        out = []
        for i, r in enumerate(reqs):
            keep = range(r.sp.n)
            out.append(Sequences(
                tokens=[fin[i, j, :fin_len[i, j]].tolist() for j in keep],
                finish_reasons=["stop" if fin_stop[i, j] else "length" for j in keep],
                log_probs=[fin_lp[i, j, :fin_len[i, j]].tolist() for j in keep],
                cum_log_probs=[float(scores[i, j]) for j in keep]))
        return out

    def _output(self, reqs: List[Request], results: List[Sequences]) -> GenerateOutput:
        def pick(r, values):
            return values if r.sp.n > 1 else values[0]

        texts = None
        if self.tokenizer is not None:
            texts = [pick(r, [self.tokenizer.decode(t) for t in s.tokens])
                     for r, s in zip(reqs, results)]
        tops = [s.top_logprobs for s in results]
        return GenerateOutput(
            tokens=[pick(r, s.tokens) for r, s in zip(reqs, results)],
            finish_reasons=[pick(r, s.finish_reasons) for r, s in zip(reqs, results)],
            log_probs=[pick(r, s.log_probs) for r, s in zip(reqs, results)],
            texts=texts,
            cum_log_probs=[pick(r, s.cum_log_probs) for r, s in zip(reqs, results)],
            top_logprobs=None if all(t is None for t in tops) else
            [None if t is None else pick(r, t) for r, t in zip(reqs, tops)],
            prompt_logprobs=None if all(s.prompt_logprobs is None for s in results) else
            [s.prompt_logprobs for s in results])

    def stream(self, prompts: Prompts, max_new_tokens: int = 32,
               sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
               soft_prompts: Optional[Sequence[Optional[np.ndarray]]] = None
               ) -> Iterator[StreamEvent]:
        """Like `generate`, but yields each token as soon as it is produced.

        Events of one sequence come in order; `text` is the newly decoded text
        (held back while a multi-byte character is incomplete). With n > 1,
        `sample` tells which of the request's samples the token belongs to.
        """
        reqs = self._requests(prompts, max_new_tokens, sampling, soft_prompts)
        if any(r.sp.num_beams > 1 for r in reqs):
            raise ValueError("stream does not support num_beams > 1: beams are only final "
                             "when the search ends; use generate")
        batch = batching.build(reqs, [r.sp.n for r in reqs], self.config, STREAM_CHUNK,
                               layout=self.layout)
        state, _ = self.engine.prefill(self._run_params, **batch.prefill_args, sp=batch.sp,
                                       max_len=batch.max_len, width=batch.width, feat=batch.feat)
        stops = batching.StopStrings(batch, reqs, self.tokenizer)
        rows = batch.rows
        seen = [0] * len(rows)
        shown = [""] * len(rows)
        while True:
            state = stops.check(state)
            tokens, n_gen, finish = sharding.fetch((state.tokens, state.n_gen, state.finish))
            for b, (i, j) in enumerate(rows):
                end = stops.cut.get(b, int(n_gen[b]))
                for k in range(seen[b], end):
                    last = k + 1 == end and finish[b] != 0
                    text = None
                    if self.tokenizer is not None:
                        full = self.tokenizer.decode(tokens[b, :k + 1].tolist())
                        if full.endswith("\ufffd") and not last:
                            text = ""  # an incomplete multi-byte character: wait for more
                        else:
                            text, shown[b] = full[len(shown[b]):], full
                    reason = None
                    if last:
                        reason = "stop" if finish[b] == FINISH_STOP else "length"
                    yield StreamEvent(index=i, token=int(tokens[b, k]), text=text,
                                      finish_reason=reason, sample=j)
                seen[b] = max(seen[b], end)
            if all(finish[:len(rows)] != 0) or int(state.step) >= batch.width:
                return
            state = self.engine.decode_chunk(self._run_params, state, batch.sp, feat=batch.feat,
                                             chunk=STREAM_CHUNK)

    def session(self, max_len: Optional[int] = None) -> "Session":
        """An interactive conversation that keeps its KV cache between turns (see `Session`)."""
        from ftjax.session import Session

        return Session(self, max_len or self.config.max_positions)
