"""The public entry points: `ftjax.load` and the `Model` it returns."""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from converters import detect_format, load_checkpoint, tokenizer_files
from converters.checks import check_finite as check_values
from converters.native import read_meta
from converters.orbax_ckpt import FORMAT, VERSION, is_orbax, load_orbax
from ftjax import quant as q
from ftjax import sharding
from ftjax.batching import Request, check_ids
from ftjax.buckets import next_pow2
from ftjax.cache import KERNELS, KV_DTYPES
from ftjax.config import ModelConfig
from ftjax.engine import Engine
from ftjax.errors import CheckpointError
from ftjax.fits import call_bytes, check_fits
from ftjax.generation import GenerateOutput, Generator, StreamEvent
from ftjax.model import split_layers, stack_layers
from ftjax.paged_kv import pages_for_budget
from ftjax.sampling import SamplingParams
from ftjax.serving import LLMEngine
from ftjax.session import Session
from ftjax.streaming import stream as stream_requests
from ftjax.smoothquant import quantize_w8a8
from ftjax.tokenizer import encode_long, load_tokenizer
from ftjax.specs import n_params, shapes
from pallas_kernels import select as kernel_select

__all__ = ["DTYPES", "GenerateOutput", "Model", "StreamEvent", "load"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# "auto": split the stacked layers per layer on CPU (see `ftjax.model`), scan elsewhere.
LAYER_LOOPS = ("auto", "scan", "unrolled")

Prompts = Union[Sequence[str], Sequence[Sequence[int]]]


def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _kernels(name: str) -> str:
    """"auto" -> "mosaic" on sm90+ GPUs, "pallas" on other GPUs, "xla" elsewhere."""
    allowed = ("auto",) + KERNELS
    if name not in allowed:
        raise ValueError(f"kernels must be one of {allowed}, got {name!r}")
    if name == "auto":
        return kernel_select.auto()
    return name


def load(path: str, dtype: str = "float32", mesh: Optional[jax.sharding.Mesh] = None,
         quant: Optional[str] = None, calibration: Optional[Prompts] = None,
         smoothquant_alpha: float = 0.5, w8a8_activations: str = "per_token",
         kv_cache_dtype: Optional[str] = None, kernels: str = "auto",
         megatron_args: Optional[dict] = None, check_finite: bool = False) -> "Model":
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
      kernels: "auto" (Mosaic GPU on sm90+, Triton Pallas on older GPUs, XLA elsewhere),
        "mosaic" (Mosaic GPU decode attention and int8 matmul where they apply, else
        Triton; interpreted off GPU on jax >= 0.12), "pallas" (the Pallas
        kernels; interpreted off GPU: slow, for tests) or "xla".
      megatron_args: for Megatron-LM checkpoints saved without args, the Megatron
        argument values they need (e.g. {"num_layers": 24, "hidden_size": 1024,
        "num_attention_heads": 16, "max_position_embeddings": 1024}), and "vocab_size"
        (the tokenizer's) when there is no vocab.json next to the checkpoint.
      check_finite: read every weight and refuse NaN / Inf values (CheckpointError
        naming the tensor); off by default because it reads every byte.
    Raises:
      CheckpointError: the checkpoint is unreadable or in an unsupported layout.
      ValueError: an unknown dtype, quant mode, kv_cache_dtype or kernels value, w8a8
        without calibration, a mesh the model's shapes do not fit, or megatron_args for
        a checkpoint that is not Megatron-LM.
    """
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
    if check_finite:
        check_values(params_np, path)
    with tokenizer_files(path) as tok:
        tokenizer = tok and load_tokenizer(tok)
    if mesh is not None and quant is None and q.mode_of(params_np) is None:
        params = params_np  # Model places them shard by shard, straight from the host arrays
    else:
        # Cast on the host and left there: `Model` puts them on device (after its
        # per-layer split, if any) without compiling one op per weight shape.
        params = jax.tree_util.tree_map(
            lambda x: x if q.is_quantized(x) else _host_cast(x, jdtype), params_np,
            is_leaf=q.is_leaf)
    if quant is not None:
        params = jax.device_put(params)
        stored = q.mode_of(params)
        if stored is not None:
            raise ValueError(f"{path} already holds {stored} weights; load it with quant=None")
        if quant == "w8a8":
            seqs = _calibration_ids(calibration, tokenizer, cfg)
            params = quantize_w8a8(cfg, params, seqs, smoothquant_alpha, w8a8_activations,
                                   jdtype)
        else:
            params = q.quantize_params(cfg, params, 128 if quant == "int8-g128" else 0)
    return Model(cfg, params, dtype, tokenizer=tokenizer, path=path, mesh=mesh,
                 kv_cache_dtype=kv_cache_dtype, kernels=kernels)


def _restore_onto_mesh(path: str, mesh, jdtype):
    """An orbax checkpoint restored straight onto the mesh (each process reads only its
    shards); (None, None) for other formats."""
    if detect_format(path) != "ftjax" or not is_orbax(path):  # ambiguity refused here too
        return None, None
    _, cfg = read_meta(path, FORMAT, VERSION)
    shardings = sharding.Layout(mesh, cfg).stored_shardings(shapes(cfg))
    cfg, params, _ = load_orbax(path, shardings, dtype=jdtype)
    return cfg, params


def _check_kv_dtype(kv_cache_dtype):
    if kv_cache_dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {list(KV_DTYPES)}, "
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
            item = encode_long(tokenizer, item)
        ids = [int(t) for t in item]
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise ValueError(f"calibration[{i}] has token ids outside [0, {cfg.vocab_size})")
        # Long texts become consecutive windows of the model's max_positions.
        out += [ids[j:j + cfg.max_positions] for j in range(0, len(ids), cfg.max_positions)]
    return [s for s in out if s]


def _host_cast(x, dtype) -> np.ndarray:
    """A host array with float values in `dtype` (numpy's cast: a device cast would
    compile one XLA program per weight shape, ~30 ms each at start-up)."""
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _on_host(tree) -> bool:
    return all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(tree))


def _on_device(params, dtype):
    """Params as device arrays, float leaves in the model dtype (a float32 bias beside
    bfloat16 activations would change the layer scan's carry dtype); int8 weight types
    are kept as they are. Host arrays are cast on the host and `device_put`: no
    per-shape compile (eager `jnp.asarray` / `astype` compile one program each)."""
    def put(x):
        if q.is_quantized(x):
            return jax.device_put(x)
        if isinstance(x, jax.Array):
            return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return jax.device_put(_host_cast(x, dtype))
    return jax.tree_util.tree_map(put, params, is_leaf=q.is_quantized)


class Model:
    """A loaded model: teacher-forced `forward`, batched `generate`, token `stream`,
    interactive `session`s."""

    def __init__(self, config: ModelConfig, params, dtype: str = "float32", tokenizer=None,
                 path: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
                 kv_cache_dtype: Optional[str] = None, kernels: str = "auto",
                 layer_loop: Optional[str] = None):
        """`params`: canonical (stacked) params, numpy or jax arrays (int8 weights as
        `ftjax.quant` weight types). `mesh`, `kv_cache_dtype`, `kernels`: see `load`.

        layer_loop: "scan" (one `lax.scan` over the stacked layers: what accelerators
        run), "unrolled" (the stack split per layer once, here, and an unrolled loop:
        XLA:CPU copies a layer's weights out of the stack before every matmul inside a
        scan, ~1.6-2.8x slower decode) or "auto" (unrolled on CPU, scan elsewhere).
        None reads the environment variable FTJAX_LAYER_LOOP (default "auto")."""
        _check_kv_dtype(kv_cache_dtype)
        layer_loop = layer_loop or os.environ.get("FTJAX_LAYER_LOOP", "auto")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
        if layer_loop == "auto":
            layer_loop = "unrolled" if jax.default_backend() == "cpu" else "scan"
        if mesh is not None and mesh.shape.get("pipe", 1) > 1:
            layer_loop = "scan"  # each pipeline stage scans its own slice of the stack
        self.config = config
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.path = path
        self.kv_cache_dtype = kv_cache_dtype
        self.layer_loop = layer_loop
        self.quant = q.mode_of(params)
        self.param_bytes = q.param_bytes(params)
        self.layout = None
        split = layer_loop == "unrolled"
        if mesh is not None:
            self.layout = sharding.Layout(mesh, config)
            params = self.layout.place_params(params, _dtype(dtype))
        else:
            if split and _on_host(params["layers"]):
                # Split on the host (numpy views): indexing device arrays would compile
                # a slice program per weight shape.
                params = dict(params, layers=split_layers(params["layers"], config.n_layers))
                split = False
            params = _on_device(params, _dtype(dtype))
        self.engine = Engine(config, _dtype(dtype), kernels=_kernels(kernels), layout=self.layout,
                             kv_dtype=kv_cache_dtype)
        if split:
            params = dict(params, layers=split_layers(params["layers"], config.n_layers))
        self._gen = Generator(self.engine, params, tokenizer)
        self._serving: Optional[LLMEngine] = None

    @property
    def params(self):
        """The canonical params pytree (layers stacked), as placed. With
        layer_loop="unrolled" the model holds per-layer weights, so this builds a stacked
        copy on each access: read it once, not per call."""
        params = self._gen.params
        if isinstance(params["layers"], tuple):
            params = dict(params, layers=stack_layers(params["layers"]))
        return params if self.layout is None else self.layout.unpad_params(params)

    def __repr__(self):
        c = self.config
        extra = "".join(f", {k}={v}" for k, v in (("quant", self.quant),
                                                   ("kv_cache_dtype", self.kv_cache_dtype)) if v)
        return (f"ftjax.Model({self.path or 'in-memory'}, {n_params(c) / 1e6:.1f}M params, "
                f"{c.n_layers} layers, d_model={c.d_model}, dtype={self.dtype}{extra})")

    # -- input checking -------------------------------------------------------

    def _encode(self, prompts: Prompts, limit: int) -> List[List[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; give at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, (int, np.integer)):
                raise ValueError(f"prompts[{i}] = {p!r} is a single token id: prompts is a list of "
                                 "prompts, so one prompt of ids is [[id, id, ...]]")
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError(f"prompts[{i}] is a string but this model has no tokenizer; "
                                     "pass token ids")
                p = self.tokenizer.encode(p)
            out.append(check_ids(self.config, p, f"prompts[{i}]", limit))
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
            check_ids(self.config, row, f"input_ids[{i}]", self.config.max_positions)
        ids = np.asarray(ids, np.int32)
        ids = jnp.asarray(ids) if self.layout is None else self.layout.shard_batch(ids)
        return self.engine.forward(self._gen.params, ids)

    # -- generation -----------------------------------------------------------

    @property
    def generator(self) -> Generator:
        """The runtime object generate / stream / sessions drive (the engine and the
        params as placed), for other clients of the engine such as `ftjax.LLMEngine`."""
        return self._gen

    def requests(self, prompts: Prompts, max_new_tokens: int = 32, sampling=None,
                 soft_prompts=None) -> List[Request]:
        """Validates a call as `generate` does: one `batching.Request` per prompt
        (ValueError naming the prompt, option or limit)."""
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        # A prompt must leave room for at least one generated token.
        ids = self._encode(prompts, self.config.max_positions - 1)
        n = len(ids)
        if sampling is None:
            sampling = SamplingParams()
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * n
        if isinstance(sampling, (str, bytes)) or not isinstance(sampling, Sequence):
            raise ValueError(f"sampling must be a SamplingParams or a list of {n} of them "
                             f"(one per prompt), got {type(sampling).__name__}")
        sampling = list(sampling)
        if len(sampling) != n:
            raise ValueError(f"sampling must be a SamplingParams or a list of {n} of them "
                             f"(one per prompt), got {len(sampling)} items")
        for i, s in enumerate(sampling):
            if not isinstance(s, SamplingParams):
                raise ValueError(f"sampling[{i}] is a {type(s).__name__}, not a SamplingParams")
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
            # Output never passes the model's positions: size every buffer to that.
            r.max_new = min(r.max_new, self.config.max_positions - r.length)
            out.append(r)
        self._check_fits(out)
        return out

    def _check_fits(self, reqs: List[Request]) -> None:
        """ValueError with the estimate when a call's cache and buffers cannot fit."""
        rows = next_pow2(sum(r.sp.n * r.sp.num_beams for r in reqs))
        cache = min(next_pow2(max(r.length + r.max_new for r in reqs)),
                    self.config.max_positions)
        nbytes = call_bytes(self.config, rows, cache, cache,
                            jnp.dtype(_dtype(self.dtype)).itemsize,
                            1 if self.kv_cache_dtype == "int8" else None)
        check_fits(nbytes, f"this call ({rows} rows x {cache} positions)")

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
        reqs = self.requests(prompts, max_new_tokens, sampling, soft_prompts)
        return self._gen.output(reqs, self._gen.generate(reqs))

    def stream(self, prompts: Prompts, max_new_tokens: int = 32,
               sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
               soft_prompts: Optional[Sequence[Optional[np.ndarray]]] = None
               ) -> Iterator[StreamEvent]:
        """Like `generate`, but yields each token as soon as it is produced.

        Events of one sequence come in order; `text` is the newly decoded text
        (held back while a multi-byte character is incomplete). With n > 1,
        `sample` tells which of the request's samples the token belongs to.
        """
        reqs = self.requests(prompts, max_new_tokens, sampling, soft_prompts)
        return stream_requests(self.serving_engine(), reqs, self.tokenizer)

    def session(self, max_len: Optional[int] = None) -> Session:
        """An interactive conversation whose KV pages the serving engine keeps between
        turns (see `Session`)."""
        return Session(self._gen, self.serving_engine(), max_len or self.config.max_positions)

    def serving_engine(self) -> LLMEngine:
        """The model's own `ftjax.LLMEngine` (built on first use), which `stream` and
        sessions drive: 8 slots, 16-token pages, decode chunks of 4 steps, a pool of
        at most 1 GiB (or every slot at the model's full length, if less)."""
        if self._serving is None:
            page, slots = 16, 8
            per_seq = -(-self.config.max_positions // page)
            budget = pages_for_budget(self.config, 1 << 30, page, _dtype(self.dtype),
                                      self.kv_cache_dtype)
            self._serving = LLMEngine(self, max_slots=slots, page_size=page, chunk=4,
                                      num_pages=max(min(slots * per_seq, budget), per_seq) + 1)
        return self._serving
